"""A deliberately plain, paper-style CFL training step: the baseline that amalgam's step is measured against.

Written the way the published code trains (Luo et al., IJCAI 2019): fp32, eager, features read with forward
hooks, teachers under ``torch.no_grad``, the MMD computed per teacher and per bandwidth with separate kernel
matrices, one Adam for the student and one for the common-feature blocks, and a ``.item()`` per loss term
every step (the published loop prints them). It owns deep copies of an ``AmalgamationModule``'s student,
teachers and blocks, so both start from the same weights and compute the same losses (``compare`` checks).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amalgam import AmalgamationModule
from amalgam.backbones import SmallMapConv2d


class _Net:
    """One network as the published code runs it: a bare model, its preprocessing, hooks on the tapped layers."""

    def __init__(self, tapped: nn.Module, grid_shapes: list[tuple[int, ...]]) -> None:
        self.model = copy.deepcopy(tapped.model).float()  # fp32 as published, whatever amalgam's teacher_dtype
        for module in self.model.modules():  # plain convolutions everywhere, as published
            if isinstance(module, SmallMapConv2d):
                module.__class__ = nn.Conv2d
        self.size = tapped.input_size
        self.mean, self.std = tapped.mean.float().clone(), tapped.std.float().clone()
        self.shapes = grid_shapes  # per-sample shapes amalgam reports, to put hooked outputs in NCHW
        self.captured: list[Tensor | None] = [None] * len(tapped.tapper.taps)
        modules = dict(self.model.named_modules())
        for pos, tap in enumerate(tapped.tapper.taps):
            if tap == "pooled":  # the pre-logits vector is what enters the classifier
                self.model.get_classifier().register_forward_pre_hook(self._saver(pos, pre=True))
                continue
            name = self.model.feature_info[tap]["module"] if isinstance(tap, int) else str(tap)
            modules[name].register_forward_hook(self._saver(pos, pre=False))

    def _saver(self, pos: int, pre: bool):
        def hook(_module, inputs, output=None):
            self.captured[pos] = inputs[0] if pre else output
        return hook

    def to(self, device: Any) -> _Net:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        logits = self.model((images - self.mean) / self.std)
        return [self._nchw(f, shape) for f, shape in zip(self.captured, self.shapes)], logits

    @staticmethod
    def _nchw(x: Tensor, shape: tuple[int, ...]) -> Tensor:
        if x.ndim == 3:  # ViT tokens [B, N, C]: drop prefix tokens, fold the patch grid
            b, n, c = x.shape
            side = math.isqrt(n)
            return x[:, n - side * side:].transpose(1, 2).reshape(b, c, side, side)
        if x.ndim == 4 and tuple(x.shape[1:]) != tuple(shape):  # Swin-style NHWC stage output
            return x.permute(0, 3, 1, 2)
        return x


class ReferenceStep:
    """The published step on copies of ``module``'s networks; ``step(images)`` trains once, returns floats."""

    def __init__(self, module: AmalgamationModule) -> None:
        hp = module.init_args
        self.student = _Net(module.student, module.student.tap_shapes())
        self.teachers = [_Net(t.net, t.net.tap_shapes()) for t in module.teachers]
        for t in self.teachers:
            t.model.eval().requires_grad_(False)
        self.blocks = copy.deepcopy(module.blocks)
        self.slices = list(module.slices)
        self.kd_mode, self.temperature = hp.kd, hp.temperature
        self.weights = dict(module.loss_weights)
        self.bandwidths = [float(s) for s in (hp.mmd_bandwidths or (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0))]
        head = set(self.student.model.get_classifier().parameters())
        backbone = [p for p in self.student.model.parameters() if p not in head]
        self.student_opt = torch.optim.Adam(
            [{"params": backbone, "lr": hp.lr}, {"params": list(head), "lr": hp.head_lr or hp.lr}],
            weight_decay=hp.weight_decay)
        blocks = list(self.blocks.parameters())  # none when the student has no taps (plain KD)
        self.block_opt = torch.optim.Adam(blocks, lr=hp.block_lr or hp.lr, weight_decay=hp.weight_decay) \
            if blocks else None

    def to(self, device: Any) -> ReferenceStep:
        for net in [self.student, *self.teachers]:
            net.to(device)
        self.blocks.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [*self.student.model.parameters(), *self.blocks.parameters()]

    # The losses, spelled out

    def loss_terms(self, images: Tensor) -> dict[str, Tensor]:
        self.student.model.train()
        self.blocks.train()
        with torch.no_grad():
            teacher_out = [t(images) for t in self.teachers]
        s_taps, s_logits = self.student(images)
        terms = {"kd": self.kd(s_logits, [z for _, z in teacher_out])}
        if len(self.blocks):
            terms["mmd"], terms["recon"] = s_logits.new_zeros(()), s_logits.new_zeros(())
        for k, block in enumerate(self.blocks):
            f_s, f_ts = s_taps[k], [taps[k] for taps, _ in teacher_out]
            if block.kind == "map":  # every teacher map resampled to the student's grid, antialiased to shrink
                grid = f_s.shape[-2:]
                f_ts = [t if t.shape[-2:] == grid else
                        F.interpolate(t, size=grid, mode="bilinear", align_corners=False,
                                      antialias=t.shape[-2] > grid[0] or t.shape[-1] > grid[1]) for t in f_ts]
            adapted = [block.student_adapter(f_s)] + [a(t) for a, t in zip(block.teacher_adapters, f_ts)]
            h_s, *h_ts = [block.extractor(a) for a in adapted]  # one pass per network, as the authors
            for i, h_t in enumerate(h_ts):
                terms["mmd"] = terms["mmd"] + self.mmd2(h_s, h_t)
                terms["recon"] = terms["recon"] + ((block.decoders[i](h_t) - f_ts[i]) ** 2).mean()
        if self.weights.get("balance") or self.weights.get("entropy"):
            p, log_p = s_logits.softmax(1), s_logits.log_softmax(1)
            mean_p = p.mean(0)
            terms["balance"] = math.log(p.shape[1]) + (mean_p * mean_p.clamp_min(1e-12).log()).sum()
            terms["entropy"] = -(p * log_p).sum(1).mean()
        return terms

    def kd(self, s_logits: Tensor, t_logits: list[Tensor]) -> Tensor:
        """KL(teacher || student) at temperature T, times T^2. The paper writes it as a cross-entropy, which
        differs by the teachers' entropy, a constant; KL makes the value comparable to amalgam's."""
        tau = self.temperature
        if self.kd_mode == "concat":
            pairs = [(s_logits, torch.cat(t_logits, 1))]
        else:
            pairs = [(s_logits[:, a:b], z) for (a, b), z in zip(self.slices, t_logits)]
        total = s_logits.new_zeros(())
        for s, t in pairs:
            p_t = (t / tau).softmax(1)
            total = total + (p_t * ((t / tau).log_softmax(1) - (s / tau).log_softmax(1))).sum(1).mean()
        return total * tau * tau

    def mmd2(self, x: Tensor, y: Tensor) -> Tensor:
        """Biased MMD^2 of one teacher: each bandwidth with its own three kernel matrices."""
        x = F.normalize(x.flatten(1), dim=1)
        y = F.normalize(y.flatten(1), dim=1)
        d_xx, d_yy, d_xy = sq_distances(x, x), sq_distances(y, y), sq_distances(x, y)
        total = x.new_zeros(())
        for sigma in self.bandwidths:
            k_xx = torch.exp(-d_xx / (2 * sigma * sigma))
            k_yy = torch.exp(-d_yy / (2 * sigma * sigma))
            k_xy = torch.exp(-d_xy / (2 * sigma * sigma))
            total = total + k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()
        return total.clamp_min(0.0)

    # One training step

    def step(self, images: Tensor) -> dict[str, float]:
        terms = self.loss_terms(images)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        optimizers = [o for o in (self.student_opt, self.block_opt) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        logged = {name: value.item() for name, value in terms.items()}
        logged["loss"] = loss.item()
        return logged


def sq_distances(x: Tensor, y: Tensor) -> Tensor:
    """``||x_i - y_j||^2`` by the usual expansion, in float64 as amalgam does: in float32 its rounding at
    distance 0 (~1e-7) is blown up by the narrowest bandwidth (sigma 0.001) into kernel values of 0.5-1."""
    x, y = x.double(), y.double()
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0.0).float()


