"""What every amalgam DataModule shares: the task list and the on-device uint8 -> float step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import Sampler

from amalgam.data.augment import random_crop_flip, to_float


def pin_memory_default() -> bool:
    # Pinned host memory only pays off when batches go to a CUDA device.
    return torch.cuda.is_available()


def eval_sampler(trainer: Any, dataset: Any) -> Sampler | None:
    """Under DDP, each process's share of an evaluation set, every image exactly once. Lightning's default
    sampler pads the shares to one length by repeating images, which would count those twice in the accuracies
    and the confusion (metrics gather over processes at the end, so unequal shares are fine)."""
    if trainer is None or getattr(trainer, "world_size", 1) == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)


class AmalgamDataModule(pl.LightningDataModule):
    """Base for the amalgam DataModules.

    Subclasses set `task_classes` (task name -> class names, in task order) in `__init__`,
    plus `padding` and `flip` for training-time augmentation.

    Loaders yield uint8 images; `on_after_batch_transfer` turns them into float [0, 1] on the
    device, with a random crop and flip while the trainer is fitting (training batches only).
    Batch structure is kept: a bare image tensor stays bare, `(images, labels)` and
    `(images, indices)` keep their second member untouched.
    """

    task_classes: dict[str, list[str]]
    padding: int = 0
    flip: bool = False

    @property
    def task_names(self) -> list[str]:
        """Task names in the order of the evaluation dataloaders."""
        return list(self.task_classes)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        augment = self.trainer is not None and self.trainer.training
        return self.convert_batch(batch, augment)

    def convert_batch(self, batch: Any, augment: bool) -> Any:
        """uint8 images in `batch` -> float [0, 1]; crop/flip them when `augment`."""
        if isinstance(batch, Tensor):
            return self._convert_images(batch, augment)
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            converted = [self._convert_images(batch[0], augment), *batch[1:]]
            return tuple(converted) if isinstance(batch, tuple) else converted
        raise TypeError(
            f"{type(self).__name__} expected a batch of uint8 images or (images, labels/indices), "
            f"got {type(batch).__name__}"
        )

    def _convert_images(self, images: Tensor, augment: bool) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images from the dataloader, got {images.dtype}")
        if augment:
            return random_crop_flip(images, padding=self.padding, flip=self.flip)
        return to_float(images)
