"""Losses against naive float64 references."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import SIZE, student, teacher

from amalgam import AmalgamationModule
from amalgam.losses import (
    PAPER_BANDWIDTHS,
    MultiBandwidthMMD,
    NeighbourConsistency,
    ReconstructionLoss,
    SelfLabel,
    SoftTargetKD,
    TaskGate,
    UnionPrior,
    ViewContrast,
    batchnorm_moments,
    gated_task_loss,
)


def naive_mmd2(x, y, sigmas):
    """Textbook biased MMD^2 with explicit double loops, float64."""
    x = F.normalize(x.double().flatten(1), dim=1)
    y = F.normalize(y.double().flatten(1), dim=1)

    def k(a, b):
        d = ((a - b) ** 2).sum()
        return sum(math.exp(-d.item() / (2 * s * s)) for s in sigmas)

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return max(0.0, kxx + kyy - 2 * kxy)


def test_mmd_matches_naive_reference_for_each_teacher_and_sums():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 4, 2, 2, generator=g)
    t1 = torch.randn(6, 4, 2, 2, generator=g) + 0.5
    t2 = torch.randn(5, 4, 2, 2, generator=g) * 2
    sigmas = (0.1, 0.5, 1.0, 2.0)
    mmd = MultiBandwidthMMD(sigmas)
    expected = naive_mmd2(s, t1, sigmas) + naive_mmd2(s, t2, sigmas)
    assert mmd(s, [t1, t2]).item() == pytest.approx(expected, rel=1e-5)
    assert mmd(s, [t1]).item() == pytest.approx(naive_mmd2(s, t1, sigmas), rel=1e-5)


def test_mmd_identical_sets_is_zero_and_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g) + 1
    mmd = MultiBandwidthMMD()
    assert mmd(a, [a.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd(a, [b]).item() == pytest.approx(mmd(b, [a]).item(), rel=1e-6)
    assert mmd(a, [b]).item() > 1e-3


def test_mmd_known_value_two_points():
    # One sample each, unit vectors at 90 degrees: squared distance 2, so MMD^2 = 2 - 2 sum_s exp(-1/s^2).
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = 2 * len(PAPER_BANDWIDTHS) - 2 * sum(math.exp(-2 / (2 * s * s)) for s in PAPER_BANDWIDTHS)
    assert MultiBandwidthMMD()(x, [y]).item() == pytest.approx(expected, rel=1e-6)


def test_mmd_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g) + 0.3
    ref = MultiBandwidthMMD()(a, [b])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MultiBandwidthMMD()(a.bfloat16(), [b.bfloat16()])
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=0.05)


def test_mmd_gradient_flows_to_student_only_inputs():
    s = torch.randn(4, 8, requires_grad=True)
    MultiBandwidthMMD()(s, [torch.randn(4, 8) + 1]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_reconstruction_is_sum_of_mse():
    r = [torch.ones(2, 3), torch.zeros(2, 4)]
    t = [torch.zeros(2, 3), torch.full((2, 4), 2.0)]
    assert ReconstructionLoss()(r, t).item() == pytest.approx(1.0 + 4.0)


def naive_kl(p_logits, q_logits, temperature):
    """KL(softmax(q/T) || softmax(p/T)) averaged over rows, float64."""
    p = (p_logits.double() / temperature).softmax(1)
    q = (q_logits.double() / temperature).softmax(1)
    return (q * (q.log() - p.log())).sum(1).mean().item()


def test_kd_concat_is_kl_against_concatenated_teachers():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g)
    t1, t2 = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    kd = SoftTargetKD("concat", temperature=1.0)
    assert kd(s, [t1, t2], [(0, 3), (3, 7)]).item() == pytest.approx(naive_kl(s, torch.cat([t1, t2], 1), 1.0),
                                                                     rel=1e-5)
    # At T != 1 (kd: concat with another temperature, union_kd) the KL is scaled by T^2, as in slice mode.
    assert SoftTargetKD("concat", temperature=4.0)(s, [t1, t2], [(0, 3), (3, 7)]).item() == pytest.approx(
        16 * naive_kl(s, torch.cat([t1, t2], 1), 4.0), rel=1e-5)
    # KL equals the paper's cross-entropy minus the (constant) teacher entropy.
    q = torch.cat([t1, t2], 1).softmax(1)
    ce = -(q * s.log_softmax(1)).sum(1).mean()
    entropy = -(q * q.log()).sum(1).mean()
    assert kd(s, [t1, t2], [(0, 3), (3, 7)]).item() == pytest.approx((ce - entropy).item(), rel=1e-5)


def test_kd_slice_sums_per_teacher_kl_scaled_by_t_squared():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 7, generator=g)
    t1, t2 = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    kd = SoftTargetKD("slice", temperature=4.0)
    expected = 16 * (naive_kl(s[:, :3], t1, 4.0) + naive_kl(s[:, 3:], t2, 4.0))
    assert kd(s, [t1, t2], [(0, 3), (3, 7)]).item() == pytest.approx(expected, rel=1e-5)
    # A student that matches each slice exactly has zero loss, even if slices are offset from each other.
    matched = torch.cat([t1, t2 + 100.0], 1)
    assert kd(matched, [t1, t2], [(0, 3), (3, 7)]).item() == pytest.approx(0.0, abs=1e-5)
    assert SoftTargetKD("concat")(matched, [t1, t2], [(0, 3), (3, 7)]).item() > 1.0


def test_kd_slice_weights_each_image_and_teacher_against_a_per_row_reference():
    g = torch.Generator().manual_seed(14)
    s = torch.randn(6, 7, generator=g)
    t1, t2 = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)
    weights = torch.rand(6, 2, generator=g) * 2
    kd = SoftTargetKD("slice", temperature=2.0)
    expected = 4 * sum(w[0] * naive_kl(s[i:i + 1, :3], t1[i:i + 1], 2.0) + w[1] * naive_kl(s[i:i + 1, 3:], t2[i:i + 1], 2.0)
                       for i, w in enumerate(weights.tolist())) / 6
    assert kd(s, [t1, t2], [(0, 3), (3, 7)], weights).item() == pytest.approx(expected, rel=1e-5)
    # All-ones weights are the unweighted loss; a zero column drops that teacher.
    assert kd(s, [t1, t2], [(0, 3), (3, 7)], torch.ones(6, 2)).item() == pytest.approx(
        kd(s, [t1, t2], [(0, 3), (3, 7)]).item(), rel=1e-6)
    only_b = torch.tensor([[0.0, 1.0]]).repeat(6, 1)
    assert kd(s, [t1, t2], [(0, 3), (3, 7)], only_b).item() == pytest.approx(4 * naive_kl(s[:, 3:], t2, 2.0),
                                                                            rel=1e-5)
    with pytest.raises(ValueError, match="slice"):
        SoftTargetKD("concat")(s, [t1, t2], [(0, 3), (3, 7)], weights)


def test_kd_takes_a_teacher_s_masked_class_as_probability_zero():
    # A teacher that masks a class with -inf gives it probability 0: KL's 0 log 0 is 0, in both modes, and the
    # loss equals that of the same teacher restricted to the classes it keeps.
    s = torch.randn(2, 3, generator=torch.Generator().manual_seed(15), requires_grad=True)
    t = torch.tensor([[2.0, 0.0, float("-inf")], [1.0, 1.0, 0.0]])
    for mode in ("slice", "concat"):
        loss = SoftTargetKD(mode, temperature=2.0)(s, [t], [(0, 3)])
        assert torch.isfinite(loss)
        q = (t.double() / 2).softmax(1)
        log_p = (s.detach().double() / 2).log_softmax(1)
        expected = 4 * torch.where(q > 0, q * (q.log() - log_p), 0.0).sum(1).mean().item()
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_kd_refuses_slices_that_do_not_fit_the_teachers():
    s = torch.randn(4, 5)
    t2, t3 = torch.randn(4, 2), torch.randn(4, 3)
    with pytest.raises(ValueError, match="2 teachers' logits but 1 slices"):
        SoftTargetKD("slice")(s, [t2, t3], [(0, 2)])
    with pytest.raises(ValueError, match=r"teacher 1 gives 3 logits but its slice \(2, 3\) holds 1"):
        SoftTargetKD("slice")(s, [t2, t3], [(0, 2), (2, 3)])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="concat"):
        SoftTargetKD("soft")
    with pytest.raises(ValueError, match="bandwidths"):
        MultiBandwidthMMD([0.0])


def test_union_prior_terms_match_definitions():
    from amalgam.losses import UnionPrior

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, generator=g) * 3
    p = z.double().softmax(1)
    mean_p = p.mean(0)
    terms = UnionPrior()(z)
    assert terms["balance"].item() == pytest.approx(math.log(4) + (mean_p * mean_p.log()).sum().item(), rel=1e-5)
    assert terms["entropy"].item() == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-5)
    # Uniform mean prediction: zero balance term; one-hot confident predictions: near-zero entropy.
    confident = torch.eye(4).repeat(2, 1) * 50
    assert UnionPrior()(confident)["balance"].item() == pytest.approx(0.0, abs=1e-6)
    assert UnionPrior()(confident)["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    # All images on one class: the balance term is log K minus zero.
    collapsed = torch.tensor([[50.0, 0, 0, 0]]).repeat(4, 1)
    assert UnionPrior()(collapsed)["balance"].item() == pytest.approx(math.log(4), rel=1e-4)


# ---------------------------------------------------------------- self-labelling


def naive_self_label(weak, strong, threshold, slices=None):
    """FixMatch with distribution alignment, one sample at a time, float64: (loss, kept fraction, labels, mask).
    With slices, the labels are tasks: aligned probabilities summed per slice give the label, and the strong
    view's slice probability (a sum of its softmax) is trained."""
    groups = slices or [(k, k + 1) for k in range(weak.shape[1])]
    probs = [row.double().softmax(0) for row in weak]
    mean = sum(probs) / len(probs)
    total, labels, mask = 0.0, [], []
    for p, s in zip(probs, strong):
        aligned = p / mean
        aligned = aligned / aligned.sum()
        scores = [aligned[a:b].sum().item() for a, b in groups]
        label = max(range(len(scores)), key=scores.__getitem__)
        keep = scores[label] >= threshold
        if keep:
            a, b = groups[label]
            total += -math.log(s.double().softmax(0)[a:b].sum().item())
        labels.append(label)
        mask.append(keep)
    return total / len(probs), sum(mask) / len(mask), torch.tensor(labels), torch.tensor(mask)