def amalgam_terms(module: AmalgamationModule, images: Tensor) -> dict[str, Tensor]:
    """The loss terms of amalgam's real ``training_step`` on ``images`` (no optimizer step), plus ``loss``."""
    captured: dict[str, Tensor] = {}
    combine = module.combine_losses

    def capture(terms: dict[str, Tensor]) -> Tensor:
        captured.update(terms)
        return combine(terms)

    module.combine_losses = capture  # an instance attribute: the class's method is untouched
    try:
        captured["loss"] = module.training_step(images, 0)
    finally:
        del module.combine_losses
    return captured


def compare(module: AmalgamationModule, reference: ReferenceStep, images: Tensor) -> dict[str, float]:
    """Relative difference of every loss term (and the total) between amalgam and the reference."""
    ours = {k: v.detach().double() for k, v in amalgam_terms(module, images).items()}
    theirs = reference.loss_terms(images)
    theirs["loss"] = sum(reference.weights[name] * value for name, value in theirs.items())
    if set(ours) != set(theirs):
        raise AssertionError(f"amalgam logs loss terms {sorted(ours)} but the reference computes "
                             f"{sorted(theirs)}: teach benchmarks/reference_step.py the new term")
    return {k: (abs(ours[k] - theirs[k].detach().double()) / max(abs(ours[k]), 1e-12)).item() for k in ours}
