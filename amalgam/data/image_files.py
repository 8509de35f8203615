"""Finding image files on disk and decoding them to fixed-size uint8 RGB tensors."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(root: Path) -> list[Path]:
    """Image files under `root` at any depth, sorted; an empty list when there are none.

    Hidden files and folders are left out: they hold editor and OS leftovers such as
    macOS `._photo.jpg` resource forks, which carry an image extension but are not images.
    Symlinked folders are followed, as datasets are often assembled from links; each folder is read
    once, however many links lead to it.
    """
    paths, seen = [], set()

    def unreadable(error: OSError) -> None:  # os.walk would pass over it in silence
        log.warning("cannot list folder %s (%s): its images are left out", error.filename, error.strerror)

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unreadable):
        # A link back to a folder above would be walked again and again (until the path gets too long).
        stat = os.stat(folder)
        folder_id = (stat.st_dev, stat.st_ino)
        if folder_id in seen:
            subfolders[:] = []
            continue
        seen.add(folder_id)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        paths += [
            Path(folder) / name
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(paths)


def scan_images(root: str | Path) -> list[Path]:
    """Image files (jpg, jpeg, png, webp, bmp, any case) under `root` at any depth, sorted.

    Raises FileNotFoundError when `root` is not a folder, ValueError when it holds no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder); check the path")
    paths = find_images(root)
    if not paths:
        raise ValueError(
            f"image folder {root} holds no images; accepted extensions (any case, any depth): "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    return paths


class BadImageError(ValueError):
    """A file that cannot be read as an image."""


def decode_rgb(path: Path) -> Tensor:
    """The image in `path` as uint8 RGB [3, H, W]; raises BadImageError naming the file and the problem.

    torchvision decodes jpeg/png/webp (gray, alpha, palette, CMYK and 16-bit included);
    Pillow takes over for whatever it cannot (bmp, rarer webp variants).
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BadImageError(f"cannot read image file {path}: {error}") from error
    if not raw:
        raise BadImageError(f"image file {path} is empty (0 bytes)")
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        # torchvision's decoder ignores a WebP's EXIF orientation; Pillow applies it.
        image = _decode_with_pillow(raw, path, None)
    else:
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders (TorchCodec replaces them) and says so on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                    mode=ImageReadMode.RGB,
                    apply_exif_orientation=True,
                )
        except (RuntimeError, ValueError) as torchvision_error:
            image = _decode_with_pillow(raw, path, torchvision_error)
    if image.ndim == 4:  # animated image: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG decodes to uint16
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pillow(raw: bytes, path: Path, torchvision_error: Exception | None) -> Tensor:
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()  # raises on truncated data (unless LOAD_TRUNCATED_IMAGES is set globally)
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                # Pillow's own convert("RGB") clips 16-bit values at 255 instead of scaling them.
                gray = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                array = np.stack([gray] * 3, axis=-1)
            else:
                array = np.asarray(image.convert("RGB"))
    except Exception as pillow_error:  # Pillow raises many types for bad data (OSError, SyntaxError, ...)
        tried = f"torchvision: {_short(torchvision_error)}; " if torchvision_error else ""
        raise BadImageError(
            f"cannot decode {path} as an image ({tried}Pillow: {_short(pillow_error)}); delete or replace the file"
        ) from pillow_error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _short(error: Exception) -> str:
    """An error's message without torchvision's C++ source location or Pillow's buffer address."""
    text = str(error).strip()
    message = re.sub(r"^\w+, \S+:\d+, ", "", text.splitlines()[-1] if text else "")
    message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", message)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def load_image(path: Path, image_size: int) -> Tensor:
    """The image in `path`, shorter side resized to `image_size` (antialiased), center-cropped
    to a square: uint8 [3, image_size, image_size]."""
    image = TF.resize(decode_rgb(path), [image_size], antialias=True)
    return TF.center_crop(image, [image_size, image_size])


# Paths already warned about in this process, so a bad file is reported once, not every epoch.
_warned_paths: set[Path] = set()


class ImageFiles(Dataset):
    """Images decoded from `paths` in `__getitem__` (that is, in the DataLoader workers).

    A sample is an image uint8 [3, S, S], or `(image, target)` when `targets` are given.
    A file that cannot be decoded raises BadImageError when `strict`, else it is logged
    once and its sample is `BadFile(path)`, for `CollateSkipping` to drop and name.
    """

    def __init__(
        self, paths: list[Path], image_size: int, targets: list[int] | None = None, strict: bool = False
    ):
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(targets)} targets for {len(paths)} paths")
        self.paths, self.image_size, self.targets, self.strict = paths, image_size, targets, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, int] | BadFile:
        path = self.paths[index]
        try:
            image = load_image(path, self.image_size)
        except BadImageError as error:
            if self.strict:
                raise BadImageError(f"{error} (strict=True; set strict=False to skip bad files)") from error
            if path not in _warned_paths:
                _warned_paths.add(path)
                log.warning("skipping bad image: %s", error)
            return BadFile(str(path))
        return image if self.targets is None else (image, self.targets[index])


class BadFile(NamedTuple):
    """The sample of a file that could not be decoded: its path, so that each bad file counts once."""

    path: str


class SkipCounted(NamedTuple):
    """A collated batch and the paths of the bad files dropped from it."""

    batch: Any
    skipped: tuple[str, ...]


class CollateSkipping:
    """Stacks the good samples of a batch and names the skipped (`BadFile`) ones.

    A batch whose every file is bad becomes an empty one (B = 0), so the shapes stay typed.
    """

    def __init__(self, image_size: int, with_targets: bool) -> None:
        self.image_size, self.with_targets = image_size, with_targets

    def __call__(self, samples: list[Any]) -> SkipCounted:
        good = [sample for sample in samples if not isinstance(sample, BadFile)]
        skipped = tuple(sample.path for sample in samples if isinstance(sample, BadFile))
        if not self.with_targets:
            return SkipCounted(self._stack(good), skipped)
        images = self._stack([image for image, _ in good])
        return SkipCounted((images, torch.tensor([target for _, target in good], dtype=torch.long)), skipped)

    def _stack(self, images: list[Tensor]) -> Tensor:
        if images:
            return torch.stack(images)
        return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
