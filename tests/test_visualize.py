"""The pictures: what they draw, read back from the figures, and that they stay readable as the union grows."""

from __future__ import annotations

import struct

import matplotlib.colors as mcolors
import numpy as np
import pytest

from amalgam import visualize


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions save (closed, still readable)."""
    figures = []
    save = visualize.save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(visualize, "save", keep)
    return figures


def png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_accuracy_bars_start_at_zero_so_their_lengths_compare_as_the_accuracies(tmp_path, drawn):
    summary = {"teachers": {"a": {"acc": 0.92}, "b": {"acc": 0.90}}, "teachers_concat": {"acc_union": 0.698},
               "student": {"tasks": {"a": {"acc": 0.92}, "b": {"acc": 0.921}}, "acc_union": 0.811}}
    visualize.accuracy_bars(summary, tmp_path / "acc.png")
    (ax,) = drawn[0].axes
    low, high = ax.get_ylim()
    assert low == 0 and high > 100
    heights = sorted(round(p.get_height(), 1) for p in ax.patches)
    assert heights == sorted([92.0, 90.0, 69.8, 92.0, 92.1, 81.1])


@pytest.mark.parametrize("k", [10, 15])
def test_common_space_gives_each_class_its_own_colour_and_keeps_the_legend_off_the_points(tmp_path, drawn, k):
    rng = np.random.default_rng(0)
    labels = np.arange(3 * k) % k
    points = {name: rng.normal(size=(len(labels), 4)) for name in ("student", "teacher a")}
    names = [f"class {i} with a long name" for i in range(k)]
    visualize.plot_common_space(points, labels, names, tmp_path / "cs.png", method="pca")
    _, ax_cls = drawn[0].axes
    legend = ax_cls.get_legend()
    colours = [mcolors.to_hex(h.get_color()) for h in legend.legend_handles]
    assert [t.get_text() for t in legend.get_texts()] == names and len(set(colours)) == k
    assert legend.get_bbox_to_anchor().x0 >= ax_cls.get_window_extent().x1 - 1  # outside the axes, to the right
    # Each point has its class's legend colour.
    scatter = ax_cls.collections[0]
    drawn_colours = [mcolors.to_hex(c) for c in scatter.to_rgba(scatter.get_array())]
    assert drawn_colours == [colours[label] for label in labels]


def test_common_space_of_many_classes_draws_without_a_legend_it_could_not_fit(tmp_path, drawn):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 100
    points = {"student": rng.normal(size=(200, 4)), "teacher a": rng.normal(size=(200, 4))}
    visualize.plot_common_space(points, labels, [f"c{i}" for i in range(100)], tmp_path / "cs.png", method="pca")
    _, ax_cls = drawn[0].axes
    assert ax_cls.get_legend() is None and "100 classes" in ax_cls.get_title()


def test_confusion_plot_of_a_large_union_stays_a_page_without_unreadable_numbers(tmp_path, drawn):
    k = 300
    confusion = np.eye(k) * 10 + 1
    tasks = [f"task{i // 100}" for i in range(k)]
    path = visualize.confusion_plot(confusion, [f"c{i}" for i in range(k)], tasks, tmp_path / "big.png")
    width, height = png_size(path)
    assert width <= 18 * 110 and height <= 18 * 110
    (ax, *_) = drawn[0].axes
    assert not ax.texts  # no per-cell numbers
    assert [t.get_text() for t in ax.get_xticklabels()] == ["task0", "task1", "task2"]
    # A small union keeps its numbers and class names.
    visualize.confusion_plot([[5, 1], [2, 3]], ["x", "y"], ["a", "b"], tmp_path / "small.png")
    (small, *_) = drawn[1].axes
    assert [t.get_text() for t in small.texts] == ["83", "17", "40", "60"]
    assert [t.get_text() for t in small.get_xticklabels()] == ["x (a)", "y (b)"]
