"""Losses against naive float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from amalgam.losses import PAPER_BANDWIDTHS, MultiBandwidthMMD, ReconstructionLoss, SoftTargetKD


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
