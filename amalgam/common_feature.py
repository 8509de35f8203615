"""The common feature space: per-network adapters, one shared extractor, per-teacher decoders.

Two forms, chosen by the tapped features' shape:
- maps ``[C, H, W]``: 1x1-conv adapters, a shared stack of residual conv blocks, conv-ReLU-conv decoders;
  every map is first resampled to one grid (the student's), so a ViT's 7x7 and a CNN's 4x4 meet.
- vectors ``[C]``: Linear adapters, Linear-ReLU-Linear extractor and decoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CommonFeatures:
    """One block's output: student and teacher features in the common space, and decoded teacher features."""

    student: Tensor
    teachers: list[Tensor]
    reconstructions: list[Tensor]
    targets: list[Tensor]  # the teacher features the decoders must reproduce (resampled to the grid)


# No batch statistics anywhere in a block (as in the authors' code, whose BatchNorm is commented out): the
# student's and each teacher's features pass through it side by side, and a BatchNorm would mix them, so that
# one network's loss trained another's adapter (reconstruction reaching the student) and each network's common
# features depended on the others in the batch.


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def _map_adapter(c_in: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, width, 1), nn.ReLU(inplace=True))  # the paper's 1x1 conv + ReLU


def _map_decoder(width: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, c_out, 1))


def _vector_mlp(c_in: int, hidden: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c_out))


class CommonFeatureBlock(nn.Module):
    """Maps student and teacher features of one tap into a shared space and decodes the teachers back.

    Args:
        student_shape: per-sample shape of the student's tapped feature, ``(C,)`` or ``(C, H, W)``.
        teacher_shapes: the same for each teacher, in teacher order.
        width: channels (or units) of the common space.
        depth: residual blocks in the shared extractor (map form).
        names: teacher names, for error messages.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shapes: Sequence[Sequence[int]], width: int = 128,
                 depth: int = 2, names: Sequence[str] | None = None) -> None:
        super().__init__()
        names = list(names or [f"teacher {i}" for i in range(len(teacher_shapes))])
        ranks = {len(student_shape)} | {len(s) for s in teacher_shapes}
        if ranks - {1, 3} or len(ranks) != 1:
            described = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(names, teacher_shapes))
            raise ValueError(
                f"Cannot align features of student {tuple(student_shape)} with {described}: one block needs "
                f"all maps [C,H,W] or all vectors [C]. Tap the same kind of layer in every network "
                f"(e.g. 'pooled' everywhere, or a last-stage map everywhere).")
        self.kind = "map" if ranks == {3} else "vector"
        self.grid = tuple(student_shape[1:]) if self.kind == "map" else None
        s_ch, t_chs = student_shape[0], [s[0] for s in teacher_shapes]
        if self.kind == "map":
            self.student_adapter = _map_adapter(s_ch, width)
            self.teacher_adapters = nn.ModuleList(_map_adapter(c, width) for c in t_chs)
            self.extractor = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))
            self.decoders = nn.ModuleList(_map_decoder(width, c) for c in t_chs)
        else:
            self.student_adapter = nn.Sequential(nn.Linear(s_ch, width), nn.ReLU(inplace=True))
            self.teacher_adapters = nn.ModuleList(nn.Sequential(nn.Linear(c, width), nn.ReLU(inplace=True))
                                                  for c in t_chs)
            self.extractor = _vector_mlp(width, width, width)
            self.decoders = nn.ModuleList(_vector_mlp(width, width, c) for c in t_chs)

    def align(self, x: Tensor) -> Tensor:
        if self.kind == "map" and tuple(x.shape[-2:]) != self.grid:
            # Antialiased when shrinking: plain bilinear would read only the pixels next to the sample points
            # (a 7x7 ViT map brought to 3x3 would leave most of its tokens out of MMD and reconstruction).
            # In float32: the antialiased resize has no bf16 kernel on CPU (bf16-true).
            shrink = x.shape[-2] > self.grid[0] or x.shape[-1] > self.grid[1]
            resized = F.interpolate(x.float(), size=self.grid, mode="bilinear", align_corners=False, antialias=shrink)
            return resized.to(x.dtype)
        return x

    def forward(self, student: Tensor, teachers: Sequence[Tensor]) -> CommonFeatures:
        weight = next(self.parameters())
        if weight.dtype in (torch.bfloat16, torch.float16):  # the module held in bf16 (precision bf16-true)
            teachers = [t.to(weight.dtype) for t in teachers]
        targets = [self.align(t) for t in teachers]
        adapted = [self.student_adapter(student)] + [a(t) for a, t in zip(self.teacher_adapters, targets)]
        # One extractor pass over all networks' features, for speed: with no batch statistics in the block it
        # computes exactly what a pass per network would.
        h_s, *h_ts = self.extractor(torch.cat(adapted)).split([a.shape[0] for a in adapted])
        recons = [decoder(h) for decoder, h in zip(self.decoders, h_ts)]
        return CommonFeatures(h_s, h_ts, recons, targets)
