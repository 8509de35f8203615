"""Losses of Common Feature Learning, as plain ``nn.Module``s usable without Lightning.

Every loss computes in float32 even under bf16 autocast: the MMD of L2-normalised features is a small
difference of large kernel sums, and low precision changes its value by tens of percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

PAPER_BANDWIDTHS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)


def _fp32(x: Tensor) -> Tensor:
    return x.float().flatten(1)


def slice_mass(probs: Tensor, slices: Sequence[tuple[int, int]]) -> Tensor:
    """Union probabilities [B, K] -> each task's share [B, tasks]: the sum over its ``(start, stop)`` slice."""
    return torch.stack([probs[:, a:b].sum(1) for a, b in slices], 1)


class MultiBandwidthMMD(nn.Module):
    """Sum over teachers of the biased multi-kernel Gaussian MMD^2 between student and teacher features.

    ``K(x, y) = sum_sigma exp(-||x - y||^2 / (2 sigma^2))`` and
    ``MMD^2 = relu(mean K_ss + mean K_tt - 2 mean K_st)``. It matches distributions over the batch, not
    sample j to sample j. Only the kernel blocks MMD needs are formed, each summed over every bandwidth in
    one pass: all networks against the student (``K_ss`` and every ``K_ts``) as one matrix, and each teacher
    against itself; the teacher-teacher cross blocks of a full Gram matrix would be wasted work.

    Args:
        bandwidths: the sigmas; the paper's seven by default.
        normalize: L2-normalise each flattened sample first (as the paper does).
    """

    def __init__(self, bandwidths: Sequence[float] = PAPER_BANDWIDTHS, normalize: bool = True) -> None:
        super().__init__()
        if not bandwidths or any(b <= 0 for b in bandwidths):
            raise ValueError(f"MMD bandwidths must be positive numbers, got {list(bandwidths)}")
        self._exact_gammas = 1.0 / (2.0 * torch.tensor(bandwidths, dtype=torch.float64) ** 2)
        self.register_buffer("gammas", self._exact_gammas.float(), persistent=False)
        self.normalize = normalize

    # A buffer follows the module's device, but not its dtype: in bf16 (precision bf16-true) the narrowest
    # paper bandwidth's 5e5 would round to 499712. float32, not float64, so that the module moves to MPS.
    def _apply(self, fn: Any, recurse: bool = True) -> MultiBandwidthMMD:
        super()._apply(fn, recurse)
        self.gammas = self._exact_gammas.to(device=self.gammas.device, dtype=torch.float32)
        return self

    def forward(self, student: Tensor, teachers: Sequence[Tensor]) -> Tensor:
        with torch.autocast(student.device.type, enabled=False):
            feats = [_fp32(student)] + [_fp32(t) for t in teachers]
            if self.normalize:
                feats = [F.normalize(f, dim=1) for f in feats]
            s = feats[0]
            gammas = self.gammas.to(device=s.device, dtype=s.dtype)
            k_ss, *k_ts = _kernel(torch.cat(feats), s, gammas).split([f.shape[0] for f in feats])
            k_ss = k_ss.mean()
            total = s.new_zeros(())
            for t, k_st in zip(feats[1:], k_ts):
                mmd2 = k_ss + _kernel(t, t, gammas).mean() - 2.0 * k_st.mean()
                total = total + mmd2.clamp_min(0.0)
            return total