def pseudo_labels(weak, threshold=0.0):
    """The labels and mask SelfLabel used, read off the gradient at zero strong logits: row i's gradient is
    (1/K - onehot(label_i)) / B where kept, zero where masked."""
    strong = torch.zeros(weak.shape, requires_grad=True)
    loss, _ = SelfLabel(threshold)(weak, strong)
    loss.backward()
    return strong.grad.argmin(1), strong.grad.abs().sum(1) > 0


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_self_label_matches_a_per_sample_reference(threshold):
    g = torch.Generator().manual_seed(6)
    weak, strong = torch.randn(16, 5, generator=g) * 3, torch.randn(16, 5, generator=g) * 2
    loss, kept = SelfLabel(threshold)(weak, strong)
    expected, expected_kept, labels, mask = naive_self_label(weak, strong, threshold)
    assert loss.dtype == torch.float32 and loss.shape == kept.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert kept.item() == pytest.approx(expected_kept)
    got_labels, got_mask = pseudo_labels(weak, threshold)
    assert torch.equal(got_mask, mask)
    assert torch.equal(got_labels[mask], labels[mask])
    if threshold == 0.0:  # every row counts: the plain mean cross-entropy against the aligned labels
        assert kept.item() == 1.0 and mask.all()
        assert loss.item() == pytest.approx(F.cross_entropy(strong, labels).item(), rel=1e-5)
    if threshold == 0.5:  # the fixture really splits the batch
        assert 0.0 < kept.item() < 1.0


def test_self_label_masked_rows_count_in_the_mean_as_zero():
    g = torch.Generator().manual_seed(7)
    weak, strong = torch.randn(12, 4, generator=g) * 3, torch.randn(12, 4, generator=g)
    _, _, labels, mask = naive_self_label(weak, strong, 0.6)
    assert 0 < mask.sum() < len(mask)
    per_row = F.cross_entropy(strong, labels, reduction="none")
    loss, kept = SelfLabel(0.6)(weak, strong)
    # Averaged over the whole batch (FixMatch), not over the kept rows only.
    assert loss.item() == pytest.approx((per_row * mask).sum().item() / len(mask), rel=1e-5)
    assert loss.item() != pytest.approx(per_row[mask].mean().item(), rel=1e-3)
    assert kept.item() == pytest.approx(mask.float().mean().item())
    # Nothing confident enough: zero loss, nothing kept, and still a graph to backpropagate.
    flat = torch.zeros(12, 4)
    flat[:, 0] = torch.linspace(0, 0.01, 12)
    strong.requires_grad_(True)
    loss, kept = SelfLabel(0.9)(flat, strong)
    assert loss.item() == 0.0 and kept.item() == 0.0 and loss.requires_grad


def test_self_label_gradient_reaches_strong_logits_only():
    g = torch.Generator().manual_seed(8)
    weak = (torch.randn(8, 6, generator=g) * 3).requires_grad_(True)
    strong = torch.randn(8, 6, generator=g).requires_grad_(True)
    loss, kept = SelfLabel(0.0)(weak, strong)
    loss.backward()
    assert weak.grad is None, "the pseudo-label side must not be trained"
    assert strong.grad is not None and strong.grad.abs().sum() > 0
    assert not kept.requires_grad
    # The same tensor on both sides (as when views coincide): gradient only through the strong path.
    shared = (torch.randn(8, 6, generator=g) * 3).requires_grad_(True)
    SelfLabel(0.0)(shared, shared)[0].backward()
    expected = shared.detach().clone().requires_grad_(True)
    labels = naive_self_label(shared.detach(), shared.detach(), 0.0)[2]
    F.cross_entropy(expected, labels).backward()
    torch.testing.assert_close(shared.grad, expected.grad)


