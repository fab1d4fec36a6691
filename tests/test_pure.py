"""Schedules, EMA and consistency loss on tiny tensors with values known by hand."""

import math

import pytest
import torch
from torch import nn

from nnssl.ema import ema_decay_with_warmup, ema_update_
from nnssl.losses.consistency import softmax_mse
from nnssl.schedules import cosine_rampup, linear_rampup, rampup, sigmoid_rampup


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3, 0) == 1.0


@pytest.mark.parametrize("fn", [sigmoid_rampup, linear_rampup, cosine_rampup])
def test_rampups_monotone_and_bounded(fn):
    values = [fn(t, 20) for t in range(0, 30)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == 1.0 and 0.0 <= values[0] <= 0.01


def test_linear_and_cosine_midpoints():
    assert linear_rampup(5, 20) == 0.25
    assert cosine_rampup(10, 20) == pytest.approx(0.5)
    assert rampup("none", 0, 100) == 1.0
    with pytest.raises(ValueError):
        rampup("exponential", 0, 1)


def test_ema_decay_warmup():
    assert ema_decay_with_warmup(0, 0.99) == 0.0
    assert ema_decay_with_warmup(1, 0.99) == 0.5
    assert ema_decay_with_warmup(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_with_warmup(10_000, 0.99) == 0.99


def _pair():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    t = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    s(torch.randn(4, 1, 8, 8))  # move the student's running stats and its num_batches_tracked
    return s, t


def test_ema_update_parameters_and_buffers():
    s, t = _pair()
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    ema_update_(t, s, 0.75)
    for k, v in t.state_dict().items():
        if v.dtype.is_floating_point:
            expected = 0.75 * t_before[k] + 0.25 * s.state_dict()[k]
            assert torch.allclose(v, expected), k
        else:
            assert torch.equal(v, s.state_dict()[k]), k  # integer buffers are copied


def test_ema_decay_zero_copies_and_one_freezes():
    s, t = _pair()
    frozen = {k: v.clone() for k, v in t.state_dict().items() if v.dtype.is_floating_point}
    ema_update_(t, s, 1.0)
    for k, v in frozen.items():
        assert torch.equal(t.state_dict()[k], v)
    ema_update_(t, s, 0.0)
    for k, v in s.state_dict().items():
        assert torch.equal(t.state_dict()[k], v)


def test_ema_rejects_mismatched_modules():
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(2, 3), nn.Linear(3, 2), 0.5)
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
def test_softmax_mse_known_values(spatial):
    # two classes: logits (0, 0) -> p = (0.5, 0.5); logits (log 3, 0) -> p = (0.75, 0.25)
    s = torch.zeros(1, 2, *spatial)
    t = torch.zeros(1, 2, *spatial)
    t[:, 0] = math.log(3.0)
    assert softmax_mse(s, t).item() == pytest.approx(0.25 ** 2)
    assert softmax_mse(t, t).item() == 0.0


def test_softmax_mse_gradient_reaches_student_only():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    softmax_mse(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_softmax_mse_bad_shapes():
    with pytest.raises(ValueError):
        softmax_mse(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        softmax_mse(torch.zeros(2, 4), torch.zeros(2, 4))


def test_softmax_mse_is_float32_under_half_inputs():
    s = torch.randn(1, 2, 4, 4).half()
    assert softmax_mse(s, s.clone()).dtype == torch.float32
