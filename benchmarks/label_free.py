"""Label-free decision rules read off a trained student (and a BatchNorm teacher), for union_diagnostics.py.

Each one asks whether some structure in the unlabeled pool places the cut between look-alike classes of
different teachers better than the student's union head does:
- over-clustering: many small k-means clusters in the student's pooled features, each labelled by optimal
  transport to a uniform class mass (the union prior), so small clusters can land on either side of a cut;
- class-balanced self-training (CBST, Zou et al. 2018): a fresh linear head fitted on the head's most confident
  pool images, the same number per class, so large classes cannot swallow small ones;
- an in-task gate from a teacher's BatchNorm running statistics: the statistics describe the teacher's own
  training images, so pool images are weighted until the teacher's per-channel moments match them. Only
  teachers with BatchNorm have them (ViT and ConvNeXt use LayerNorm).
Labels are used only to score the rules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from amalgam.losses import batchnorm_moments
from amalgam.teacher import Teacher


def kmeans(x: torch.Tensor, k: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine, k-means++ start); returns the unit-norm centres [k, D]."""
    x = F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(seed)
    chosen = [x[torch.randint(len(x), (1,), generator=g)]]
    far = torch.full((len(x),), float("inf"))
    for _ in range(k - 1):  # k-means++: the next centre likely far (in cosine) from those chosen
        far = torch.minimum(far, (1 - x @ chosen[-1].T).squeeze(1).clamp_min(0))
        chosen.append(x[torch.multinomial(far + 1e-12, 1, generator=g)])
    centres = torch.cat(chosen)
    for _ in range(iterations):
        assign = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=1))
    return centres


def sinkhorn(scores: torch.Tensor, row_mass: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """Transport plan [R, C] proportional to exp(scores) with the given row masses and uniform column mass."""
    plan = (scores - scores.max()).exp()
    rows, cols = row_mass / row_mass.sum(), torch.full((scores.shape[1],), 1 / scores.shape[1])
    for _ in range(iterations):
        plan = plan * (rows / plan.sum(1).clamp_min(1e-30))[:, None]
        plan = plan * (cols / plan.sum(0).clamp_min(1e-30))[None, :]
    return plan


def over_cluster_labels(pool_x: torch.Tensor, pool_probs: torch.Tensor, test_x: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """k clusters of the pool, each given the class that optimal transport (uniform class mass, scores the
    cluster's mean log prediction) sends most of it to. Returns (test predictions, pool cluster index)."""
    centres = kmeans(pool_x, k)
    pool_cluster = (F.normalize(pool_x, dim=1) @ centres.T).argmax(1)
    sizes = torch.bincount(pool_cluster, minlength=k).float()
    mean_probs = torch.zeros(k, pool_probs.shape[1]).index_add_(0, pool_cluster, pool_probs)
    mean_probs = mean_probs / sizes.clamp_min(1)[:, None]
    cluster_class = sinkhorn(mean_probs.clamp_min(1e-8).log(), sizes.clamp_min(1e-3)).argmax(1)
    return cluster_class[(F.normalize(test_x, dim=1) @ centres.T).argmax(1)], pool_cluster


def balanced_confident(pool_probs: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per_class pool images with the highest probability of each class: (rows, their pseudo-labels)."""
    rows = pool_probs.argsort(0, descending=True)[:per_class].T.reshape(-1)
    labels = torch.arange(pool_probs.shape[1]).repeat_interleave(per_class)
    return rows, labels


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney): the chance a positive scores above a negative."""
    ranks = score.double().argsort().argsort().double() + 1
    n_pos, n_neg = positive.sum().item(), (~positive).sum().item()
    return ((ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class BatchNormMoments:
    """Per-image first and second moments of every channel at each BatchNorm input of a teacher, standardised
    by the layer's running statistics (``losses.batchnorm_moments``, what ``losses.TaskGate`` reads in
    training): a column is 0 on average over images like the teacher's training set."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]

    def __call__(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """[N, 2 * channels] for uint8 [N, 28, 28] images."""
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].float()))
                 for layer in self.layers]
        rows = []
        try:
            for i in range(0, len(images), batch):
                seen.clear()
                self.teacher(images[i:i + batch, None].expand(-1, 3, -1, -1).float().div(255))
                rows.append(torch.cat([batchnorm_moments(x, layer) for x, layer in zip(seen, self.layers)], 1))
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(rows)


def fit_moment_gate(moments: torch.Tensor, prior: float, steps: int = 600, l2: float = 1e-2
                    ) -> nn.Module:
    """A linear sigmoid gate over standardised moments whose weighted pool matches the running statistics
    (weighted moments near 0) while its mean stays at the task's prior share of the pool. Returns a module
    mapping moments [N, D] to in-task probabilities [N]."""
    centre, scale = moments.mean(0), moments.std(0) + 1e-6
    linear = nn.Linear(moments.shape[1], 1)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, torch.logit(torch.tensor(prior)).item())
    gate = nn.Sequential(_Standardise(centre, scale), linear, nn.Sigmoid(), nn.Flatten(0))
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    for _ in range(steps):
        s = gate(moments)
        matched = (s[:, None] * moments).sum(0) / s.sum()
        loss = matched.pow(2).mean() + 10 * (s.mean() - prior) ** 2 + l2 * linear.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate.requires_grad_(False)


class _Standardise(nn.Module):
    def __init__(self, centre: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre) / self.scale
