"""CAD's building blocks on tiny tensors with hand-checked values: copy-paste, mix loss, pseudo-labels, LLCR, DTE."""

import math

import numpy as np
import pytest
import torch

from nnssl.losses.segmentation import cps_dice_loss, mix_loss, soft_dice_loss, weighted_dice_ce
from nnssl.ops.displacement import (Box, displace, largest_low_confidence_box, llcr_boxes, llcr_displace,
                                    most_confident_box, search_stride)
from nnssl.ops.mixing import bcp_mix, box_mask, copy_paste, strong_intensity_view, swap_boxes
from nnssl.ops.pseudo_labels import largest_component_per_class, pseudo_labels
from nnssl.schedules import escalate


# ------------------------------------------------------------------ copy-paste
@pytest.mark.parametrize("shape", [(12, 9), (6, 9, 12)])
def test_box_mask_has_two_thirds_sides_inside_the_patch(shape):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = box_mask(shape, 2 / 3, generator=g)
        assert m.shape == (1, 1, *shape)
        nz = m[0, 0].nonzero()
        sides = (nz.max(0).values - nz.min(0).values + 1).tolist()
        assert sides == [int(2 / 3 * s) for s in shape]
        assert m.sum() == np.prod(sides)  # one solid box


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_swap_is_an_involution_and_copy_paste_takes_the_box_from_the_source(spatial):
    a, b = torch.randn(2, 1, *spatial), torch.randn(2, 1, *spatial)
    m = box_mask(spatial, 0.5, generator=torch.Generator().manual_seed(1))
    a2, b2 = swap_boxes(a, b, m)
    assert torch.equal(a2[m.expand_as(a).bool()], b[m.expand_as(b).bool()])
    assert torch.equal(a2[~m.expand_as(a).bool()], a[~m.expand_as(a).bool()])
    a3, b3 = swap_boxes(a2, b2, m)
    assert torch.equal(a3, a) and torch.equal(b3, b)
    assert torch.equal(copy_paste(a, b, torch.ones_like(m)), a) and torch.equal(copy_paste(a, b, 0 * m), b)


def test_bcp_mix_inward_and_outward_pairs():
    x_l, x_u = torch.full((2, 1, 4, 4), 1.0), torch.full((2, 1, 4, 4), 2.0)
    y_l, y_u = torch.full((2, 1, 4, 4), 1), torch.full((2, 1, 4, 4), 2)
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1:3, 1:3] = 1
    images, targets, region = bcp_mix(x_l, y_l, x_u, y_u, m)
    # pair 0 inward: labeled box in unlabeled background; pair 1 outward: unlabeled box in labeled background
    assert torch.equal(images[0, 0], torch.where(m[0, 0].bool(), 1.0, 2.0))
    assert torch.equal(images[1, 0], torch.where(m[0, 0].bool(), 2.0, 1.0))
    assert torch.equal(targets[0, 0], torch.where(m[0, 0].bool(), 1, 2))
    assert torch.equal(region[0, 0], m[0, 0]) and torch.equal(region[1, 0], 1 - m[0, 0])
    assert targets.dtype == y_l.dtype and (targets == 1).eq(region.bool()).all()  # region marks ground truth


# ------------------------------------------------------------------ losses
def test_weighted_dice_ce_hand_value_and_mask():
    # 1 sample, 2 classes, 2 voxels: p(fg) = 0.8 on a fg voxel, 0.4 on a bg voxel
    p = torch.tensor([[[0.2, 0.6], [0.8, 0.4]]])  # (B=1, K=2, 2 voxels) -> treat as 1D "image" via an extra axis
    log_probs = p.log()[..., None]
    target = torch.tensor([[1, 0]])[..., None]
    ce = -(math.log(0.8) + math.log(0.6)) / 2
    dice = (2 * 0.8 + 1e-5) / (0.8 + 0.4 + 1 + 1e-5)
    assert weighted_dice_ce(log_probs, target).item() == pytest.approx(ce + 1 - dice, rel=1e-5)
    w = torch.tensor([[[1.0, 0.0]]])[..., None]  # only the first voxel counts
    dice_w = (2 * 0.8 + 1e-5) / (0.8 + 1 + 1e-5)
    assert weighted_dice_ce(log_probs, target, w).item() == pytest.approx(-math.log(0.8) + 1 - dice_w, rel=1e-5)


