"""Pictures: where student and teachers land in the common feature space, and who knows what.

``CommonSpacePlot`` is a callback: at the end of fit it embeds common-space features of the student and of
every teacher for a few labelled evaluation images (t-SNE, or PCA when asked), saves a PNG and, when a
``WandbLogger`` is active, logs it to W&B. ``accuracy_bars`` draws teachers against the student;
``confusion_plot`` shows which classes of which teacher the student confuses when the task is unknown, and the
``ConfusionPlot`` callback draws it after evaluations (and logs it to W&B).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless: CI, servers, notebooks all render to files
import matplotlib.pyplot as plt
import numpy as np
import torch


def save(fig: plt.Figure, path: Path) -> Path:
    """Lays out, writes (creating the folder) and closes a figure; returns its path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_wandb(trainer: L.Trainer, key: str, path: Path) -> None:
    """Logs a saved picture under ``key`` to every W&B logger of the trainer (none: nothing happens)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """[N, D] -> [N, 2] with t-SNE (scikit-learn) or PCA."""
    features = features - features.mean(0, keepdims=True)
    if method == "pca" or len(features) < 8:
        _, _, vt = np.linalg.svd(features, full_matrices=False)
        return features @ vt[:2].T
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


@torch.no_grad()
def common_space_points(module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Common-space features of the student and each teacher (first block), one row per image."""
    student = module.student_outputs(images)
    teachers = module.teacher_outputs(images)
    common = module.common_features(student, teachers)[0]
    points = {"student": common.student}
    points |= {f"teacher {t.task}": h for t, h in zip(module.teachers, common.teachers)}
    return {name: h.float().flatten(1).cpu().numpy() for name, h in points.items()}


def plot_common_space(points: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str], path: Path,
                      method: str = "tsne", title: str = "") -> Path:
    names = list(points)
    xy = embed_2d(np.concatenate([points[n] for n in names]), method)
    n = len(labels)
    k = len(class_names)
    fig, (ax_net, ax_cls) = plt.subplots(1, 2, figsize=(13, 5.5))
    # One distinct colour per class up to 20 (tab10, tab20); beyond, no palette tells classes apart: a
    # continuous map by class index, without a legend.
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    markers = "o^sDvP*X"
    for i, name in enumerate(names):
        part = xy[i * n:(i + 1) * n]
        ax_net.scatter(part[:, 0], part[:, 1], s=10, alpha=0.6, marker=markers[i % len(markers)], label=name)
        ax_cls.scatter(part[:, 0], part[:, 1], s=10, alpha=0.6, marker=markers[i % len(markers)],
                       c=labels, cmap=cmap, vmin=0, vmax=max(k - 1, 1) if k > 20 else cmap.N - 1)
    ax_net.set_title("by network (MMD pulls the student toward each teacher)")
    ax_net.legend(markerscale=2, fontsize=8)
    if k <= 20:
        ax_cls.set_title("by true class (marker = network)")
        handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(i), label=c) for i, c in enumerate(class_names)]
        ax_cls.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    else:
        ax_cls.set_title(f"by true class: {k} classes, colour = class index (marker = network)")
    for ax in (ax_net, ax_cls):
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title or f"Common feature space ({method.upper()})")
    return save(fig, path)


class CommonSpacePlot(L.Callback):
    """Saves ``<dirpath>/common_space.png`` at the end of fit (and logs it to W&B when that logger is on).

    Args:
        dirpath: output folder (default: the trainer's log dir).
        num_images: evaluation images taken per task.
        method: ``"tsne"`` or ``"pca"``.
    """

    def __init__(self, dirpath: str | None = None, num_images: int = 150, method: str = "tsne") -> None:
        self.dirpath = dirpath
        self.num_images = num_images
        self.method = method
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not getattr(pl_module, "blocks", None):
            return
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # log_dir: every rank joins
        if trainer.global_rank != 0:
            return
        images, labels, names = self._eval_images(trainer, pl_module)
        if images is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        points = common_space_points(pl_module, images.to(pl_module.device))
        pl_module.train(was_training)
        self.path = plot_common_space(points, labels, names, folder / "common_space.png", self.method,
                                      f"Common feature space after {trainer.current_epoch} epoch(s)")
        log_to_wandb(trainer, "common_space", self.path)

    def _eval_images(self, trainer: L.Trainer, pl_module):
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "task_classes", None):
            return None, None, None
        loaders = datamodule.val_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        images, labels, names = [], [], []
        for task, loader in zip(datamodule.task_names, loaders):
            offset = len(names)  # labels index the legend's classes: those of the evaluated tasks
            taken = 0
            for batch in loader:
                if hasattr(datamodule, "convert_batch"):  # also unwraps an image folder's SkipCounted batches
                    batch = datamodule.convert_batch(batch, augment=False)
                x, y = batch
                keep = min(len(x), self.num_images - taken)
                images.append(x[:keep]), labels.append(y[:keep] + offset)
                taken += keep
                if taken >= self.num_images:
                    break
            names += datamodule.task_classes[task]
        return torch.cat(images), torch.cat(labels).numpy(), names


