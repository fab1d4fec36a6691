"""MEDL's evidential functions on tiny tensors with values known by hand (2D and 3D)."""

import math

import pytest
import torch
from scipy.special import polygamma

from nnssl.losses.evidential import (caef_fusion, curriculum_weight, dirichlet_alpha, expected_log_probs,
                                     fisher_evidential_loss, opinion, reliability, tetragamma, trigamma,
                                     weighted_dice_ce)
from nnssl.ops.tensors import class_argmax

SPATIAL = [(2, 3), (2, 2, 3)]


def _opinion(beliefs, u, spatial):
    b = torch.tensor(beliefs, dtype=torch.float32).view(1, -1, *[1] * len(spatial)).expand(1, len(beliefs), *spatial)
    return b.clone(), torch.full((1, 1, *spatial), float(u))


@pytest.mark.parametrize("spatial", SPATIAL)
def test_opinion_sums_to_one_and_matches_alpha(spatial):
    logits = torch.randn(2, 3, *spatial) * 3
    alpha = dirichlet_alpha(logits)
    b, u = opinion(alpha)
    assert torch.allclose(b.sum(1, keepdim=True) + u, torch.ones_like(u))
    assert torch.allclose(expected_log_probs(logits).exp(), alpha / alpha.sum(1, keepdim=True))
    assert torch.all(alpha >= 1.0)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_caef_two_confident_agreeing_opinions(spatial):
    b, u = _opinion([0.0, 1.0, 0.0], 0.0, spatial)
    bf, uf = caef_fusion(b, u, b, u)
    assert torch.allclose(bf, b) and torch.all(uf == 0)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_caef_confident_with_vacuous_keeps_the_confident_one(spatial):
    b1, u1 = _opinion([0.0, 1.0, 0.0], 0.0, spatial)
    b2, u2 = _opinion([0.0, 0.0, 0.0], 1.0, spatial)
    bf, uf = caef_fusion(b1, u1, b2, u2)
    assert torch.allclose(bf, b1) and torch.allclose(uf, torch.zeros_like(uf))


def test_caef_hand_values_and_sum_to_one():
    # K = 2, b1 = (0.6, 0.2), u1 = 0.2; b2 = (0.5, 0.3), u2 = 0.2
    b1, u1 = _opinion([0.6, 0.2], 0.2, (1, 1))
    b2, u2 = _opinion([0.5, 0.3], 0.2, (1, 1))
    bf, uf = caef_fusion(b1, u1, b2, u2)
    raw = [0.6 * 0.5 + (0.6 * 0.2 + 0.5 * 0.2) / 3, 0.2 * 0.3 + (0.2 * 0.2 + 0.3 * 0.2) / 3]
    norm = sum(raw) + 0.04
    assert bf[0, :, 0, 0].tolist() == pytest.approx([r / norm for r in raw], rel=1e-6)
    assert uf.item() == pytest.approx(0.04 / norm, rel=1e-6)
    x1, x2 = opinion(dirichlet_alpha(torch.randn(3, 4, 5, 5))), opinion(dirichlet_alpha(torch.randn(3, 4, 5, 5)))
    bf, uf = caef_fusion(*x1, *x2)
    assert torch.allclose(bf.sum(1, keepdim=True) + uf, torch.ones_like(uf), atol=1e-6)
    with pytest.raises(ValueError):
        caef_fusion(x1[0], x1[1], x1[0][:, :2], x1[1])


def test_reliability_values():
    b, u = _opinion([1.0, 0.0], 0.0, (2, 2))
    assert torch.allclose(reliability(b, u), torch.ones(1, 1, 2, 2))
    b, u = _opinion([0.25, 0.25], 0.5, (1, 1))  # H2 = 2 * 0.25 * 2 = 1 bit; R = exp(-0.5)
    assert reliability(b, u).item() == pytest.approx(math.exp(-0.5))


def test_curriculum_weight_schedule():
    u = torch.tensor([0.1, 0.9, 0.5]).view(1, 1, 3, 1)  # ranks: 0.1 lowest, 0.9 highest
    a = 0.5
    start = curriculum_weight(u, 0.0, a).flatten().tolist()
    assert start == pytest.approx([1 + a * math.tanh(1), 1 - a * math.tanh(1), 1.0])  # certain first
    assert curriculum_weight(u, 0.5, a).flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    end = curriculum_weight(u, 1.0, a).flatten().tolist()
    assert end == pytest.approx([1 - a * math.tanh(1), 1 + a * math.tanh(1), 1.0])  # uncertain last
    with pytest.raises(ValueError):
        curriculum_weight(u, 0.0, 2.0)