def test_self_label_alignment_removes_a_batch_wide_skew():
    # Every row gives class 0 the same probability and spreads the rest as a permutation of the same logits;
    # adding a constant to class 0 then scales each row's probabilities alike, which the division by the
    # batch mean undoes exactly.
    perms = torch.tensor([[2.0, 0.5, -1.0], [2.0, -1.0, 0.5], [0.5, 2.0, -1.0],
                          [-1.0, 2.0, 0.5], [0.5, -1.0, 2.0], [-1.0, 0.5, 2.0]])
    weak = torch.cat([torch.zeros(6, 1), perms], 1)
    skewed = weak + torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert (skewed.argmax(1) == 0).all() and not (weak.argmax(1) == 0).any()  # the skew wins a plain argmax
    labels, mask = pseudo_labels(weak)
    skewed_labels, skewed_mask = pseudo_labels(skewed)
    assert mask.all() and skewed_mask.all()
    assert torch.equal(labels, weak.argmax(1)) and torch.equal(skewed_labels, labels)
    assert not (skewed_labels == 0).any()
    strong = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    for threshold in (0.0, 0.4, 0.6):
        loss, kept = SelfLabel(threshold)(weak, strong)
        skewed_loss, skewed_kept = SelfLabel(threshold)(skewed, strong)
        assert skewed_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        assert skewed_kept.item() == kept.item()
    # Random rows under a strong skew: a plain argmax labels almost everything class 0, the aligned labels
    # still use every class.
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(10)) * 2 + torch.tensor([5.0, 0, 0, 0])
    assert (z.argmax(1) == 0).float().mean() > 0.8
    counts = pseudo_labels(z)[0].bincount(minlength=4)
    assert (counts > 0).all() and counts[0] < 0.8 * len(z)


def test_self_label_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(11)
    weak, strong = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g)
    ref, ref_kept = SelfLabel(0.5)(weak, strong)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, kept = SelfLabel(0.5)(weak.bfloat16(), strong.bfloat16())
    assert loss.dtype == torch.float32 and kept.item() == ref_kept.item()
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 0.95])
def test_task_self_label_matches_a_per_sample_reference(threshold):
    g = torch.Generator().manual_seed(12)
    slices = [(0, 3), (3, 5), (5, 9)]
    weak, strong = torch.randn(32, 9, generator=g) * 3, torch.randn(32, 9, generator=g) * 2
    loss, kept = SelfLabel(threshold)(weak, strong, slices)
    expected, expected_kept, _, mask = naive_self_label(weak, strong, threshold, slices)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert kept.item() == pytest.approx(expected_kept)
    if threshold == 0.8:  # the fixture really splits the batch
        assert 0 < sum(mask) < len(mask)
    # Summing per task makes a label more confident than any of its classes: never fewer images kept.
    assert kept.item() >= SelfLabel(threshold)(weak, strong)[1].item()


def test_task_self_label_leaves_the_distribution_inside_a_slice_free():
    g = torch.Generator().manual_seed(13)
    slices = [(0, 2), (2, 5)]
    weak = torch.randn(16, 5, generator=g) * 3
    strong = torch.randn(16, 5, generator=g).requires_grad_(True)
    loss, _ = SelfLabel(0.0)(weak, strong, slices)
    loss.backward()
    # Moving logits inside one slice while keeping its log-sum-exp leaves every slice mass, so the loss, as is.
    shifted = strong.detach().clone()
    shifted[:, 2:5] += torch.tensor([1.0, -2.0, 0.5])
    shifted[:, 2:5] += strong.detach()[:, 2:5].logsumexp(1, keepdim=True) - shifted[:, 2:5].logsumexp(1, keepdim=True)
    assert SelfLabel(0.0)(weak, shifted, slices)[0].item() == pytest.approx(loss.item(), rel=1e-5)
    # The class-level term does not have that freedom.
    assert SelfLabel(0.0)(weak, shifted)[0].item() != pytest.approx(SelfLabel(0.0)(weak, strong.detach())[0].item(),
                                                                  rel=1e-3)
    # Within a slice the gradient is proportional to the strong view's own probabilities: it scales the slice,
    # it does not reshape it.
    p = strong.detach().softmax(1)
    for a, b in slices:
        ratio = strong.grad[:, a:b] / p[:, a:b]
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)


def confident_batches(num_classes, batch, count, seed=16):
    """Batches of `batch` images, each confidently (logit margin 10) of its own random class."""
    g = torch.Generator().manual_seed(seed)
    return [F.one_hot(torch.randperm(num_classes, generator=g)[:batch], num_classes).float() * 10 for _ in range(count)]


def test_self_label_running_mean_follows_its_definition():
    g = torch.Generator().manual_seed(17)
    batches = [torch.randn(6, 4, generator=g) * 2 for _ in range(4)]
    loss = SelfLabel(0.0, momentum=0.7, num_classes=4)
    assert loss.mean_prediction.tolist() == [0.0] * 4  # nothing seen yet
    expected = None
    for weak in batches:
        mean = weak.softmax(1).mean(0)
        expected = mean if expected is None else 0.7 * expected + 0.3 * mean
        loss(weak, torch.zeros(6, 4))
        torch.testing.assert_close(loss.mean_prediction, expected)
    # The labels are those of the probabilities divided by that mean.
    weak = torch.randn(6, 4, generator=g) * 2
    expected = 0.7 * expected + 0.3 * weak.softmax(1).mean(0)
    strong = torch.zeros(6, 4, requires_grad=True)
    loss(weak, strong)[0].backward()
    assert torch.equal(strong.grad.argmin(1), (weak.softmax(1) / expected).argmax(1))


def test_self_label_keeps_confident_images_when_the_union_outnumbers_the_batch():
    # 40 classes, 8 images a batch, each image sure of its class. Dividing by one batch's mean lifts the 32
    # classes absent from it to the level of the present one: nothing reaches the threshold. The running mean
    # has seen every class, and keeps what a plain threshold would.
    batches = confident_batches(40, 8, 60)
    assert all((b.softmax(1).max(1).values >= 0.95).all() for b in batches)
    per_batch, running = SelfLabel(0.95, momentum=0.0), SelfLabel(0.95, momentum=0.9)
    kept_per_batch = [per_batch(b, b)[1].item() for b in batches]
    kept_running = [running(b, b)[1].item() for b in batches]
    assert max(kept_per_batch) == 0.0
    assert min(kept_running[30:]) == 1.0