def _kernel(x: Tensor, y: Tensor, gammas: Tensor) -> Tensor:
    """``sum_k exp(-gamma_k ||x_i - y_j||^2)`` for every row pair.

    The squared distances come from ``|x|^2 + |y|^2 - 2 x.y`` in float64: in float32 that expansion leaves
    ~1e-7 of rounding where the true distance is 0 (a sample against itself), which the narrowest paper
    bandwidth (sigma 0.001, gamma 5e5) turns into a kernel value anywhere between 0.5 and 1, depending on
    how the matrix product happens to be blocked. The matrices are small next to the networks' work.
    """
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    x, y = x.to(wide), y.to(wide)
    dist = (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min(0.0)
    return torch.exp(-dist.to(gammas.dtype)[None] * gammas[:, None, None]).sum(0)


class ReconstructionLoss(nn.Module):
    """Sum over teachers of the mean squared error between decoded and original teacher features."""

    def forward(self, reconstructions: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        if len(reconstructions) != len(targets):
            raise ValueError(f"{len(reconstructions)} reconstructions for {len(targets)} teacher features")
        with torch.autocast(targets[0].device.type, enabled=False):
            losses = [F.mse_loss(r.float(), t.float()) for r, t in zip(reconstructions, targets)]
            return torch.stack(losses).sum()


class SoftTargetKD(nn.Module):
    """Soft-target distillation of each teacher's logits into the student's union head.

    ``mode="concat"`` (the paper): softmax over the whole union against the softmax of the concatenated
    teacher logits, at temperature T (paper T=1). Computed as KL, which differs from the paper's
    cross-entropy only by the teachers' entropy, a constant: same gradients.
    ``mode="slice"``: one KL per teacher on that teacher's slice of the union; it never compares teachers
    that never saw each other's classes.
    Both modes are scaled by T^2, which keeps the gradients' size independent of T (Hinton et al.); a
    teacher logit of ``-inf`` (a class it masks) is a probability of 0 and contributes nothing.

    ``slices`` gives each teacher's ``(start, stop)`` in the union, in teacher order. In slice mode,
    ``weights`` [B, teachers] may weigh each image's term per teacher (the batch mean is then a weighted mean:
    sum of weight x KL over the batch size).
    """

    def __init__(self, mode: str = "concat", temperature: float = 1.0) -> None:
        super().__init__()
        if mode not in ("concat", "slice"):
            raise ValueError(f"KD mode must be 'concat' or 'slice', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"KD temperature must be positive, got {temperature}")
        self.mode = mode
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Sequence[Tensor],
                slices: Sequence[tuple[int, int]], weights: Tensor | None = None) -> Tensor:
        t = self.temperature
        if len(slices) != len(teacher_logits):
            raise ValueError(f"KD got {len(teacher_logits)} teachers' logits but {len(slices)} slices: give one "
                             "(start, stop) per teacher, in teacher order")
        for i, ((a, b), z) in enumerate(zip(slices, teacher_logits)):
            if b - a != z.shape[1]:
                raise ValueError(f"KD: teacher {i} gives {z.shape[1]} logits but its slice ({a}, {b}) holds "
                                 f"{b - a} classes of the union")
        with torch.autocast(student_logits.device.type, enabled=False):
            s = student_logits.float()
            ts = [z.float() for z in teacher_logits]
            if self.mode == "concat":
                if weights is not None:
                    raise ValueError("per-teacher KD weights need mode='slice': concat has one term for all")
                return _kl(s, torch.cat(ts, dim=1), t).mean() * t * t
            losses = [_kl(s[:, a:b], z, t) for (a, b), z in zip(slices, ts)]
            per_image = torch.stack(losses, 1)  # [B, teachers]
            if weights is not None:
                per_image = per_image * weights.float()
            return per_image.sum(1).mean() * t * t


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the tempered softmaxes, per image."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    # With probabilities as the target kl_div takes 0 log 0 = 0; log-probabilities would give 0 x -inf = NaN
    # for a class the teacher masks with -inf.
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1)


def batch_mean(x: Tensor) -> Tensor:
    """Mean over dim 0 of the whole batch: under DDP, of every process's batch together, with gradients.

    Each process then holds the same value. Its gradient reaches every process's rows (all-reduce's backward
    sums the processes' gradients), and DDP averages parameter gradients over processes: the step is that of
    one process seeing the whole batch, as for the terms that average per sample.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.mean(0)
    from torch.distributed.nn.functional import all_reduce  # differentiable

    flat = x.reshape(x.shape[0], -1)
    total = all_reduce(torch.cat([flat.sum(0), flat.new_tensor([x.shape[0]])]))
    return (total[:-1] / total[-1]).reshape(x.shape[1:])


class UnionPrior(nn.Module):
    """Information maximisation on the student's union softmax: a label-free cure for miscalibrated slices.

    Per-slice KD fixes the distribution *inside* each teacher's slice but leaves free how much mass each
    slice gets, so task-agnostic accuracy hinges on arbitrary offsets between slices. Two terms set it:
    - ``balance``: ``log K - H(mean_batch p)``, zero when the batch's mean prediction is uniform over the K
      union classes (the unlabeled pool is assumed roughly class-balanced); under DDP the mean is over every
      process's batch (``batch_mean``). With fewer images in that batch than classes, only unsure predictions
      can meet it: use batches of at least K images;
    - ``entropy``: ``mean H(p)``, small when each image commits to one class, which moves the boundary
      between look-alike classes of different teachers into low-density regions of the student's features.
    Returns both terms; weigh them with ``loss_weights.balance`` and ``loss_weights.entropy``.
    """

    def forward(self, student_logits: Tensor) -> dict[str, Tensor]:
        with torch.autocast(student_logits.device.type, enabled=False):
            log_p = F.log_softmax(student_logits.float(), dim=1)
            p = log_p.exp()
            mean_p = batch_mean(p)
            balance = math.log(p.shape[1]) + (mean_p * mean_p.clamp_min(1e-12).log()).sum()
            entropy = -(p * log_p).sum(1).mean()
            return {"balance": balance, "entropy": entropy}


class SelfLabel(nn.Module):
    """Self-labelling on the union head: the student's confident prediction on one view is the hard target for
    a strongly augmented view of the same image (FixMatch, Sohn et al. 2020, with ReMixMatch's distribution
    alignment).

    The teachers cannot say which task an image belongs to; the student, which sees every task, can learn it
    from the structure of its own features: a label that survives strong augmentation pulls the boundary
    between look-alike classes of different teachers away from dense regions. Before thresholding, the
    weak-view prediction is divided by the mean prediction (and renormalised), so pseudo-labels stay balanced
    over the union classes instead of feeding back whichever slice already dominates. That mean is a running
    average over recent batches (``momentum``; the first batch sets it), as in ReMixMatch: a batch smaller
    than the union has no image of most classes, and dividing by its own mean would lift every absent class
    to the level of the present ones, so that hardly any image would reach the threshold.

    Given the teachers' ``slices``, the pseudo-label is the task instead of the class: the aligned softmax is
    summed per slice, and the strong view is trained on its own slice masses (log-sum-exp of each slice). The
    teachers' soft targets alone then set the distribution inside each slice, and self-labelling only decides
    which task an image belongs to, the one thing the teachers cannot say.

    Args:
        threshold: only images whose aligned pseudo-label probability reaches this count; the loss is
            averaged over the whole batch (masked images contribute zero), as in FixMatch.
        momentum: weight of the running mean prediction against each new batch's (0: the batch's own mean;
            0.99 averages about the last 100 batches). Every call updates it, like BatchNorm's statistics.
        num_classes: the union's size. Given, the running mean is a buffer of the state dict (a resumed run
            continues with it); without it, it is sized on the first call and not saved.
    """

    def __init__(self, threshold: float = 0.95, momentum: float = 0.99, num_classes: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"self-labelling threshold must be in [0, 1), got {threshold}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"self-labelling momentum must be in [0, 1), got {momentum}")
        self.threshold, self.momentum = threshold, momentum
        # All zeros until the first batch: a mean prediction sums to 1, so the sum tells, without a host sync.
        self.register_buffer("mean_prediction", torch.zeros(num_classes or 0, dtype=torch.float32),
                             persistent=num_classes is not None)

    # The running mean follows the module's device, not its dtype: in bf16 (precision bf16-true) a 1% update
    # would be lost to rounding.
    def _apply(self, fn: Any, recurse: bool = True) -> SelfLabel:
        mean = self.mean_prediction
        super()._apply(fn, recurse)
        moved = self.mean_prediction
        # From the meta device (to_empty) there are no values to keep: nothing seen yet.
        self.mean_prediction = (torch.zeros_like(moved, dtype=torch.float32) if mean.is_meta
                                else mean.to(device=moved.device))
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "mean_prediction"
        if "mean_prediction" not in self._non_persistent_buffers_set:
            state_dict.setdefault(key, self.mean_prediction)  # a checkpoint saved before the running mean
        else:
            state_dict.pop(key, None)  # saved by a run that used the term, loaded by one that does not
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def aligned(self, probs: Tensor) -> Tensor:
        """``probs`` divided by the running mean prediction, renormalised; updates the running mean."""
        batch = batch_mean(probs)  # every process's batch under DDP, so every process keeps the same mean
        if self.mean_prediction.shape != batch.shape:
            self.mean_prediction = batch.clone()
        else:
            seen = self.mean_prediction.sum() > 0
            self.mean_prediction.copy_(torch.where(seen, self.mean_prediction.lerp(batch, 1 - self.momentum), batch))
        p = probs / self.mean_prediction.clamp_min(1e-12)
        return p / p.sum(1, keepdim=True)

    def forward(self, weak_logits: Tensor, strong_logits: Tensor, slices: list[tuple[int, int]] | None = None
                ) -> tuple[Tensor, Tensor]:
        """Returns (loss, fraction of the batch above the threshold). With ``slices`` (start, end) per task,
        the labels are tasks (see the class notes)."""
        with torch.autocast(weak_logits.device.type, enabled=False):
            with torch.no_grad():
                p = self.aligned(F.softmax(weak_logits.detach().float(), dim=1))
                if slices is not None:
                    p = slice_mass(p, slices)
                confidence, labels = p.max(1)
                mask = (confidence >= self.threshold).float()
            if slices is None:
                loss = F.cross_entropy(strong_logits.float(), labels, reduction="none")
            else:
                log_p = F.log_softmax(strong_logits.float(), dim=1)
                log_task = torch.stack([log_p[:, a:b].logsumexp(1) for a, b in slices], 1)
                loss = F.nll_loss(log_task, labels, reduction="none")
            return (loss * mask).mean(), mask.mean()


class ViewContrast(nn.Module):
    """Instance contrast between two views of the same images (SimCLR's NT-Xent, Chen et al. 2020).

    Row i of ``a`` and row i of ``b`` are two views of image i; every other row of either view is a negative.
    The loss is the cross-entropy of picking the other view of each of the 2B rows among the 2B - 1 others, by
    cosine similarity / ``temperature``. It shapes the student's features by what the images look like,
    which no teacher's soft targets say for images outside its task: look-alike classes of different tasks
    (shirt against T-shirt) can then fall into separate regions for the union prior's entropy term to split.

    Args:
        temperature: scale of the cosine similarities (SimCLR: 0.1 to 0.5).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrast temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"views must be [B, D] of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        with torch.autocast(a.device.type, enabled=False):
            z = F.normalize(torch.cat([a, b]).float(), dim=1)
            logits = z @ z.T / self.temperature
            logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
            n = len(a)
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            return F.cross_entropy(logits, partner)


class NeighbourConsistency(nn.Module):
    """Images that are neighbours in the teachers' joint feature space should get the same union class (SCAN,
    Van Gansbeke et al. 2020, with a memory bank of recent batches in place of neighbours mined up front).

    A teacher's features separate its own classes and, as a by-product, put an image of another task near its
    look-alikes; the teachers' features side by side separate the union classes better than the union prior
    alone lets the student do. A ring buffer keeps the last ``bank_size`` training images' keys (the teachers'
    features: see ``AmalgamationModule.neighbour_keys``) and the student's union softmax on them, detached.
    For each image the loss is ``-log <p, q>``, where ``q`` is the mean stored softmax of its ``k`` nearest
    bank entries by cosine similarity of keys: the student is pulled toward the class its neighbours get.

    ``forward`` compares the batch with earlier batches only, then adds the batch to the bank (like
    BatchNorm's running statistics, it updates state on every training call). It returns 0 until ``k``
    entries are filled. The bank is saved in the state dict (``get_extra_state``), so a resumed run continues
    with it; it is not a buffer, so DDP does not broadcast it: every process keeps its own bank (a checkpoint
    holds rank 0's, which every process of a resumed DDP run starts from).

    Args:
        bank_size: entries kept; older entries hold the student's older, less trained predictions.
        k: neighbours averaged into each image's target.
    """

    def __init__(self, bank_size: int = 4096, k: int = 5) -> None:
        super().__init__()
        if bank_size < 1 or not 1 <= k <= bank_size:
            raise ValueError(f"neighbour bank needs bank_size >= k >= 1, got bank_size={bank_size}, k={k}")
        self.bank_size, self.k = bank_size, k
        self.keys: Tensor | None = None
        self.probs: Tensor | None = None
        self.filled = 0
        self.pointer = 0

    def forward(self, keys: Tensor, student_logits: Tensor) -> Tensor:
        with torch.autocast(student_logits.device.type, enabled=False):
            keys = F.normalize(keys.detach().float().flatten(1), dim=1)
            p = F.softmax(student_logits.float(), dim=1)
            if self.keys is not None and self.keys.device != keys.device:  # restored from a checkpoint on the CPU
                self.keys, self.probs = self.keys.to(keys.device), self.probs.to(keys.device)
            if self.filled >= self.k:
                nearest = (keys @ self.keys[: self.filled].T).topk(self.k, dim=1).indices
                target = self.probs[: self.filled][nearest].mean(1)
                # -log <p, target> in log space: a clamp of <p, target> would cut the gradient exactly where
                # the student is confidently unlike its neighbours.
                log_p = F.log_softmax(student_logits.float(), dim=1)
                loss = -(log_p + target.log()).logsumexp(1).mean()
            else:  # keeps the graph (and DDP's gradient hooks) the same as on later steps
                loss = (p * 0.0).sum()
            self._add(keys, p.detach())
            return loss

    def _add(self, keys: Tensor, probs: Tensor) -> None:
        if self.keys is None or self.keys.shape[1] != keys.shape[1] or self.probs.shape[1] != probs.shape[1]:
            self.keys = keys.new_zeros(self.bank_size, keys.shape[1])
            self.probs = probs.new_zeros(self.bank_size, probs.shape[1])
            self.filled = self.pointer = 0
        keys, probs = keys[-self.bank_size:], probs[-self.bank_size:]
        rows = (self.pointer + torch.arange(len(keys), device=keys.device)) % self.bank_size
        self.keys[rows], self.probs[rows] = keys, probs
        self.pointer = (self.pointer + len(keys)) % self.bank_size
        self.filled = min(self.bank_size, self.filled + len(keys))

    def reset(self) -> None:
        self.keys = self.probs = None
        self.filled = self.pointer = 0

    def get_extra_state(self) -> dict:
        bank = None if self.keys is None else {"keys": self.keys.cpu(), "probs": self.probs.cpu()}
        return {"bank": bank, "filled": self.filled, "pointer": self.pointer}

    def set_extra_state(self, state: dict) -> None:
        bank = state.get("bank")
        # Copies, as load_state_dict copies buffers: the source module may go on writing its own bank.
        self.keys, self.probs = (None, None) if bank is None else (bank["keys"].clone(), bank["probs"].clone())
        self.filled, self.pointer = state["filled"], state["pointer"]


def batchnorm_moments(inputs: Tensor, layer: nn.BatchNorm2d) -> Tensor:
    """What a BatchNorm layer's input says about each image: [B, 2C], every channel's spatial mean and mean
    square, standardised by the layer's running statistics (0 on average over the teacher's training images)."""
    x = inputs.float()
    mean, var = layer.running_mean.float(), layer.running_var.float() + layer.eps
    second = var + mean.pow(2)  # E[x^2] over the teacher's training images
    return torch.cat([(x.mean((2, 3)) - mean) / var.sqrt(), (x.pow(2).mean((2, 3)) - second) / second], 1)


class TaskGate(nn.Module):
    """Which images belong to a teacher's task, read from its BatchNorm running statistics; and the student's
    slice mass pulled toward that.

    A BatchNorm teacher carries, in its running means and variances, the moments of its layers' inputs over its
    own training images: its task. In a pool that mixes tasks, the teacher's images are the ones whose moments,
    taken together, reproduce those statistics; images of other tasks shift them. A linear sigmoid gate over
    each image's standardised moments (``batchnorm_moments`` at every BatchNorm input) is fitted to that, with
    no labels: weighted by the gate, the batch's moments must be 0, and the gate's mean must stay at the task's
    prior share ``prior`` (the union prior's: the task's classes over all classes). This is information the
    teacher's soft targets do not carry: they say which of its classes an image resembles, not whether it is
    one of them.

    Returns two terms: ``task_gate_fit`` (mean squared weighted moment + ``prior_weight`` x the squared gap of
    the gate's mean to the prior + ``l2`` x the squared gate weights), which trains the gate alone since the
    moments come from the frozen teacher; and ``task_gate``, the binary cross-entropy of the student's mass on
    the teacher's slice (given as log-odds) against the detached gate.

    Args:
        num_moments: width of the moments (2 x the channels of all BatchNorm inputs read).
        prior: the task's expected share of the pool, in (0, 1).
    """

    def __init__(self, num_moments: int, prior: float, l2: float = 1e-2, prior_weight: float = 10.0) -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ValueError(f"task gate prior must be in (0, 1), got {prior}")
        self.prior, self.l2, self.prior_weight = prior, l2, prior_weight
        # Moments of different layers differ in scale by orders of magnitude; the gate sees them standardised.
        self.normalise = nn.BatchNorm1d(num_moments, affine=False)
        self.linear = nn.Linear(num_moments, 1)
        nn.init.zeros_(self.linear.weight)  # starts at the prior for every image
        nn.init.constant_(self.linear.bias, math.log(prior / (1 - prior)))

    def gate(self, moments: Tensor) -> Tensor:
        """[B, D] moments -> [B] probability that each image is of the teacher's task."""
        x = moments.to(self.linear.weight.dtype)  # float32, or bf16 when the module is (precision bf16-true)
        return torch.sigmoid(self.linear(self.normalise(x))).squeeze(1).float()

    def fit(self, moments: Tensor) -> tuple[Tensor, Tensor]:
        """[B, D] moments -> (the ``task_gate_fit`` term, the gate [B] with its graph)."""
        with torch.autocast(moments.device.type, enabled=False):
            moments = moments.float()
            g = self.gate(moments)
            matched = (g[:, None] * moments).sum(0) / g.sum().clamp_min(1e-6)
            fit = (matched.pow(2).mean() + self.prior_weight * (g.mean() - self.prior) ** 2
                   + self.l2 * self.linear.weight.pow(2).sum())
            return fit, g

    def log_odds(self, g: Tensor) -> Tensor:
        """The gate's evidence for the task against its prior: 0 where the gate says no more than the prior."""
        g = g.detach().float().clamp(1e-4, 1 - 1e-4)
        return torch.logit(g) - math.log(self.prior / (1 - self.prior))

    def forward(self, moments: Tensor, slice_log_odds: Tensor) -> dict[str, Tensor]:
        """``slice_log_odds`` [B]: log(m / (1 - m)) of the student's mass m on the teacher's slice. Given as
        log-odds so that the cross-entropy keeps its gradient where the student is confidently wrong (a mass
        clamped away from 0 and 1 would have none)."""
        fit, g = self.fit(moments)
        with torch.autocast(slice_log_odds.device.type, enabled=False):
            task_gate = F.binary_cross_entropy_with_logits(slice_log_odds.float(), g.detach())
            return {"task_gate_fit": fit, "task_gate": task_gate}


def gated_task_loss(log_task: Tensor, log_odds: Tensor) -> Tensor:
    """Cross-entropy of the student's task distribution against itself reweighted by the gates' evidence.

    ``log_task`` [B, tasks] is the log of the student's mass on each teacher's slice (rows sum to 1);
    ``log_odds`` [B, tasks] each gate's ``TaskGate.log_odds`` (0 for a teacher without a gate). The target is
    the product of the two, renormalised over tasks: a gate that says nothing beyond its prior leaves the
    target at the student's own belief and the gradient at zero, where pulling toward an uncalibrated gate
    (``TaskGate``'s own term) would drag every image's slice mass toward the gate's value.
    """
    with torch.autocast(log_task.device.type, enabled=False):
        target = F.softmax(log_task.detach().float() + log_odds.float(), dim=1)
        return -(target * log_task.float()).sum(1).mean()