def test_mix_loss_weights_exactly_its_regions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 5))
    region = torch.zeros(2, 1, 4, 5)
    region[:, :, :2] = 1
    lp = torch.log_softmax(logits, 1)
    expected = 1.0 * weighted_dice_ce(lp, target, region) + 0.5 * weighted_dice_ce(lp, target, 1 - region)
    assert mix_loss(logits, target, region, 1.0, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    # voxels of a region with weight 0 get no gradient
    mix_loss(logits, target, region, 1.0, 0.0).backward()
    assert logits.grad[:, :, 2:].abs().sum() == 0 and logits.grad[:, :, :2].abs().sum() > 0
    # changing the target on pseudo-labeled voxels changes only the pseudo part
    other = target.clone()
    other[:, :, 2:] = (other[:, :, 2:] + 1) % 3
    assert mix_loss(logits, other, region, 1.0, 0.0).item() == pytest.approx(
        mix_loss(logits, target, region, 1.0, 0.0).item())


def test_cps_dice_loss_is_zero_for_a_confident_match_and_detaches_the_other():
    a = torch.zeros(1, 2, 3, 3)
    a[:, 1, 1, 1] = 50.0  # class 1 at the centre, confidently
    a[:, 0] = 25.0 - a[:, 1] / 2
    b = a.clone().requires_grad_(True)
    s = a.clone().requires_grad_(True)
    loss = cps_dice_loss(s, b)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    # the other network's argmax is the target: flip it and the loss is large; only s gets a gradient
    flipped = b.detach().clone()
    flipped[:, 1, 1, 1], flipped[:, 1, 0, 0] = -50.0, 50.0
    loss_flipped = cps_dice_loss(s, flipped)
    assert loss_flipped.item() > 0.5
    loss_flipped.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # ABD averages its Dice over all classes including the background: for binary data a different loss
    p = torch.zeros(1, 2, 2, 2)
    p[:, 1] = torch.tensor([[2.0, -2.0], [-2.0, -2.0]])
    other = torch.zeros(1, 2, 2, 2)
    other[:, 1] = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])  # argmax: class 1 on the top row
    probs = torch.softmax(p, 1)
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    dice_fg = (2 * (probs[0, 1] * y).sum() + 1e-5) / ((probs[0, 1] + y).sum() + 1e-5)
    dice_bg = (2 * (probs[0, 0] * (1 - y)).sum() + 1e-5) / ((probs[0, 0] + 1 - y).sum() + 1e-5)
    assert cps_dice_loss(p, other).item() == pytest.approx(1 - dice_fg.item(), rel=1e-5)
    assert cps_dice_loss(p, other, include_background=True).item() == pytest.approx(
        1 - 0.5 * (dice_fg + dice_bg).item(), rel=1e-5)
    # hand value: soft Dice against an empty pseudo-label with prediction 0.5 everywhere on class 1
    assert soft_dice_loss(torch.full((1, 2, 2, 2), math.log(0.5)), torch.zeros(1, 2, 2, dtype=torch.long)
                          ).item() == pytest.approx(1 - 1e-5 / (4 * 0.5 + 1e-5), rel=1e-6)


# ------------------------------------------------------------------ pseudo-labels
def test_largest_component_per_class_2d_and_3d():
    seg = np.zeros((6, 6), int)
    seg[0:2, 0:2] = 1   # 4 voxels
    seg[4:6, 3:6] = 1   # 6 voxels: kept
    seg[3, 0] = 2       # single voxel class 2: kept (its only component)
    out = largest_component_per_class(seg, 3)
    assert (out == 1).sum() == 6 and out[4, 3] == 1 and out[0, 0] == 0 and out[3, 0] == 2
    # diagonal neighbours are connected with full connectivity (scikit-image's default), not with faces only
    diag = np.zeros((3, 3, 3), int)
    diag[0, 0, 0] = diag[1, 1, 1] = 1
    diag[2, 2, 0] = 0
    assert (largest_component_per_class(diag, 2) == 1).sum() == 2
    assert (largest_component_per_class(diag, 2, connectivity=1) == 1).sum() == 1


def test_pseudo_labels_argmax_and_component():
    logits = torch.zeros(1, 2, 5, 5)
    logits[0, 1, 0, 0] = 1.0
    logits[0, 1, 2:5, 2:5] = 1.0
    assert pseudo_labels(logits, False).sum() == 10
    out = pseudo_labels(logits, True)
    assert out.shape == (1, 1, 5, 5) and out.sum() == 9 and out[0, 0, 0, 0] == 0


