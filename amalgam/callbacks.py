"""Lightning callbacks of amalgam. Each class is one concern; add new ones below under their own names.

- ``ExactResume``: resume a run from a mid-epoch checkpoint with the data order of the uninterrupted run.
- ``PredictionWriter``: stream per-image predictions (every task + the task-agnostic top class) to CSV/JSONL.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import IO, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_warn

from amalgam.checkpointing import ResumableSampler

log = logging.getLogger(__name__)

# Lightning warns on every mid-epoch resume unless the loader itself is stateful; ExactResume makes the
# ResumableSampler skip the consumed batches, so that one warning is wrong here and silenced (nothing broader).
_MID_EPOCH_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


class ExactResume(Callback):
    """Records in each checkpoint where in the epoch training stood; on resume, starts the epoch there.

    Together with ``ResumableSampler`` (the training order of ``ImageFolderDataModule``) and the per-batch
    seeding of ``AmalgamationModule`` (``amalgam.checkpointing.seed_training_batch``), a run killed mid-epoch
    and resumed with ``--ckpt_path last`` ends with the same weights as an uninterrupted run with the same seed.
    Added by default in ``python -m amalgam``. A DataModule opts in by building its training sampler with
    ``ExactResume.sampler_for(trainer, dataset_size, batch_size)``.
    """

    def __init__(self) -> None:
        self.epoch = 0  # the epoch the next training batch belongs to
        self.batches_done = 0  # batches of that epoch already trained on
        self._pending: tuple[int, int] | None = None  # restored from a checkpoint, not yet handed to a sampler
        self.world_size: int | None = None  # processes of the run that wrote the restored checkpoint
        self._world_size = 1  # processes of this run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Runs before ModelCheckpoint's save (Lightning calls checkpoint callbacks last).
        self.epoch, self.batches_done = trainer.current_epoch, batch_idx + 1
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.epoch, self.batches_done = trainer.current_epoch + 1, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch, self.batches_done = trainer.current_epoch + 1, 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._world_size = trainer.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "world_size": self._world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.batches_done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        self._pending = (self.epoch, self.batches_done)
        self.world_size = state_dict.get("world_size")

    @staticmethod
    def sampler_for(trainer: pl.Trainer | None, dataset_size: int, batch_size: int, shuffle: bool = True
                    ) -> ResumableSampler:
        """The training sampler of a DataModule: this rank's share of a (seed, epoch) permutation, started
        where a restored checkpoint stopped when the trainer has an ``ExactResume`` callback."""
        if trainer is None:
            return ResumableSampler(dataset_size, shuffle=shuffle)
        sampler = ResumableSampler(dataset_size, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                   shuffle=shuffle)
        callback = next((cb for cb in trainer.callbacks if isinstance(cb, ExactResume)), None)
        if callback is not None and callback._pending is not None:
            epoch, batches = callback._pending
            callback._pending = None
            if batches and callback.world_size not in (None, trainer.world_size):
                rank_zero_warn(f"Resuming in the middle of epoch {epoch} with {trainer.world_size} process(es); the "
                               f"checkpoint was written by {callback.world_size}. The rest of this epoch splits its "
                               f"images another way (some are read twice, some not at all); later epochs are exact.")
            sampler.start_at(epoch, batches * batch_size)
            warnings.filterwarnings("ignore", message=_MID_EPOCH_WARNING)
        return sampler


class PredictionWriter(BasePredictionWriter):
    """Writes one row per image as batches arrive: every task's top class and probability, and the
    task-agnostic top class over the union of all tasks.

    Args:
        output: file to write; ``.csv`` or ``.jsonl`` (the suffix picks the format unless ``format`` is set).
            Under DDP each rank other than 0 writes ``<stem>.rank<r><suffix>``.
        format: ``csv`` or ``jsonl``.
        probabilities: also write every class's probability (CSV columns ``<task>/<class>``; in JSONL a
            ``probs`` object per task).

    Rows name the image by its path when the DataModule has ``predict_paths`` (``ImageFolderDataModule``),
    else by its index. Images that could not be decoded are skipped by the DataModule and counted, not written.
    Works with modules whose ``predict_step`` returns ``{"indices", "union_top", "probs/<task>"}`` and that
    name their classes in ``classes_per_task`` (``AmalgamationModule``, and ``Classifier`` for one task).
    """

    def __init__(self, output: str = "predictions.csv", format: Literal["csv", "jsonl"] | None = None,
                 probabilities: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        fmt = format or self.output.suffix.lstrip(".").lower()
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"PredictionWriter: cannot tell the format of {output!r}; name it .csv or .jsonl, "
                             f"or set format: csv|jsonl")
        self.format = fmt
        self.probabilities = probabilities
        self.rows = 0
        self._file: IO[str] | None = None
        self._csv: Any = None

    def path_for_rank(self, rank: int) -> Path:
        return self.output if rank == 0 else self.output.with_name(
            f"{self.output.stem}.rank{rank}{self.output.suffix}")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "classes_per_task"):
            raise ValueError(f"PredictionWriter needs a model that names its classes in 'classes_per_task' (an "
                             f"AmalgamationModule or a Classifier); got {type(pl_module).__name__}")
        self.classes = pl_module.classes_per_task
        self.union = [(task, name) for task, names in self.classes.items() for name in names]
        path = self.path_for_rank(trainer.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file name that is not valid UTF-8 is written back as its own bytes, not refused mid-run.
        self._file = path.open("w", newline="", encoding="utf-8", errors="surrogateescape")
        self.rows = 0
        if self.format == "csv":
            header = ["image", "union_task", "union_class"]
            for task in self.classes:
                header += [task, f"{task}_prob"]
                if self.probabilities:
                    header += [f"{task}/{name}" for name in self.classes[task]]
            self._csv = csv.writer(self._file)
            self._csv.writerow(header)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        union_top = prediction["union_top"].tolist()
        if not union_top:  # every file of the batch was unreadable
            return
        indices = prediction["indices"]
        # Bare image batches carry no indices: number the images in the order they arrive.
        indices = range(self.rows, self.rows + len(union_top)) if indices is None else indices.tolist()
        paths = getattr(trainer.datamodule, "predict_paths", None)
        per_task = {task: prediction[f"probs/{task}"].float().cpu() for task in self.classes}
        for row, index in enumerate(indices):
            image = str(paths[index]) if paths is not None else index
            union_task, union_class = self.union[union_top[row]]
            tasks = {}
            for task, probs in per_task.items():
                top = int(probs[row].argmax())
                tasks[task] = {"class": self.classes[task][top], "prob": round(float(probs[row, top]), 6)}
                if self.probabilities:
                    tasks[task]["probs"] = {n: round(float(p), 6) for n, p in zip(self.classes[task], probs[row])}
            self._write(image, union_task, union_class, tasks)
        self._file.flush()  # streaming: rows are on disk as soon as their batch is done

    def _write(self, image: Any, union_task: str, union_class: str, tasks: dict[str, dict]) -> None:
        self.rows += 1
        if self.format == "jsonl":
            record = {"image": image, "union": {"task": union_task, "class": union_class}, "tasks": tasks}
            self._file.write(json.dumps(record) + "\n")
            return
        cells: list[Any] = [image, union_task, union_class]
        for task, result in tasks.items():
            cells += [result["class"], result["prob"]]
            if self.probabilities:
                cells += list(result["probs"].values())
        self._csv.writerow(cells)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        skipped = getattr(trainer.datamodule, "skipped_total", 0)
        log.info("PredictionWriter: %d rows written to %s%s", self.rows, self.path_for_rank(trainer.global_rank),
                 f" ({skipped} unreadable images skipped)" if skipped else "")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