def accuracy_bars(summary: dict, path: Path) -> Path:
    """Teachers vs student, task-aware per task and task-agnostic over the union."""
    tasks = list(summary["teachers"])
    groups = [f"task {t}" for t in tasks] + ["all classes\n(task-agnostic)"]
    teacher = [summary["teachers"][t]["acc"] for t in tasks] + [summary["teachers_concat"]["acc_union"]]
    student = [summary["student"]["tasks"][t]["acc"] for t in tasks] + [summary["student"]["acc_union"]]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2, 4.5))
    bars_t = ax.bar(x - 0.2, [100 * v for v in teacher], 0.4, label="teacher (own task) / teachers concatenated")
    bars_s = ax.bar(x + 0.2, [100 * v for v in student], 0.4, label="student (one network)")
    ax.bar_label(bars_t, fmt="%.1f", fontsize=8)
    ax.bar_label(bars_s, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)  # from 0: bar lengths compare as the accuracies do; above 100, room for the labels
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Who knows what: teachers vs the amalgamated student")
    return save(fig, path)


def confusion_plot(confusion: np.ndarray, class_names: list[str], task_of: list[str], path: Path,
                   title: str = "Task-agnostic confusion (rows: true class, columns: predicted)") -> Path:
    """Row-normalised confusion over the union classes, with each teacher's slice boxed: mass outside a row's
    box is an image given to the wrong task, the error no single teacher can see."""
    confusion = np.asarray(confusion, dtype=float)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    k = len(class_names)
    # The figure grows with the classes up to a page; past ~40 classes cells are too small for numbers, past
    # ~60 for names: the colours and the task boxes carry the picture.
    side = min(0.55 * k + 3, 18)
    fig, ax = plt.subplots(figsize=(side, side - 1))
    ax.imshow(100 * rates, cmap="Blues", vmin=0, vmax=100)
    for i, j in zip(*np.nonzero(rates >= 0.01)) if k <= 40 else ():
        ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
    start = 0
    for task in dict.fromkeys(task_of):  # tasks in slice order
        size = task_of.count(task)
        ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), size, size, fill=False, lw=1.5, ec="tab:red"))
        start += size
    if k <= 60:
        labels = [f"{name} ({task})" for name, task in zip(class_names, task_of)]
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
    else:  # a tick per task, at the middle of its box
        sizes = [task_of.count(task) for task in dict.fromkeys(task_of)]
        middles = np.cumsum([0, *sizes[:-1]]) + np.array(sizes) / 2 - 0.5
        ax.set_xticks(middles, list(dict.fromkeys(task_of)), rotation=60, ha="right", fontsize=8)
        ax.set_yticks(middles, list(dict.fromkeys(task_of)), fontsize=8)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


class ConfusionPlot(L.Callback):
    """Saves ``<dirpath>/confusion_<stage>.png`` after each chosen evaluation: the student's task-agnostic
    confusion over the union classes (``AmalgamationModule.confusion``), teachers' slices boxed. Logs it to
    W&B too when that logger is on.

    Args:
        dirpath: output folder (default: the trainer's log dir).
        stages: the evaluations to draw, ``"test"`` and/or ``"val"`` (every validation run, overwritten).
    """

    def __init__(self, dirpath: str | None = None, stages: list[str] | None = None) -> None:
        self.dirpath = dirpath
        self.stages = list(stages or ["test"])
        unknown = set(self.stages) - {"test", "val"}
        if unknown:
            raise ValueError(f"ConfusionPlot stages must be 'test' or 'val', got {sorted(unknown)}")
        self.path: Path | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._draw(trainer, pl_module, "test")

    def _draw(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        confusion = getattr(pl_module, "confusion", {}).get(stage)
        if stage not in self.stages:
            return
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # log_dir: every rank joins
        if trainer.global_rank != 0 or confusion is None:
            return
        tasks, names = zip(*pl_module.union_classes)
        out = folder / f"confusion_{stage}.png"
        title = f"Task unknown ({stage}): % of each true class (rows) per predicted class"
        self.path = confusion_plot(confusion.numpy(), list(names), list(tasks), out, title)
        log_to_wandb(trainer, f"{stage}/confusion", self.path)