def test_self_label_running_mean_is_saved_only_when_sized_for_the_union():
    def holder(**args):  # inside another module, as in AmalgamationModule: its keys then have a prefix
        return torch.nn.ModuleDict({"term": SelfLabel(0.5, **args)})

    batches = confident_batches(5, 4, 3)
    trained = holder(num_classes=5)
    for b in batches:
        trained["term"](b, b)
    state = trained.state_dict()
    assert set(state) == {"term.mean_prediction"} and state["term.mean_prediction"].sum().item() == pytest.approx(1.0)
    restored = holder(num_classes=5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored["term"].mean_prediction, trained["term"].mean_prediction)
    # A checkpoint from before the running mean loads, and the first batch then sets it.
    old = holder(num_classes=5)
    old.load_state_dict({})
    assert old["term"].mean_prediction.sum().item() == 0.0
    old["term"](batches[0], batches[0])
    torch.testing.assert_close(old["term"].mean_prediction, batches[0].softmax(1).mean(0))
    # Unsized (the term unused, or used on its own): nothing in the state dict, and a saved mean is dropped.
    unsized = holder()
    unsized["term"](batches[0], batches[0])
    assert unsized.state_dict() == {} and unsized["term"].mean_prediction.shape == (5,)
    unsized.load_state_dict(state)
    with pytest.raises(ValueError, match="momentum"):
        SelfLabel(0.5, momentum=1.0)


def test_self_label_running_mean_stays_float32_in_a_bf16_module():
    # precision bf16-true casts the module; a 1% update of a bf16 mean would round away.
    term = torch.nn.ModuleDict({"term": SelfLabel(0.5, momentum=0.99, num_classes=4)}).to(torch.bfloat16)["term"]
    assert term.mean_prediction.dtype == torch.float32
    first, second = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]]), torch.tensor([[0, 0, 3.0, 0], [0, 0, 0, 3.0]])
    term(first, first)
    term(second, second)
    expected = 0.99 * first.softmax(1).mean(0) + 0.01 * second.softmax(1).mean(0)
    torch.testing.assert_close(term.mean_prediction, expected)
    # Built under a bf16 default dtype (Trainer(precision="bf16-true").init_module()), or on the meta device
    # and then materialised: float32, and nothing seen yet.
    import lightning as L

    with L.Trainer(precision="bf16-true", accelerator="cpu", logger=False).init_module():
        built = SelfLabel(0.5, num_classes=4)
    with torch.device("meta"):
        meta = SelfLabel(0.5, num_classes=4)
    meta = meta.to_empty(device="cpu")
    for term in (built, meta):
        assert term.mean_prediction.dtype == torch.float32 and term.mean_prediction.sum() == 0
        term(first, first)
        term(second, second)
        torch.testing.assert_close(term.mean_prediction, expected)


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5, float("nan")])
def test_self_label_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        SelfLabel(threshold)


def test_a_pseudo_label_exactly_at_the_threshold_counts():
    weak = torch.zeros(4, 2)  # aligned probability exactly 0.5 for both classes
    assert SelfLabel(0.5)(weak, torch.zeros(4, 2))[1].item() == 1.0


def test_self_label_threshold_edges_are_accepted():
    assert SelfLabel(0.0).threshold == 0.0 and SelfLabel(0.999).threshold == 0.999
    assert SelfLabel().threshold == 0.95


def naive_view_contrast(a, b, temperature):
    """NT-Xent one row at a time, float64: row i's positive is its other view, every other row a negative."""
    z = torch.cat([F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)])
    n, total = len(a), 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        sims = [math.exp((z[i] @ z[j]).item() / temperature) for j in range(2 * n) if j != i]
        total += -((z[i] @ z[partner]).item() / temperature - math.log(sum(sims)))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_view_contrast_matches_a_per_row_reference(temperature):
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    got = ViewContrast(temperature)(a, b)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_view_contrast(a, b, temperature), rel=1e-5)