def test_strong_view_keeps_shape_and_changes_intensities():
    x = torch.randn(2, 1, 8, 8)
    y = strong_intensity_view(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(x, y)
    z = strong_intensity_view(x, (1.0, 1.0), 0.0)
    assert torch.allclose(z, x, atol=1e-6)


# ------------------------------------------------------------------ Largest Low-Confidence Region Replacement
def _two_regions_2d():
    conf = np.ones((10, 10))
    conf[1:3, 1:3] = 0.5          # small low region, 4 voxels
    conf[5:9, 4:9] = 0.6          # large low region, 20 voxels, bbox 4 x 5
    conf[6, 6] = 0.3              # its least confident voxel
    return conf


def test_llcr_box_is_the_largest_low_confidence_component():
    conf = _two_regions_2d()
    assert largest_low_confidence_box(conf, 0.7, 100) == Box((5, 4), (4, 5))
    # threshold below every value: nothing to replace; threshold between: only the smaller-valued region
    assert largest_low_confidence_box(conf, 0.2, 100) is None
    assert largest_low_confidence_box(conf, 0.55, 100) == Box((1, 1), (2, 2))
    assert largest_low_confidence_box(conf, 0.7, 0) is None


@pytest.mark.parametrize("max_voxels", [1, 4, 9, 12, 19])
def test_llcr_box_never_exceeds_the_maximum_and_stays_on_the_component(max_voxels):
    conf = _two_regions_2d()
    box = largest_low_confidence_box(conf, 0.7, max_voxels)
    assert box.volume <= max_voxels and box.volume >= max_voxels // 2
    # inside the component's bounding box, holding its least confident voxel
    assert all(s >= lo and s + n <= hi for s, n, lo, hi in zip(box.start, box.size, (5, 4), (9, 9)))
    assert all(s <= c < s + n for s, n, c in zip(box.start, box.size, (6, 6)))


def test_llcr_box_3d():
    conf = np.ones((6, 6, 6))
    conf[0:2, 0:2, 0:2] = 0.1     # 8 voxels
    conf[3:6, 3:6, 2:5] = 0.5     # 27 voxels
    assert largest_low_confidence_box(conf, 0.6, 1000) == Box((3, 3, 2), (3, 3, 3))
    assert largest_low_confidence_box(conf, 0.6, 8).volume == 8


def test_most_confident_box():
    conf = torch.zeros(6, 7)
    conf[3:5, 4:7] = 1.0
    assert most_confident_box(conf, (2, 3)) == Box((3, 4), (2, 3))
    with pytest.raises(ValueError):
        most_confident_box(conf, (7, 1))


def test_llcr_displace_replaces_exactly_the_boxes_bidirectionally():
    conf_1 = torch.ones(1, 8, 8)
    conf_1[0, 0:3, 0:2] = 0.2      # view 1's low region: 3 x 2 at (0, 0)
    conf_2 = torch.full((1, 8, 8), 0.9)
    conf_2[0, 5:8, 6:8] = 1.0      # view 2's most confident 3 x 2 box at (5, 6)
    conf_2[0, 4, 0] = 0.1          # view 2's low region: one voxel
    x_1 = torch.zeros(1, 2, 8, 8)
    x_2 = torch.arange(128, dtype=torch.float32).reshape(1, 2, 8, 8)
    y_1, y_2, replaced = llcr_displace(x_1, x_2, conf_1, conf_2, threshold=0.5, max_fraction=1.0)
    assert torch.equal(y_1[0, :, 0:3, 0:2], x_2[0, :, 5:8, 6:8])
    changed = (y_1 != x_1).any(1)[0]
    assert changed.sum() == 6 and changed[0:3, 0:2].all()  # nothing outside the box
    # view 2's single low voxel gets view 1's most confident voxel (value 0); view 1 unchanged as the source
    assert y_2[0, :, 4, 0].eq(0).all() and (y_2 != x_2).any(1).sum() == 1
    assert replaced == pytest.approx((6 + 1) / 64 / 2)
    assert torch.equal(x_1, torch.zeros(1, 2, 8, 8))  # inputs untouched


def test_llcr_boxes_respect_max_fraction_with_pooled_search():
    torch.manual_seed(0)
    conf = torch.rand(2, 20, 28, 20) * 0.5   # everything low: the whole patch is one component
    assert search_stride((20, 28, 20), 1000) == 3
    for fraction in (1 / 16, 1 / 4):
        for pair in llcr_boxes(conf, torch.rand(2, 20, 28, 20), 0.9, fraction, search_max_voxels=1000):
            dst, src = pair
            assert dst.size == src.size and dst.volume <= math.floor(fraction * 20 * 28 * 20)
            assert all(s + n <= d for s, n, d in zip(dst.start, dst.size, (20, 28, 20)))
            assert all(s + n <= d for s, n, d in zip(src.start, src.size, (20, 28, 20)))
    assert displace(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), [None]).sum() == 0


def test_dte_schedule():
    assert escalate(0.8, 0.95, 0, 1) == pytest.approx(0.8)
    assert escalate(0.8, 0.95, 0.5, 1) == pytest.approx(0.875)
    assert escalate(0.8, 0.95, 2, 1) == pytest.approx(0.95)
    assert escalate(1 / 16, 1 / 4, 1, 1, "sigmoid") == pytest.approx(0.25)
