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
            raise FileNotFoundError(f"Checkpoint file {str(path)!r} not found; check --ckpt_path.")
        try:
            on_cpu = map_location or (lambda storage, loc: storage)
            return torch.load(path, map_location=on_cpu, weights_only=True)
        except pickle.UnpicklingError as err:  # what weights_only raises for anything but tensors and containers
            raise RefusedCheckpointError(path, err) from err
        except Exception as err:
            raise UnreadableCheckpointError(path, err) from err


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not a PyTorch checkpoint at all."""

    def __init__(self, path: str | Path, err: BaseException) -> None:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        super().__init__(
            f"Cannot read checkpoint {str(path)!r} ({type(err).__name__}: {reason}): the file is truncated, "
            f"corrupt, or not a PyTorch checkpoint. A run stopped while writing a checkpoint leaves the previous "
            f"file intact: use that one.")


def refusal_reason(err: BaseException) -> str:
    """The telling line of ``torch.load(weights_only=True)``'s refusal: the one naming the blocked global
    ("posix.system"), not its long generic preamble; terminal colour codes removed."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")


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
