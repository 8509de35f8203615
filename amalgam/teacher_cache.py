"""Frozen teachers give the same outputs for the same input, so an epoch after the first need not run them.

``TeacherCache`` keys each training image by a hash of the exact float view the teachers see and keeps their
features and logits for it. A view seen before is looked up; only new views run the teachers. Without random
augmentation every view repeats each epoch, and epochs after the first skip the teachers entirely (offline
distillation, computed lazily); with random crops and flips views rarely repeat and the cache mostly misses,
which is still correct, only useless. It never changes results beyond float rounding.

Memory: ``capacity`` rows of every teacher's taps and logits, on the device of the outputs; the module logs its
size when it fills its first batch. Each DDP rank keeps its own cache (ranks see other images each epoch,
so hits are rarer there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from amalgam.backbones import Features

# Random odd 64-bit multipliers, one per input element position, drawn once: a linear hash over int64
# (wrapping products and sums). Two different views collide only if their bit differences, weighted by the
# multipliers, sum to 0 mod 2^64: for image-sized inputs a chance far below anything a run would notice.
_HASH_SEED = 0x5EED_CAC4E


class TeacherCache:
    """Teacher outputs keyed by input view, up to ``capacity`` views.

    Args:
        capacity: the most views kept (e.g. the training set's size); later new views run the teachers
            every time.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"teacher cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rows: dict[int, int] = {}  # view hash -> row in the storage tensors
        self.storage: list[Features] | None = None
        self._multipliers: Tensor | None = None
        self.last_hit_rate = 0.0  # of the latest batch

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self, images: Tensor) -> list[int]:
        """One 64-bit hash per image of its exact float bits (layout-independent)."""
        bits = images.detach().float().contiguous().view(torch.int32).flatten(1).to(torch.int64)
        n = bits.shape[1]
        if self._multipliers is None or self._multipliers.numel() != n or self._multipliers.device != bits.device:
            gen = torch.Generator().manual_seed(_HASH_SEED)
            m = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=gen, dtype=torch.int64) * 2 + 1
            self._multipliers = m.to(bits.device)
        return (bits * self._multipliers).sum(1).tolist()

    def __call__(self, images: Tensor, run_teachers: Callable[[Tensor], list[Features]]) -> list[Features]:
        """The teachers' outputs for ``images``: cached rows where seen before, ``run_teachers`` for the rest."""
        keys = self.keys(images)
        rows = [self.rows.get(k, -1) for k in keys]
        hit = torch.tensor([r >= 0 for r in rows])
        self.last_hit_rate = float(hit.float().mean())
        if hit.all():
            return self._fetch(torch.tensor(rows, device=images.device))

        missing = (~hit).nonzero().squeeze(1)
        if not hit.any():
            fresh = run_teachers(images)
            self._store(keys, fresh)
            return fresh
        device = images.device
        fresh = run_teachers(images[missing.to(device)])
        self._store([keys[i] for i in missing.tolist()], fresh)
        # A mixed batch: cached rows and fresh ones, each written to its place in batch order.
        cached = self._fetch(torch.tensor([r for r in rows if r >= 0], device=device))
        where_hit, where_new = hit.nonzero().squeeze(1).to(device), missing.to(device)

        def merge(old: Tensor, new: Tensor) -> Tensor:
            out = new.new_empty((len(keys), *new.shape[1:]))
            out[where_hit], out[where_new] = old, new
            return out

        return [Features([merge(c, f) for c, f in zip(old.taps, new.taps)], merge(old.logits, new.logits))
                for old, new in zip(cached, fresh)]

    def _fetch(self, rows: Tensor) -> list[Features]:
        assert self.storage is not None
        return [Features([t[rows] for t in f.taps], f.logits[rows]) for f in self.storage]

    def _store(self, keys: list[int], outputs: list[Features]) -> None:
        if self.storage is None:
            self.storage = [Features([t.new_empty((self.capacity, *t.shape[1:])) for t in f.taps],
                                     f.logits.new_empty((self.capacity, *f.logits.shape[1:]))) for f in outputs]
        new: list[int] = []  # positions in this batch of views not stored yet
        for i, key in enumerate(keys):
            if len(self.rows) >= self.capacity:
                break
            if key not in self.rows:  # also skips the same view twice in one batch
                self.rows[key] = len(self.rows)
                new.append(i)
        if not new:
            return
        device = outputs[0].logits.device
        src = torch.tensor(new, device=device)
        dst = torch.tensor([self.rows[keys[i]] for i in new], device=device)
        for stored, out in zip(self.storage, outputs):
            for s, t in zip(stored.taps, out.taps):
                s[dst] = t[src]
            stored.logits[dst] = out.logits[src]

    def nbytes(self) -> int:
        if self.storage is None:
            return 0
        return sum(t.nbytes for f in self.storage for t in [*f.taps, f.logits])
