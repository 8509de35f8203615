"""Batch augmentation that runs on the accelerator, after the batch is moved there.

Loaders ship uint8 images (4x smaller than float32 over the host-to-device copy); the
crop and flip below work on a whole batch at once, so they cost a few kernels, not a
Python loop over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1], same shape and device."""
    return images_uint8.to(torch.float32).div_(255.0)


def sample_crop_flip(
    batch_size: int,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draws one crop corner and one flip decision per sample.

    Returns `offsets` int64 [B, 2] (row, column of the crop's top-left corner in the
    padded image, each in 0..2*padding) and `flips` bool [B]. Draws on the generator's
    device when a generator is given (so a fixed CPU generator reproduces on any device),
    else on `device`; the results are moved to `device`.
    """
    draw_device = generator.device if generator is not None else device
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator, device=draw_device)
    if flip:
        flips = torch.rand(batch_size, generator=generator, device=draw_device) < 0.5
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=draw_device)
    return offsets.to(device), flips.to(device)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Zero-pads `images` [B, C, H, W] by `padding`, then takes for sample i the H x W window
    whose top-left corner is `offsets[i]`, mirrored left-right where `flips[i]`.

    One advanced-indexing gather: the flip is folded into the column index, so it costs nothing extra.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding > 0 else images
    device = images.device
    offsets = offsets.to(device)
    rows = offsets[:, 0, None] + torch.arange(height, device=device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(width, device=device)  # [B, W]
    cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    sample = torch.arange(batch, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    return padded[sample, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(
    images_uint8: Tensor,
    padding: int = 0,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] in [0, 1], each sample independently
    zero-padded by `padding` and randomly cropped back to H x W, then flipped left-right
    with probability 1/2 (when `flip`). Runs on the device the images are on."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    images = to_float(images_uint8)
    if padding == 0 and not flip:
        return images
    offsets, flips = sample_crop_flip(images.shape[0], padding, flip, generator, images.device)
    return crop_flip(images, offsets, flips, padding)


def strong_view(images: Tensor, shift: int = 4, cutout: float = 0.5) -> Tensor:
    """A strongly augmented copy of float images [B, C, H, W]: a random shift of up to `shift` pixels, a
    random left-right flip, and one zeroed square of side `cutout` x H at a random centre (it may overhang the
    border). Draws from torch's global RNG on the images' device, which the training loop seeds per batch."""
    batch, _, height, width = images.shape
    offsets, flips = sample_crop_flip(batch, shift, True, device=images.device)
    out = crop_flip(images, offsets, flips, shift)
    half_h, half_w = max(1, round(cutout * height)) // 2, max(1, round(cutout * width)) // 2
    centre = torch.stack([torch.randint(0, n, (batch,), device=images.device) for n in (height, width)], 1)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows[None] - centre[:, :1]).abs() <= half_h
    in_cols = (cols[None] - centre[:, 1:]).abs() <= half_w
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    return out.masked_fill(hole[:, None], 0.0)


def mix_images(images: Tensor, alpha: float) -> Tensor:
    """Mixup without labels: each image of [B, C, H, W] blended with another of the batch (a random
    permutation), ``lam * x + (1 - lam) * x_other`` with ``lam ~ Beta(alpha, alpha)`` per image. Teachers and
    student then see the same blend, so the teachers label points between images that clean views never reach
    ("function matching"). Draws from torch's global RNG, which the training loop seeds per batch."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    batch = images.shape[0]
    concentration = torch.tensor(float(alpha))
    lam = torch.distributions.Beta(concentration, concentration).sample((batch,)).to(images.device, images.dtype)
    partner = torch.randperm(batch).to(images.device)
    lam = lam.view(batch, *([1] * (images.ndim - 1)))
    return lam * images + (1 - lam) * images[partner]