def test_curriculum_ranks_ties_in_storage_order_and_are_a_permutation():
    u = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.2]).view(1, 1, 5, 1)
    # ranks 2, 0, 3, 4, 1 (ties in storage order) -> psi = 2 r / 4 - 1; at progress 0, w = 1 - a tanh(psi)
    psi = torch.tensor([0.0, -1.0, 0.5, 1.0, -0.5])
    expected = 1.0 - 0.5 * torch.tanh(psi)
    assert torch.allclose(curriculum_weight(u, 0.0, 0.5).flatten(), expected)
    v = torch.rand(3, 1, 4, 5, 6)
    w = curriculum_weight(v, 0.0, 0.5).reshape(3, -1)
    ranks = torch.argsort(torch.argsort(v.reshape(3, -1), dim=1), dim=1).float()  # the two-sort definition
    assert torch.allclose(w, 1.0 - 0.5 * torch.tanh(2.0 * ranks / (120 - 1) - 1.0))


def test_tetragamma_and_trigamma_gradient():
    x = torch.logspace(-3, 4, 2001, dtype=torch.float64)
    exact = torch.from_numpy(polygamma(2, x.numpy()))
    assert torch.allclose(tetragamma(x), exact, rtol=1e-8, atol=0)
    assert torch.allclose(tetragamma(x.float()).double(), exact, rtol=1e-6, atol=0)
    assert tetragamma(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(-2.4041138063191885)  # -2 zeta(3)
    y = (torch.rand(7, dtype=torch.float64) * 20 + 0.05).requires_grad_()
    assert torch.allclose(trigamma(y), torch.polygamma(1, y))
    assert torch.autograd.gradcheck(trigamma, (y,))


def test_class_argmax_is_argmax_with_ties_first():
    x = torch.tensor([[1.0, 2.0, 2.0], [3.0, 3.0, 1.0], [0.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    assert class_argmax(x).flatten().tolist() == [1, 0, 0]
    assert class_argmax(x, keepdim=True).shape == (3, 1, 1, 1)
    for shape in [(2, 3, 4, 5), (2, 4, 3, 4, 5)]:
        z = torch.randint(0, 3, shape).float()  # many ties
        assert torch.equal(class_argmax(z), z.argmax(1))


def test_fisher_loss_hand_value():
    # K = 2, alpha = (1, 1), y = class 0: p = 0.5, S = 2
    alpha = torch.ones(1, 2, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    t1, t2 = polygamma(1, 1.0), polygamma(1, 2.0)
    mse = 2 * (0.25 + 0.25 / 3) * t1
    log_det = 2 * math.log(t1) + math.log(1 - t2 * 2 / t1)
    assert fisher_evidential_loss(alpha, target, 1.0).item() == pytest.approx(mse - log_det, rel=1e-5)
    assert fisher_evidential_loss(alpha, target, 0.0).item() == pytest.approx(mse, rel=1e-5)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("scale", [-30.0, 0.0, 1e4])
def test_fisher_loss_finite_for_tiny_and_large_evidence(spatial, scale):
    logits = (torch.randn(2, 3, *spatial) + scale).requires_grad_(True)
    target = torch.randint(0, 3, (2, *spatial))
    loss = fisher_evidential_loss(dirichlet_alpha(logits), target, 1.0, torch.rand(2, 1, *spatial))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_fisher_loss_fp16_inputs():
    logits = torch.randn(1, 3, 4, 4).half()
    loss = fisher_evidential_loss(dirichlet_alpha(logits), torch.randint(0, 3, (1, 4, 4)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_weighted_dice_ce():
    log_probs = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]])).T.reshape(1, 2, 2, 1)  # two voxels
    target = torch.tensor([0, 1]).reshape(1, 2, 1)
    ce = -(math.log(0.8) + math.log(0.7)) / 2
    dice = (2 * 0.7 + 1e-5) / (0.2 + 0.7 + 1 + 1e-5)
    assert weighted_dice_ce(log_probs, target).item() == pytest.approx(ce + 1 - dice, rel=1e-5)
    w = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1)  # the second voxel does not count
    dice_w = (0 + 1e-5) / (0.2 + 1e-5)
    assert weighted_dice_ce(log_probs, target, w).item() == pytest.approx(-math.log(0.8) + 1 - dice_w, rel=1e-5)


@pytest.mark.parametrize("num_classes, fisher_weight, p_min, p_max", [
    (2, 1.0, 0.0, 0.501),   # I-EDL's default: the minimum is zero evidence, a vacuous opinion (p = 1/2)
    (3, 1.0, 0.0, 0.40),
    (2, 0.01, 0.93, 0.95),  # MEDL trainer's default: a confident, correct opinion
    (3, 0.01, 0.91, 0.93),
])
def test_fisher_loss_minimum_over_target_evidence(num_classes, fisher_weight, p_min, p_max):
    """Where the Fisher loss of a correctly labelled voxel is smallest, over the target class's alpha (others 1)."""
    a = torch.logspace(0, 3, 3001, dtype=torch.float64)
    alpha = torch.ones(len(a), num_classes, dtype=torch.float64)
    alpha[:, 0] = a
    target = torch.zeros(len(a), dtype=torch.long)
    losses = torch.stack([fisher_evidential_loss(alpha[i:i + 1], target[i:i + 1], fisher_weight)
                          for i in range(len(a))])
    best = a[losses.argmin()].item()
    p = best / (best + num_classes - 1)
    assert p_min <= p <= p_max
