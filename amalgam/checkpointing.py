"""Checkpoints that survive a crash and runs that resume exactly where they stopped.

Three pieces, wired by default in ``python -m amalgam`` (see ``amalgam/cli.py``):
- ``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never a torn write;
  and it loads with ``weights_only=True``, so a planted checkpoint cannot run code.
- ``ResumableSampler``: the training order is a function of (seed, epoch) alone and an epoch can start
  part-way, so a resumed run sees the batches the interrupted one had not reached, in the same order.
- ``seed_training_batch``: each training batch draws its randomness (on-device crop/flip, dropout) from a seed
  fixed by (seed, epoch, batch, rank); nothing random depends on what ran before, so no RNG state needs saving.
``amalgam.callbacks.ExactResume`` records where in the epoch a checkpoint was taken and hands it to the sampler.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DistributedSampler

# Lightning warns whenever a LightningModule overrides a batch-transfer hook while a DataModule is in use.
# AmalgamationModule's on_before_batch_transfer only calls seed_training_batch (the DataModule's own
# on_after_batch_transfer still runs), so exactly that warning is silenced, nothing broader.
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but")


def global_seed() -> int:
    """The run's seed: what ``seed_everything`` (the CLI's ``seed_everything:``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


# --------------------------------------------------------------------------------------------------------
# Atomic, code-free checkpoint files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside the target, syncs it, then renames it over the target.

    ``os.replace`` within one folder is atomic, so a crash or a full disk mid-save leaves the previous
    checkpoint intact. (Lightning's own save stages the file in the system temp folder and *moves* it, which
    is a copy, not a rename, when that folder is on another disk.) Remote URLs (``s3://``...) keep Lightning's
    behaviour.

    Loading defaults to ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled
    code. ``--weights_only false`` on the command line opts out, for files you trust.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))
        return None

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if weights_only is False or "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not Path(path).is_file():
            raise not_a_file_error(Path(path), "Check --ckpt_path.")
        try:
            on_cpu = map_location or (lambda storage, loc: storage)
            return torch.load(path, map_location=on_cpu, weights_only=True)
        except Exception as err:
            raise checkpoint_error(path, err) from err


CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")


def not_a_file_error(path: Path, fix: str) -> OSError:
    """The error for a checkpoint path that names no file. A relative path is shown as given and as looked up
    from the current folder: a run started from another folder looks for another file."""
    shown = repr(str(path))
    if not path.is_absolute():
        shown += f" (looked up from {Path.cwd()}: {path.absolute()})"
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        listing = f" (it holds {inside[:5]}{' ...' if len(inside) > 5 else ''})" if inside else ""
        return IsADirectoryError(f"Checkpoint {shown} is a folder, not a file: give the path of the checkpoint "
                                 f"file itself{listing}.")
    return FileNotFoundError(f"Checkpoint {shown} does not exist. {fix}")


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _head(path: str | Path) -> bytes:
    """The file's first bytes; b"" when there is no local file to read (a remote URL)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER))
    except (OSError, TypeError, ValueError):
        return b""


def _foreign(head: bytes) -> bool:
    """Bytes no torch.save wrote: it writes a zip archive ("PK"), older versions a pickle (protocol byte 0x80)."""
    return bool(head) and not head.startswith((b"PK", b"\x80"))


def unreadable_message(path: str | Path, err: BaseException, truncated_hint: str = "") -> str:
    """Why ``torch.load`` could not read ``path``, told from the file's first bytes: for a file that is no
    checkpoint at all, torch's own error ("Unsupported operand 118", "mmap can only be used...") misleads."""
    where = f"Cannot read checkpoint {str(path)!r}"
    head = _head(path)
    if head == LFS_POINTER:  # a clone made without git-lfs, or before `git lfs pull`
        return (f"{where}: it is a Git LFS pointer (a small text file standing in for the weights), not the "
                f"checkpoint. Run `git lfs pull` in its repository to download the real file.")
    if _foreign(head):
        return f"{where}: it is not a PyTorch checkpoint (neither a zip archive nor a pickle). Is it the right file?"
    return (f"{where} ({type(err).__name__}: {refusal_reason(err)}): the file is truncated, corrupt, or not a "
            f"PyTorch checkpoint.{truncated_hint}")


