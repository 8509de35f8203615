"""A Dataset over images already in memory that serves a whole batch with one indexing op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate


class InMemoryImages(Dataset):
    """uint8 images [N, C, H, W] (C = 1 or 3) and optional per-image `targets` [N].

    A sample is an RGB image [3, H, W] (a single gray channel is repeated), or
    `(image, target)` when targets are given. `__getitems__` makes the DataLoader fetch a
    batch as one tensor index instead of B `__getitem__` calls; pair it with
    `collate_batched`. Any sampler works (shuffle, DistributedSampler), since the
    DataLoader still hands over the sampler's indices.
    """

    def __init__(self, images: Tensor, targets: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        image = self.images[index].expand(3, -1, -1).contiguous()
        return image if self.targets is None else (image, self.targets[index])

    def __getitems__(self, indices: list[int]) -> Tensor | tuple[Tensor, Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[rows].expand(-1, 3, -1, -1).contiguous()
        return images if self.targets is None else (images, self.targets[rows])


def collate_batched(batch: Any) -> Any:
    """Collate for `InMemoryImages`: its `__getitems__` already returns the batch.

    A list means something bypassed `__getitems__` (a wrapping dataset without it), so
    the samples still need stacking.
    """
    return default_collate(batch) if isinstance(batch, list) else batch
