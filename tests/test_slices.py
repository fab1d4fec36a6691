"""Slice-wise 2D networks with gradient checkpointing: a checkpointed step equals a plain one, BatchNorm included."""

import copy

import pytest
import torch
from torch import nn

from nnssl.networks.pretrained_2d import SliceWise2DNetwork
from nnssl.ops.slices import chunked


def batchnorm_net(momentum=0.1):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Dropout2d(0.3), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                         nn.ReLU(), nn.Conv2d(4, 2, 1))


def layernorm_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm([4, 8, 8]), nn.GELU(), nn.Conv2d(4, 2, 1))


def step(net_2d, x, checkpoint):
    """One training forward + backward of ``net_2d`` slice by slice (10 slices in chunks of 4); the output."""
    net = SliceWise2DNetwork(net_2d, in_channels=3, pad_multiple=1, chunk_slices=4, checkpoint=checkpoint).train()
    torch.manual_seed(1)  # same dropout masks in both runs (checkpoint replays the RNG state in recomputation)
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach()


@pytest.mark.parametrize("make", [batchnorm_net, lambda: batchnorm_net(momentum=None), layernorm_net],
                         ids=["batchnorm", "batchnorm-cumulative", "layernorm"])
def test_checkpointed_step_equals_a_plain_one(make):
    torch.manual_seed(0)
    plain = make()
    ckpt = copy.deepcopy(plain)
    x = torch.randn(2, 3, 5, 8, 8)  # (B, C, D, H, W): 10 slices -> chunks of 4, 4, 2
    x_plain, x_ckpt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_ckpt = step(plain, x_plain, False), step(ckpt, x_ckpt, True)
    assert torch.allclose(y_ckpt, y_plain, atol=1e-6)
    assert torch.allclose(x_ckpt.grad, x_plain.grad, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(q.grad, p.grad, atol=1e-5), name
    buffers = dict(plain.named_buffers())
    for name, b in ckpt.named_buffers():  # running_mean, running_var: one update per chunk, not two
        assert torch.allclose(b, buffers[name]), name
    for m in ckpt.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 3  # three chunks
            assert m.track_running_stats and m.training  # restored after the recomputation


def test_checkpointing_needs_a_module_to_find_its_norm_layers():
    net = batchnorm_net()
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="module"):
        chunked(lambda s: net(s), x, 4, checkpoint=True)
    y = chunked(lambda s: net(s), x, 4, checkpoint=True, module=net)
    y.sum().backward()
    assert net[1].num_batches_tracked.item() == 2
    with torch.no_grad():  # no gradients: nothing is checkpointed, so no module is needed
        chunked(lambda s: net(s), x, 4, checkpoint=True)