def refuses_code(path: str | Path, err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` failed on a pickle that names a class or function it will not
    run ("GLOBAL posix.system"). It raises the same UnpicklingError for bytes that are no pickle at all (a
    text file, an image, an LFS pointer: "Unsupported operand 118"), which are no code to refuse."""
    return (isinstance(err, pickle.UnpicklingError) and not _foreign(_head(path))
            and re.search(r"GLOBAL|allowlisted|unrecognized function", str(err)) is not None)


def refusal_reason(err: BaseException) -> str:
    """The telling line of ``torch.load``'s error: for a weights_only failure the unpickler's own message
    (the one naming the blocked global, "posix.system"), not torch's long generic preamble; terminal colour
    codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")


def checkpoint_error(path: str | Path, err: BaseException) -> ValueError:
    """What a failed ``torch.load`` of ``path`` tells the user: refused code, or an unreadable file."""
    return (RefusedCheckpointError if refuses_code(path, err) else UnreadableCheckpointError)(path, err)


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not a PyTorch checkpoint at all."""

    def __init__(self, path: str | Path, err: BaseException) -> None:
        super().__init__(unreadable_message(path, err, " A run stopped while writing a checkpoint leaves the "
                                                       "previous file intact: use that one."))


class RefusedCheckpointError(ValueError):
    """A checkpoint that ``torch.load(weights_only=True)`` will not read: it needs pickled code."""

    def __init__(self, path: str | Path, err: BaseException) -> None:
        super().__init__(
            f"Refused to load checkpoint {str(path)!r}: it is not a plain tensor checkpoint "
            f"({type(err).__name__}: {refusal_reason(err)}). Loading it would mean running pickled code; amalgam's own "
            f"checkpoints never need that. If you wrote this file yourself and trust it, fit/validate/test/predict "
            f"load it with --weights_only false.")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a synced temporary file in the same folder and one ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # hidden, unique, same folder
    try:
        with open(tmp, "xb") as f:  # not mkstemp: that would make the checkpoint private (mode 0600)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # make the rename itself durable


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------
# Exact mid-epoch resume


class ResumableSampler(DistributedSampler):
    """Training order decided by (seed, epoch) alone, with an epoch that can start part-way.

    A ``DistributedSampler`` (one replica unless told otherwise) so that under DDP Lightning keeps it as it
    is instead of wrapping it; each rank then reads its own share of the same permutation.
    ``start_at(epoch, samples)`` makes the next pass over ``epoch`` skip this rank's first ``samples``
    indices: the ones an interrupted run had already trained on. ``__len__`` stays the full epoch, so
    Lightning's batch count and the LR schedule do not change on resume.
    """

    def __init__(self, dataset_size: int, seed: int | None = None, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=global_seed() if seed is None else seed)
        self._start: tuple[int, int] | None = None

    def start_at(self, epoch: int, samples: int) -> None:
        self.set_epoch(epoch)  # Lightning sets it too, but only after it may have started iterating
        self._start = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._start is not None and self._start[0] == self.epoch:
            indices = indices[self._start[1]:]
        self._start = None  # one pass only: the following epochs start at their beginning
        return iter(indices)


def seed_training_batch(trainer: Any) -> int:
    """Seeds torch's RNG (CPU and all GPUs) for the training batch about to be transferred and augmented.

    The seed depends only on (run seed, epoch, batch index in the epoch, rank), so a run resumed from a
    mid-epoch checkpoint draws the same crops, flips and dropout masks as the uninterrupted run, whatever
    validation or data loading consumed in between. Returns the seed.
    """
    position = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch already taken
    words = [global_seed() & 0xFFFFFFFF, trainer.current_epoch, position, trainer.global_rank]
    seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
    torch.manual_seed(seed)
    return seed