def test_view_contrast_is_low_when_views_agree_and_trains_both_views():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    agree = ViewContrast(0.1)(a, a + 0.01 * torch.randn(8, 16))
    unrelated = ViewContrast(0.1)(a, torch.randn(8, 16))
    assert agree.item() < 0.05 < math.log(15) * 0.5 < unrelated.item()
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    ViewContrast()(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_view_contrast_refuses_bad_inputs_by_name():
    with pytest.raises(ValueError, match="temperature"):
        ViewContrast(0.0)
    with pytest.raises(ValueError, match="same shape"):
        ViewContrast()(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------- self-labelling in the training step


def tiny_module(**args):
    torch.manual_seed(0)
    return AmalgamationModule([teacher("a", "resnet", tap="vector"), teacher("b", "resnet", tap="vector")],
                              student(tap="vector"), block_width=8, block_depth=1, **args)


def watch_step(module, images):
    """Runs one training step outside a Trainer; returns the loss, the terms it combined and the inputs of
    every student pass."""
    seen, passes = {}, []
    student_outputs, combine = module.student_outputs, module.combine_losses

    def counted(x):
        passes.append(x)
        out = student_outputs(x)
        seen.setdefault("outputs", []).append(out)
        return out

    def recorded(terms):
        seen["terms"] = dict(terms)
        return combine(terms)

    module.student_outputs, module.combine_losses = counted, recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training_step's self.log outside a Trainer
        loss = module.training_step(images, 0)
    return loss, seen, passes


def test_selflabel_weight_adds_a_term_trained_through_a_strong_view():
    module = tiny_module(loss_weights={"selflabel": 1.0}, selflabel_threshold=0.0)
    assert module.self_label.threshold == 0.0 and module.loss_weights["selflabel"] == 1.0
    images = torch.rand(8, 3, SIZE, SIZE)
    torch.manual_seed(1)
    loss, seen, passes = watch_step(module.train(), images)
    terms = seen["terms"]
    assert "selflabel" in terms and {"kd", "mmd", "recon"} <= set(terms)
    assert len(passes) == 2 and passes[0] is images
    strong = passes[1]
    assert strong.shape == images.shape and not torch.equal(strong, images)
    assert ((strong == 0).flatten(1).sum(1) > 0).all(), "the second pass is not the strong (cut-out) view"
    # The term is SelfLabel on (first pass, second pass), with threshold 0: every image counts, so it is > 0.
    weak_out, strong_out = seen["outputs"]
    expected, kept = SelfLabel(0.0)(weak_out.logits.detach(), strong_out.logits.detach())
    assert kept.item() == 1.0 and terms["selflabel"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["selflabel"].item() > 0
    total = sum(module.loss_weights[name] * value for name, value in terms.items())
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    # The self-labelling term alone trains the student (backbone and head).
    terms["selflabel"].backward()
    grads = [p.grad for p in module.student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    head = module.student.model.get_classifier().weight
    assert head.grad.abs().sum() > 0


def test_selflabel_off_by_default_costs_no_extra_student_pass():
    module = tiny_module()
    assert module.loss_weights["selflabel"] == 0
    _, seen, passes = watch_step(module.train(), torch.rand(8, 3, SIZE, SIZE))
    assert len(passes) == 1 and "selflabel" not in seen["terms"]
    assert set(seen["terms"]) == {"kd", "mmd", "recon"}
    assert not any(key.startswith("self_label") for key in module.state_dict())  # checkpoints keep their keys
    # Switched on, the same module config pays exactly one more pass, and checkpoints keep the running mean.
    module = tiny_module(loss_weights={"selflabel": 0.5})
    assert module.self_label.threshold == 0.95
    _, seen, passes = watch_step(module.train(), torch.rand(8, 3, SIZE, SIZE))
    assert len(passes) == 2 and "selflabel" in seen["terms"]
    saved = module.state_dict()["self_label.mean_prediction"]
    assert saved.shape == (module.num_classes,) and saved.sum().item() == pytest.approx(1.0)


def test_selflabel_target_task_labels_the_teachers_slices():
    module = tiny_module(loss_weights={"selflabel": 1.0}, selflabel_threshold=0.0, selflabel_target="task")
    torch.manual_seed(1)
    _, seen, passes = watch_step(module.train(), torch.rand(8, 3, SIZE, SIZE))
    assert len(passes) == 2
    weak_out, strong_out = seen["outputs"]
    expected, _ = SelfLabel(0.0)(weak_out.logits.detach(), strong_out.logits.detach(), module.slices)
    assert seen["terms"]["selflabel"].item() == pytest.approx(expected.item(), rel=1e-5)
    by_class, _ = SelfLabel(0.0)(weak_out.logits.detach(), strong_out.logits.detach())
    assert seen["terms"]["selflabel"].item() != pytest.approx(by_class.item(), rel=1e-3)
    with pytest.raises(ValueError, match="selflabel_target"):
        tiny_module(selflabel_target="slice")


def test_kd_task_weighting_follows_the_student_s_own_slice_mass():
    kd = dict(kd="slice", temperature=2.0)
    module = tiny_module(kd_task_weighting=1.0, **kd)
    # Image 0 sits in slice a, image 1 in slice b, image 2 is undecided.
    logits = torch.full((3, module.num_classes), -10.0)
    a, b = module.slices
    logits[0, a[0]] = logits[1, b[0]] = 10.0
    logits[2] = 0.0
    weights = module.kd_task_weights(logits.requires_grad_(True))
    assert not weights.requires_grad
    torch.testing.assert_close(weights.mean(0), torch.ones(2))  # each teacher keeps its total weight
    assert weights[0, 0] > 1 > weights[0, 1] and weights[1, 1] > 1 > weights[1, 0]
    mass = logits.detach().softmax(1)
    belief = torch.stack([mass[:, a[0]:a[1]].sum(1), mass[:, b[0]:b[1]].sum(1)], 1)
    torch.testing.assert_close(weights, belief / belief.mean(0))
    half = tiny_module(kd_task_weighting=0.5, **kd).kd_task_weights(logits)
    torch.testing.assert_close(half, 0.5 + 0.5 * weights)
    # In the step: the kd term is the weighted one; off, it is the plain one.
    torch.manual_seed(1)
    _, seen, _ = watch_step(module.train(), torch.rand(8, 3, SIZE, SIZE))
    assert "kd" in seen["terms"]
    plain = tiny_module(**kd)
    torch.manual_seed(1)
    _, seen_plain, _ = watch_step(plain.train(), torch.rand(8, 3, SIZE, SIZE))
    assert seen["terms"]["kd"].item() != pytest.approx(seen_plain["terms"]["kd"].item(), rel=1e-4)
    for bad, match in (({"kd_task_weighting": 1.5, **kd}, "kd_task_weighting"),
                       ({"kd_task_weighting": 1.0, "kd": "concat"}, "kd: slice")):
        with pytest.raises(ValueError, match=match):
            tiny_module(**bad)


def test_selflabel_threshold_is_checked_when_the_module_is_built():
    with pytest.raises(ValueError, match="threshold"):
        tiny_module(loss_weights={"selflabel": 1.0}, selflabel_threshold=1.0)


def naive_neighbour_losses(batches, bank_size, k):
    """Per batch, the neighbour loss from plain Python lists: the bank is every earlier image's (key, softmax),
    of which only the last bank_size count; neighbours by cosine similarity, sorted by hand."""
    bank, losses = [], []
    for keys, logits in batches:
        keys = F.normalize(keys.double(), dim=1)
        probs = logits.double().softmax(1)
        recent = bank[-bank_size:]
        if len(recent) < k:
            losses.append(0.0)
        else:
            per_image = []
            for key, p in zip(keys, probs):
                ranked = sorted(recent, key=lambda entry: -float(key @ entry[0]))
                target = sum(entry[1] for entry in ranked[:k]) / k
                per_image.append(-math.log(float(p @ target)))
            losses.append(sum(per_image) / len(per_image))
        bank += list(zip(keys, probs))
    return losses


@pytest.mark.parametrize("bank_size, k, batch", [(7, 3, 4), (16, 1, 5), (4, 4, 6)])
def test_neighbour_consistency_matches_naive_reference_across_ring_buffer_wraps(bank_size, k, batch):
    g = torch.Generator().manual_seed(bank_size + k)
    batches = [(torch.randn(batch, 6, generator=g), torch.randn(batch, 5, generator=g) * 2) for _ in range(6)]
    loss = NeighbourConsistency(bank_size, k)
    got = [loss(keys, logits).item() for keys, logits in batches]
    assert got == pytest.approx(naive_neighbour_losses(batches, bank_size, k), rel=1e-5, abs=1e-7)
    assert loss.filled == bank_size  # 6 batches overfill every bank: it stays at its size


def test_neighbour_consistency_pulls_an_image_toward_its_neighbours_class():
    # Bank: 3 images near key e0 that the student put in class 2, 3 near e1 put in class 0.
    loss = NeighbourConsistency(bank_size=8, k=3)
    near = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    loss(near, torch.tensor([[0.0, 0.0, 9.0]] * 3 + [[9.0, 0.0, 0.0]] * 3))
    logits = torch.zeros(1, 3, requires_grad=True)
    loss(torch.tensor([[1.0, 0.02]]), logits).backward()
    assert logits.grad.argmin().item() == 2  # a descent step raises class 2, the neighbours' class
    assert loss.filled == 7 and loss.pointer == 7


def test_neighbour_consistency_keeps_its_gradient_when_the_student_is_confidently_wrong():
    # Neighbours all in class 0, the student sure of class 1: the loss is large and must still train.
    loss = NeighbourConsistency(4, k=1)
    keys = torch.eye(4)
    loss(keys, torch.tensor([[30.0, 0, 0, 0]] * 4))
    wrong = torch.tensor([[0.0, 30.0, 0, 0]] * 4, requires_grad=True)
    value = loss(keys, wrong)
    value.backward()
    target = torch.tensor([30.0, 0, 0, 0], dtype=torch.float64).softmax(0)
    expected = -math.log(torch.tensor([0.0, 30.0, 0, 0], dtype=torch.float64).softmax(0) @ target)  # ~ 30 - log 2
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert wrong.grad[:, 0].max() < -0.1 and wrong.grad[:, 1].min() > 0.1  # toward class 0, away from 1


def test_neighbour_consistency_is_zero_until_k_entries_and_keeps_the_graph():
    loss = NeighbourConsistency(bank_size=10, k=4)
    logits = torch.randn(3, 5, requires_grad=True)
    first = loss(torch.randn(3, 2), logits)
    assert first.item() == 0.0 and first.requires_grad and loss.filled == 3
    assert loss(torch.randn(3, 2), torch.randn(3, 5)).item() == 0.0  # 3 < k entries before this batch
    assert loss(torch.randn(3, 2), torch.randn(3, 5)).item() > 0.0  # 6 >= k
    loss.reset()
    assert loss.filled == 0 and loss(torch.randn(3, 2), torch.randn(3, 5)).item() == 0.0


def test_neighbour_bank_survives_a_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)) for _ in range(5)]
    original = NeighbourConsistency(bank_size=6, k=2)
    for keys, logits in batches[:3]:
        original(keys, logits)
    restored = NeighbourConsistency(bank_size=6, k=2)
    restored.load_state_dict(original.state_dict())
    for keys, logits in batches[3:]:
        assert restored(keys, logits).item() == original(keys, logits).item()
    assert (restored.filled, restored.pointer) == (original.filled, original.pointer)


def test_neighbour_consistency_computes_in_float32_under_bf16():
    keys, logits = torch.randn(6, 4), torch.randn(6, 5)
    loss = NeighbourConsistency(bank_size=6, k=2)
    loss(keys, logits)
    expected = loss(keys, logits).item()
    loss.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(keys.bfloat16(), logits.bfloat16())
        got = loss(keys.bfloat16(), logits.bfloat16())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=2e-2)


