"""A supervised classifier: trains a specialist teacher on one task's labelled classes, with the same CLI.

Its checkpoint is a Lightning .ckpt whose weights carry the ``net.model.`` prefix; a teacher entry with the
same ``arch``, ``classes`` and ``model_kwargs`` loads it directly (the prefix is stripped), and takes its
``input_size``, ``mean`` and ``std`` from the checkpoint unless the entry sets them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from amalgam.backbones import TappedNetwork
from amalgam.checkpointing import seed_training_batch
from amalgam.module import finite_steps


class Classifier(L.LightningModule):
    """Args:
    arch: timm model name (or ``package.module.Class``).
    classes: class names, in label order; the data module's task must list the same ones.
    task: the task name (for logs and for matching the data module).
    input_size, mean, std, model_kwargs: preprocessing and constructor options, as for a teacher.
    lr, weight_decay, label_smoothing: AdamW with a one-cycle schedule, stepped per batch.
    channels_last: run convolutions in channels-last memory format (~1.2x faster for small CNNs on CPU too).
    """

    def __init__(self, arch: str, classes: list[str], task: str = "task", input_size: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 model_kwargs: dict[str, Any] | None = None, lr: float = 2e-3, weight_decay: float = 0.05,
                 label_smoothing: float = 0.0, channels_last: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TappedNetwork(arch, len(classes), [], input_size, mean, std, model_kwargs,
                                 owner=f"classifier {task!r} ({arch})")
        self.val_acc = MulticlassAccuracy(len(classes), average="micro")
        self.test_acc = MulticlassAccuracy(len(classes), average="micro")

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tasks = list(getattr(datamodule, "task_classes", None) or {})
        if stage != "predict" and tasks and self.hparams.task not in tasks:  # predict reads no labels
            # Unmatched, the data's label order would go unchecked against model.classes: logit i would be
            # trained on another class than classes[i] names.
            raise ValueError(f"classifier task {self.hparams.task!r} is not one of the data's tasks {tasks}: set "
                             f"model.task to the task it learns (the data's labels are then checked against "
                             f"model.classes)")
        if hasattr(datamodule, "check_task_classes") and self.hparams.task in getattr(datamodule, "task_classes", {}):
            # Class folders matched to these names as for an amalgamation ('/' written '_'), in this order.
            datamodule.check_task_classes({self.hparams.task: list(self.hparams.classes)})
        data_classes = getattr(datamodule, "task_classes", {}).get(self.hparams.task)
        if data_classes is not None and list(data_classes) != list(self.hparams.classes):
            raise ValueError(f"classifier task {self.hparams.task!r}: the data's classes {list(data_classes)} "
                             f"differ from model.classes {list(self.hparams.classes)}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # As in AmalgamationModule: crops, flips and dropout drawn from a seed fixed by (seed, epoch, batch),
        # so a run resumed mid-epoch (--ckpt_path last) ends with the uninterrupted run's weights.
        if self._trainer is not None and self.trainer.training:
            seed_training_batch(self.trainer)
        return batch

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images).logits

    @property
    def classes_per_task(self) -> dict[str, list[str]]:
        """Its one task's class names (what ``callbacks.PredictionWriter`` names predictions by)."""
        return {self.hparams.task: list(self.hparams.classes)}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor | None]:
        # AmalgamationModule's format with one task, so that the same PredictionWriter writes it.
        images, indices = batch if isinstance(batch, (tuple, list)) else (batch, None)
        logits = self(images)
        return {"indices": indices, "union_top": logits.argmax(1), f"probs/{self.hparams.task}": logits.softmax(1)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_acc.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_acc.update(self(images), labels)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        total = finite_steps(self.trainer, "the classifier's one-cycle schedule needs the run's length")
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.hparams.lr, total_steps=total,
                                                        pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
