"""TeacherCache: cached teacher outputs equal fresh ones, and a fit without augmentation stops running teachers."""

from __future__ import annotations

import pytest
import torch
from conftest import SIZE, amalgam_config, student, teacher

from amalgam import Teacher
from amalgam.cli import main
from amalgam.teacher_cache import TeacherCache


class CountingTeachers:
    """Runs real teachers and records how many images each call gave them."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.teachers = [Teacher.from_config(teacher("a", "resnet")), Teacher.from_config(teacher("b", "vit"))]
        self.batch_sizes: list[int] = []

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        return [t(images) for t in self.teachers]


def assert_same_outputs(got, expected) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.logits, e.logits, rtol=1e-4, atol=1e-5)
        for gt, et in zip(g.taps, e.taps, strict=True):
            torch.testing.assert_close(gt, et, rtol=1e-4, atol=1e-5)


def test_cache_returns_fresh_outputs_and_runs_teachers_only_on_new_views():
    run = CountingTeachers()
    cache = TeacherCache(capacity=100)
    seen, new = torch.rand(6, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE)

    assert_same_outputs(cache(seen, run), run(seen))
    assert len(cache) == 6 and cache.last_hit_rate == 0.0
    run.batch_sizes.clear()

    # All seen before (in another memory layout): no teacher runs.
    assert_same_outputs(cache(seen.contiguous(memory_format=torch.channels_last), run), run(seen))
    assert run.batch_sizes == [6] and cache.last_hit_rate == 1.0  # the 6 are the reference call above
    run.batch_sizes.clear()

    # A mixed batch: only the 4 new views run, and rows come back in batch order.
    mixed = torch.cat([new[:2], seen[1:4], new[2:]])
    got = cache(mixed, run)
    assert run.batch_sizes == [4] and len(cache) == 10 and cache.last_hit_rate == pytest.approx(3 / 7)
    assert_same_outputs(got, run(mixed))


def test_cache_keys_follow_pixels_and_capacity_caps_rows():
    cache = TeacherCache(capacity=3)
    images = torch.rand(5, 3, SIZE, SIZE)
    keys = cache.keys(images)
    assert len(set(keys)) == 5
    assert cache.keys(images.contiguous(memory_format=torch.channels_last)) == keys
    nudged = images.clone()
    nudged[0, 1, 7, 9] += 1e-6  # one pixel, one rounding step: another view
    assert cache.keys(nudged)[0] != keys[0] and cache.keys(nudged)[1:] == keys[1:]

    run = CountingTeachers()
    cache(images, run)
    assert len(cache) == 3 and cache.nbytes() > 0
    run.batch_sizes.clear()
    assert_same_outputs(cache(images, run), run(images))
    assert run.batch_sizes[0] == 2  # the two views that did not fit run again
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        TeacherCache(0)


def _fit(tmp_path, image_tree, monkeypatch, cache: bool, flip: bool = False, **model_args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    calls: list[tuple[int, int]] = []  # (epoch, images) per teacher call during training
    forward = Teacher.forward
    owner = {}

    def counting_forward(self, images):
        module = owner["module"]
        if module.training:
            calls.append((module.current_epoch, len(images)))
        return forward(self, images)

    monkeypatch.setattr(Teacher, "forward", counting_forward)
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         model_args={"teacher_cache": cache, **model_args},
                         trainer={"max_epochs": 2, "limit_val_batches": 0, "deterministic": True})
    cli = main(["--config", str(cfg), "--data.init_args.padding", "0", "--data.init_args.flip", str(flip)],
               run=False)
    owner["module"] = cli.model
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, calls


def test_fit_with_teacher_cache_runs_teachers_once_and_trains_the_same(tmp_path, image_tree, monkeypatch):
    cached, calls = _fit(tmp_path / "cached", image_tree, monkeypatch, cache=True)
    n_train = len(cached.datamodule.train_dataloader().dataset)
    per_epoch = {e: sum(n for epoch, n in calls if epoch == e) for e in (0, 1)}
    assert per_epoch == {0: 2 * n_train, 1: 0}  # two teachers, every image once, then never again
    assert cached.trainer.callback_metrics["train/teacher_cache_hits"] == 1.0

    plain, calls = _fit(tmp_path / "plain", image_tree, monkeypatch, cache=False)
    assert sum(n for epoch, n in calls if epoch == 1) == 2 * n_train
    for (name, p), q in zip(cached.model.student.named_parameters(), plain.model.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_teacher_cache_warns_when_views_are_random(tmp_path, image_tree, monkeypatch):
    with pytest.warns(UserWarning, match=r"views drawn at random \(data flip\): they rarely repeat"):
        _fit(tmp_path / "flip", image_tree, monkeypatch, cache=True, flip=True)
    with pytest.warns(UserWarning, match=r"views drawn at random \(model.mixup_alpha\)"):
        _fit(tmp_path / "mixup", image_tree, monkeypatch, cache=True, mixup_alpha=0.5)