@pytest.mark.parametrize("bank_size, k", [(0, 1), (4, 0), (4, 5)])
def test_neighbour_consistency_rejects_bad_sizes(bank_size, k):
    with pytest.raises(ValueError, match="bank_size"):
        NeighbourConsistency(bank_size, k)


def test_neighbour_weight_adds_a_term_on_the_teachers_joint_features():
    module = tiny_module(loss_weights={"neighbour": 1.0}, neighbour_bank_size=8, neighbour_k=2).train()
    assert tiny_module().neighbour_loss is None  # off by default: no bank, nothing in checkpoints
    first = torch.rand(8, 3, SIZE, SIZE)
    _, seen, _ = watch_step(module, first)
    assert seen["terms"]["neighbour"].item() == 0.0 and module.neighbour_loss.filled == 8
    # The bank's keys are the teachers' features, each L2-normalised, side by side.
    teachers = module.teacher_outputs(first)
    expected_keys = torch.cat([F.normalize(t.taps[-1].flatten(1), dim=1) for t in teachers], 1)
    assert torch.allclose(module.neighbour_loss.keys, F.normalize(expected_keys, dim=1), atol=1e-6)
    # The next batch's term is the loss's own value on those keys, and it trains the student's head.
    second = torch.rand(8, 3, SIZE, SIZE)
    reference = NeighbourConsistency(8, 2)
    reference.load_state_dict(module.neighbour_loss.state_dict())
    _, seen, _ = watch_step(module, second)
    expected = reference(module.neighbour_keys(module.teacher_outputs(second)), seen["outputs"][0].logits.detach())
    assert seen["terms"]["neighbour"].item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    seen["terms"]["neighbour"].backward()
    assert module.student.model.get_classifier().weight.grad.abs().sum() > 0
    # The bank is checkpointed with the module.
    assert "neighbour_loss._extra_state" in module.state_dict()


def test_neighbour_keys_average_feature_maps_over_positions():
    module = AmalgamationModule([teacher("a", "resnet"), teacher("b", "resnet")], student(),
                                block_width=8, block_depth=1, loss_weights={"neighbour": 1.0})
    teachers = module.teacher_outputs(torch.rand(4, 3, SIZE, SIZE))
    assert teachers[0].taps[-1].ndim == 4
    keys = module.neighbour_keys(teachers)
    maps = [F.normalize(t.taps[-1].mean((2, 3)), dim=1) for t in teachers]
    assert torch.allclose(keys, torch.cat(maps, 1), atol=1e-6)


def test_neighbour_term_needs_tapped_teachers():
    with pytest.raises(ValueError, match=r"teachers \['a', 'b'\] have no taps"):
        AmalgamationModule([teacher("a", "resnet", tap=None), teacher("b", "resnet", tap=None)], student(tap=None),
                           loss_weights={"neighbour": 1.0})


def test_contrast_term_compares_the_projected_last_tap_of_both_passes():
    module = tiny_module(loss_weights={"contrast": 1.0, "selflabel": 1.0})
    assert module.projector is not None and tiny_module().projector is None
    torch.manual_seed(1)
    _, seen, passes = watch_step(module.train(), torch.rand(8, 3, SIZE, SIZE))
    # Self-labelling and contrast share the one strong pass.
    assert len(passes) == 2 and {"selflabel", "contrast"} <= set(seen["terms"])
    weak_out, strong_out = seen["outputs"]
    expected = ViewContrast(0.2)(module.projector(weak_out.taps[-1]), module.projector(strong_out.taps[-1]))
    assert seen["terms"]["contrast"].item() == pytest.approx(expected.item(), rel=1e-5)
    seen["terms"]["contrast"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.projector.parameters())
    assert module.student.model.conv1.weight.grad.abs().sum() > 0
    assert "projector" in [g["name"] for g in module.parameter_groups()]
    # Contrast alone still pays for the strong pass, and adds no self-labelling term.
    _, seen, passes = watch_step(tiny_module(loss_weights={"contrast": 0.5}).train(), torch.rand(8, 3, SIZE, SIZE))
    assert len(passes) == 2 and "contrast" in seen["terms"] and "selflabel" not in seen["terms"]


def test_contrast_on_a_feature_map_pools_it_and_needs_a_tap():
    torch.manual_seed(0)
    module = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1,
                                loss_weights={"contrast": 1.0}, contrast_dim=7)
    assert module.projector[0].in_features == 16 and module.projector[-1].out_features == 7
    _, seen, _ = watch_step(module.train(), torch.rand(4, 3, SIZE, SIZE))
    assert torch.isfinite(seen["terms"]["contrast"])
    with pytest.raises(ValueError, match="student has no taps"):
        AmalgamationModule([teacher("a", "resnet", tap=None)], student(tap=None), loss_weights={
            "contrast": 1.0, "mmd": 0.0, "recon": 0.0})


# ---------------------------------------------------------------- the BatchNorm task gate


def test_batchnorm_moments_match_a_per_image_per_channel_reference():
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3)
    layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    x = torch.randn(4, 3, 5, 6)
    got = batchnorm_moments(x, layer)
    assert got.shape == (4, 6)
    for i in range(4):
        for c in range(3):
            mu, var = layer.running_mean[c].double(), layer.running_var[c].double() + layer.eps
            pixels = x[i, c].double().flatten()
            assert got[i, c].item() == pytest.approx(((pixels.mean() - mu) / var.sqrt()).item(), rel=1e-4, abs=1e-5)
            second = var + mu ** 2
            expected = ((pixels ** 2).mean() - second) / second
            assert got[i, 3 + c].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    # Images drawn like the running statistics have moments near 0 on average.
    like = torch.randn(2000, 3, 4, 4) * layer.running_var.sqrt()[:, None, None] + layer.running_mean[:, None, None]
    assert batchnorm_moments(like, layer).mean(0).abs().max() < 0.05


def test_task_gate_terms_match_their_definitions():
    torch.manual_seed(0)
    gate = TaskGate(6, prior=0.3, l2=0.1, prior_weight=2.0)
    assert torch.allclose(gate.gate(torch.randn(5, 6)), torch.full((5,), 0.3))  # starts at the prior
    torch.nn.init.normal_(gate.linear.weight)
    moments, mass = torch.randn(8, 6), torch.rand(8)
    terms = gate(moments, torch.logit(mass))
    # Reference: the gate on batch-standardised moments, in float64, row by row.
    z = (moments.double() - moments.double().mean(0)) / (moments.double().var(0, unbiased=False) + 1e-5).sqrt()
    w, b = gate.linear.weight.double()[0], gate.linear.bias.double()[0]
    g = [1 / (1 + math.exp(-(z[i] @ w + b).item())) for i in range(8)]
    matched = sum(g[i] * moments[i].double() for i in range(8)) / sum(g)
    fit = matched.pow(2).mean().item() + 2.0 * (sum(g) / 8 - 0.3) ** 2 + 0.1 * (w ** 2).sum().item()
    bce = -sum(g[i] * math.log(mass[i]) + (1 - g[i]) * math.log(1 - mass[i]) for i in range(8)) / 8
    assert terms["task_gate_fit"].item() == pytest.approx(fit, rel=1e-4)
    assert terms["task_gate"].item() == pytest.approx(bce, rel=1e-4)


def test_task_gate_fit_finds_the_images_that_reproduce_the_running_statistics():
    # A pool of 40% in-task images (moments 0 on average, as the running statistics say) and 60% images of
    # other tasks (moments shifted along some channels): fitting the gate alone must single out the first.
    torch.manual_seed(0)
    n, d = 1000, 12
    in_task = torch.rand(n) < 0.4
    shift = torch.zeros(d)
    shift[:4] = 1.5
    moments = torch.randn(n, d) * 0.5 + (~in_task)[:, None] * shift
    gate = TaskGate(d, prior=0.4)
    opt = torch.optim.Adam(gate.parameters(), lr=2e-2)
    for _ in range(300):
        loss = gate(moments, torch.zeros(n))["task_gate_fit"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = gate.eval().gate(moments).detach()
    assert g[in_task].mean() > 0.7 > 0.2 > g[~in_task].mean()
    assert abs(g.mean().item() - 0.4) < 0.05


def test_task_gate_fit_trains_the_gate_and_the_target_trains_only_the_student():
    gate = TaskGate(4, prior=0.5)
    moments = torch.randn(6, 4)
    log_odds = torch.randn(6, requires_grad=True)
    terms = gate(moments, log_odds)
    terms["task_gate"].backward(retain_graph=True)
    assert log_odds.grad.abs().sum() > 0 and gate.linear.weight.grad is None  # the gate is a detached target
    terms["task_gate_fit"].backward()
    assert gate.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prior"):
        TaskGate(4, prior=1.0)


def test_task_gate_target_keeps_its_gradient_when_the_student_is_confidently_wrong():
    gate = TaskGate(4, prior=0.5)
    torch.nn.init.constant_(gate.linear.bias, 5.0)  # the gate says: in the task
    log_odds = torch.full((3,), -20.0, requires_grad=True)  # the student: mass ~2e-9 on the slice
    terms = gate(torch.randn(3, 4), log_odds)
    terms["task_gate"].backward()
    g = torch.sigmoid(torch.tensor(5.0)).item()
    assert terms["task_gate"].item() == pytest.approx(g * 20 + math.log1p(math.exp(-20)), rel=1e-4)
    assert log_odds.grad.max().item() == pytest.approx(-g / 3, rel=1e-4)  # d/dx of BCE-with-logits: (sigmoid(x) - g) / B


def test_task_gate_weight_gates_every_batchnorm_teacher_from_its_own_layer_inputs():
    torch.manual_seed(0)
    vit = teacher("b", "vit", tap="vector")
    module = AmalgamationModule([teacher("a", "resnet", tap="vector"), vit], student(tap="vector"),
                                block_width=8, block_depth=1, loss_weights={"task_gate": 1.0})
    assert tiny_module().task_gates is None  # off by default: nothing in checkpoints
    assert list(module.task_gates) == ["a"]  # the ViT teacher has no BatchNorm
    layers = [m for m in module.teachers[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert module.task_gates["a"].linear.in_features == 2 * sum(m.num_features for m in layers)
    assert "task_gate" in [g["name"] for g in module.parameter_groups()]
    images = torch.rand(8, 3, SIZE, SIZE)
    loss, seen, _ = watch_step(module.train(), images)
    terms = seen["terms"]
    assert {"task_gate", "task_gate_fit"} <= set(terms)
    # The terms are TaskGate's own on the moments of the teacher's BatchNorm inputs and the student's slice mass.
    reference_gate = TaskGate(module.task_gates["a"].linear.in_features, prior=2 / 5)
    reference_gate.load_state_dict(module.task_gates["a"].state_dict())
    reference_gate.normalise.running_mean.zero_()
    reference_gate.normalise.running_var.fill_(1)
    seen_inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen_inputs.append(batchnorm_moments(i[0], m))) for m in layers]
    module.eval()
    module.teachers[0](images)
    for hook in hooks:
        hook.remove()
    mass = F.softmax(seen["outputs"][0].logits.detach().double(), 1)[:, :2].sum(1)
    expected = reference_gate(torch.cat(seen_inputs, 1), torch.log(mass / (1 - mass)).float())
    assert terms["task_gate"].item() == pytest.approx(expected["task_gate"].item(), rel=1e-4)
    assert terms["task_gate_fit"].item() == pytest.approx(expected["task_gate_fit"].item(), rel=1e-4)
    # The fit counts with weight 1 whatever task_gate's weight: it trains the gate only.
    assert loss.item() == pytest.approx(sum((1.0 if k == "task_gate_fit" else module.loss_weights[k]) * v.item()
                                            for k, v in terms.items()), rel=1e-5)
    terms["task_gate"].backward(retain_graph=True)
    assert module.student.model.get_classifier().weight.grad.abs().sum() > 0
    assert module.task_gates["a"].linear.weight.grad is None
    terms["task_gate_fit"].backward()
    assert module.task_gates["a"].linear.weight.grad.abs().sum() > 0


def test_task_gate_reads_a_view_and_its_mirror_averaged_under_teacher_flip_average():
    torch.manual_seed(0)
    module = AmalgamationModule([teacher("a", "resnet", tap="vector"), teacher("b", "vit", tap="vector")],
                                student(tap="vector"), block_width=8, block_depth=1,
                                loss_weights={"task_gate": 1.0}, teacher_flip_average=True).train()
    gate, seen = module.task_gates["a"], []
    forward = gate.forward
    gate.forward = lambda moments, log_odds: (seen.append(moments.clone()), forward(moments, log_odds))[1]
    images, logits = torch.rand(4, 3, SIZE, SIZE), torch.randn(4, 5)
    for view in (images, images.flip(-1)):
        module.teacher_outputs(view)
        module.task_gate_terms(logits)
    # The moments of a batch and of its mirror image are the same: each is the mean over both views.
    torch.testing.assert_close(seen[0], seen[1])
    layers = [m for m in module.teachers[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    per_view = []
    for view in (images, images.flip(-1)):
        inputs: list = []
        hooks = [m.register_forward_pre_hook(lambda m, i, seen=inputs: seen.append(batchnorm_moments(i[0], m)))
                 for m in layers]
        module.teachers[0](view)
        for hook in hooks:
            hook.remove()
        per_view.append(torch.cat(inputs[: len(layers)], 1))
    torch.testing.assert_close(seen[0], (per_view[0] + per_view[1]) / 2, rtol=1e-4, atol=1e-5)


def test_task_gate_names_what_it_cannot_work_with():
    with pytest.raises(ValueError, match=r"none of the teachers \['a'\] has BatchNorm"):
        AmalgamationModule([teacher("a", "vit", tap="vector")], student(tap="vector"),
                           loss_weights={"task_gate": 1.0})
    with pytest.raises(ValueError, match="teacher_cache"):
        AmalgamationModule([teacher("a", "resnet", tap="vector")], student(tap="vector"),
                           loss_weights={"task_gate": 1.0}, teacher_cache=64)
    with pytest.raises(ValueError, match="task_gate_target"):
        AmalgamationModule([teacher("a", "resnet", tap="vector")], student(tap="vector"),
                           loss_weights={"task_gate": 1.0}, task_gate_target="gates")


def test_gated_task_loss_matches_a_naive_product_of_experts_and_ignores_a_silent_gate():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    log_task = logits.log_softmax(1)
    log_odds = torch.randn(5, 3)
    loss = gated_task_loss(log_task, log_odds)
    expected = 0.0
    for row in range(5):  # target: the student's belief times the gates' odds, renormalised
        weights = [math.exp(log_task[row, t].item() + log_odds[row, t].item()) for t in range(3)]
        expected -= sum(w / sum(weights) * log_task[row, t].item() for t, w in enumerate(weights)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # Cross-entropy's gradient on the logits is (belief - target) / B: toward the tasks the gates favour.
    target = F.softmax(log_task.detach() + log_odds, 1)
    assert torch.allclose(logits.grad, (log_task.exp().detach() - target) / 5, atol=1e-6)
    # A gate at its prior (odds 0, or the same shift for every task) moves nothing.
    for silent in (torch.zeros(5, 3), torch.full((5, 3), 0.7)):
        logits.grad = None
        gated_task_loss(logits.log_softmax(1), silent).backward()
        assert logits.grad.abs().max() < 1e-6


def test_task_gate_log_odds_are_zero_at_the_prior_and_follow_the_gate():
    gate = TaskGate(4, prior=0.25)
    _, g = gate.fit(torch.randn(6, 4))
    assert torch.allclose(g, torch.full((6,), 0.25))  # starts at the prior
    assert gate.log_odds(g).abs().max() < 1e-5
    assert gate.log_odds(torch.tensor([0.5, 0.1])).tolist() == pytest.approx([math.log(3), math.log(1 / 9 * 3)],
                                                                             rel=1e-4)


def test_product_target_pulls_every_slice_by_its_own_gate_and_trains_the_gates():
    torch.manual_seed(0)
    module = AmalgamationModule([teacher("a", "resnet", tap="vector"), teacher("b", "resnet", tap="vector")],
                                student(tap="vector"), block_width=8, block_depth=1,
                                loss_weights={"task_gate": 1.0}, task_gate_target="product")
    assert sorted(module.task_gates) == ["a", "b"]
    images = torch.rand(8, 3, SIZE, SIZE)
    loss, seen, _ = watch_step(module.train(), images)
    terms = seen["terms"]
    assert {"task_gate", "task_gate_fit"} <= set(terms)
    # Fresh gates sit at their priors: the product target is the student's own belief, the term its entropy.
    logits = seen["outputs"][0].logits.detach()
    log_task = torch.stack([logits.log_softmax(1)[:, a:b].logsumexp(1) for a, b in module.slices], 1)
    assert terms["task_gate"].item() == pytest.approx(-(log_task.exp() * log_task).sum(1).mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(sum((1.0 if k == "task_gate_fit" else module.loss_weights[k]) * v.item()
                                            for k, v in terms.items()), rel=1e-5)
    terms["task_gate_fit"].backward(retain_graph=True)
    assert all(g.linear.weight.grad.abs().sum() > 0 for g in module.task_gates.values())


def _batch_statistics_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    from amalgam.losses import SelfLabel, UnionPrior

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    logits, strong = torch.randn(8, 5) * 3, torch.randn(8, 5)
    mine = logits[rank::world].clone().requires_grad_(True)
    balance = UnionPrior()(mine)["balance"]
    balance.backward()
    selflabel, _ = SelfLabel(threshold=0.5)(mine.detach(), strong[rank::world])
    torch.save({"balance": balance.detach(), "grad": mine.grad, "selflabel": selflabel}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_batch_statistics_span_every_ddp_process(tmp_path):
    """Under DDP the union prior's mean prediction and self-labelling's alignment see the whole batch: the
    same value as one process with every row, and gradients that DDP's averaging turns into that process's."""
    world = 2
    torch.multiprocessing.spawn(_batch_statistics_worker, args=(world, str(tmp_path)), nprocs=world)
    torch.manual_seed(0)
    logits, strong = torch.randn(8, 5) * 3, torch.randn(8, 5)
    full = logits.clone().requires_grad_(True)
    balance = UnionPrior()(full)["balance"]
    balance.backward()
    selflabel, _ = SelfLabel(threshold=0.5)(logits, strong)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["balance"], balance.detach())
        # All-reduce's backward sums the processes' gradients; DDP then divides by the number of processes.
        torch.testing.assert_close(got["grad"] / world, full.grad[r::world])
    torch.testing.assert_close(sum(got["selflabel"] for got in ranks) / world, selflabel)
