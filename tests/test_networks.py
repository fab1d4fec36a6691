"""nnssl.networks on tiny 2D and 3D U-Nets: plans builders, the network pair and its combine rules, eval mode, and
feature capture (shapes, hooks removed, gradients, unchanged outputs, compiled and DDP wrappers)."""

import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnssl.losses.evidential import expected_log_probs
from nnssl.networks.features import capture_features, feature_modules, forward_with_features
from nnssl.networks.from_plans import build_plans_network, build_residual_encoder_unet
from nnssl.networks.modules import eval_mode, unwrap_network
from nnssl.networks.pair import NetworkPair, evidential_mean, mean_probabilities_of_logits

FEATURES_PER_STAGE = (4, 8, 16)
PATCHES = {2: (16, 16), 3: (8, 16, 16)}
STRIDES = {2: ((1, 1), (2, 2), (2, 2)), 3: ((1, 1, 1), (1, 2, 2), (2, 2, 2))}  # bottleneck 4x4 / 4x4x4


def arch_kwargs(dim: int) -> dict:
    """A 3-stage plain U-Net's plans (nnU-Net's kwargs, class names as strings)."""
    return dict(n_stages=3, features_per_stage=list(FEATURES_PER_STAGE), conv_op=f"torch.nn.Conv{dim}d",
                kernel_sizes=[[3] * dim] * 3, strides=[list(s) for s in STRIDES[dim]], n_conv_per_stage=[1, 1, 1],
                n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                norm_op=f"torch.nn.InstanceNorm{dim}d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU",
                nonlin_kwargs={"inplace": True})


def configuration(dim: int) -> SimpleNamespace:
    return SimpleNamespace(network_arch_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet",
                           network_arch_init_kwargs=arch_kwargs(dim),
                           network_arch_init_kwargs_req_import=["conv_op", "norm_op", "dropout_op", "nonlin"])


def tiny_unet(kind: str, dim: int, deep_supervision: bool = True) -> nn.Module:
    torch.manual_seed(0)
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    common = dict(input_channels=1, n_stages=3, features_per_stage=FEATURES_PER_STAGE, conv_op=conv, kernel_sizes=3,
                  strides=STRIDES[dim], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                  deep_supervision=deep_supervision)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=1, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=(1, 1, 2), **common)


def image(dim: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *PATCHES[dim], generator=torch.Generator().manual_seed(1))


NETWORKS = [(kind, dim) for dim in (2, 3) for kind in ("plain", "resenc")]


# ------------------------------------------------------------------ plans builders
@pytest.mark.parametrize("dim", [2, 3])
def test_residual_encoder_unet_matches_the_plain_unet_of_the_same_plans(dim):
    plain = build_plans_network(configuration(dim), 1, 3, deep_supervision=True)
    resenc = build_residual_encoder_unet(configuration(dim), 1, 3, deep_supervision=True)
    assert (type(plain), type(resenc)) == (PlainConvUNet, ResidualEncoderUNet)
    x = image(dim)
    with torch.no_grad():
        shapes = [[tuple(o.shape) for o in net(x)] for net in (plain, resenc)]
    assert shapes[0] == shapes[1] and shapes[0][0] == (2, 3, *PATCHES[dim]) and len(shapes[0]) == 2  # one per decoder stage


# ------------------------------------------------------------------ pair
def test_pair_combines_per_deep_supervision_output_and_returns_both_inside_the_block():
    net_a, net_b = tiny_unet("plain", 2), tiny_unet("resenc", 2)
    pair = NetworkPair(net_a, net_b, mean_probabilities_of_logits)
    assert {k.split(".")[0] for k in pair.state_dict()} == {"net_a", "net_b"}
    x = image(2)
    with torch.no_grad():
        outs_a, outs_b, combined = net_a(x), net_b(x), pair(x)
        with pair.both_outputs():
            both = pair(x)
    assert len(combined) == 2
    for a, b, c in zip(outs_a, outs_b, combined):
        manual = torch.log(0.5 * (torch.softmax(a, 1) + torch.softmax(b, 1)))
        torch.testing.assert_close(c, manual, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.softmax(c, 1).sum(1), torch.ones_like(c[:, 0]))
    assert isinstance(both, tuple) and all(torch.equal(u, v) for u, v in zip(both[1], outs_b))


def test_pair_of_single_outputs_and_both_outputs_restores_after_an_exception():
    pair = NetworkPair(nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1), evidential_mean)
    x = image(2)
    assert torch.equal(pickle.loads(pickle.dumps(pair))(x), pair(x))  # module-level combine: picklable
    with pytest.raises(RuntimeError, match="boom"):
        with pair.both_outputs():
            assert isinstance(pair(x), tuple)
            raise RuntimeError("boom")
    assert torch.is_tensor(pair(x))
    with pair.both_outputs():
        with pair.both_outputs():
            pass
        assert isinstance(pair(x), tuple)  # nested blocks restore the outer state
    assert torch.is_tensor(pair(x))


def test_evidential_mean_is_the_mean_of_expected_dirichlet_probabilities():
    a, b = torch.randn(2, 3, 4, 5) * 4, torch.randn(2, 3, 4, 5) * 4
    alpha_a, alpha_b = F.softplus(a) + 1, F.softplus(b) + 1
    formula = torch.log(0.5 * (alpha_a / alpha_a.sum(1, keepdim=True) + alpha_b / alpha_b.sum(1, keepdim=True)))
    out = evidential_mean(a, b)
    torch.testing.assert_close(out, formula)
    # exactly MEDL's former EvidentialPair.average
    assert torch.equal(out, torch.log(0.5 * (expected_log_probs(a).exp() + expected_log_probs(b).exp())))
    assert out.dtype == torch.float32 and evidential_mean(a.half(), b.half()).dtype == torch.float32


# ------------------------------------------------------------------ eval mode
def test_eval_mode_restores_the_previous_mode_also_after_an_exception():
    net = nn.Sequential(nn.Dropout())
    with pytest.raises(ValueError):
        with eval_mode(net) as inner:
            assert inner is net and not net.training and not net[0].training
            raise ValueError
    assert net.training and net[0].training
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training


# ------------------------------------------------------------------ features
def no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("kind, dim", NETWORKS)
def test_features_have_the_documented_shapes_and_leave_outputs_and_hooks_unchanged(kind, dim):
    net, x = tiny_unet(kind, dim), image(dim)
    with torch.no_grad():
        plain_out = net(x)
        with capture_features(net, ("bottleneck", "decoder")) as feats:
            out = net(x)
    assert no_hooks(net)
    assert all(torch.equal(u, v) for u, v in zip(out, plain_out))
    down = [p // (s1 * s2 * s3) for p, s1, s2, s3 in zip(PATCHES[dim], *STRIDES[dim])]
    assert feats["bottleneck"].shape == (2, FEATURES_PER_STAGE[-1], *down)
    assert feats["decoder"].shape == (2, FEATURES_PER_STAGE[0], *PATCHES[dim])


@pytest.mark.parametrize("name", ["bottleneck", "decoder"])
def test_features_carry_gradients_into_the_encoder(name):
    net = tiny_unet("resenc", 3, deep_supervision=False)
    out, feats = forward_with_features(net, image(3), name)
    assert set(feats) == {name} and torch.is_tensor(out)
    feats[name].sum().backward()
    first = next(net.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_hooks_are_removed_after_an_exception_and_errors_are_clear():
    net = tiny_unet("plain", 2)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_features(net):
            raise RuntimeError("boom")
    assert no_hooks(net)
    with capture_features(net, "decoder") as feats:
        pass
    with pytest.raises(KeyError, match="'decoder' of PlainConvUNet was not captured"):
        feats["decoder"]
    with pytest.raises(ValueError, match="feature names"):
        with capture_features(net, "skip0"):
            pass
    with pytest.raises(TypeError, match="NetworkPair has no encoder.stages"):
        feature_modules(NetworkPair(net, net))


def test_capture_through_torch_compile():
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch < 2.6")
    x = image(2)
    net = tiny_unet("plain", 2, deep_supervision=False)
    compiled = torch.compile(net, backend="eager")
    assert unwrap_network(compiled) == (net, True)
    expected = compiled(x)  # traced without hooks: the capture must not rely on this graph
    out, feats = forward_with_features(compiled, x)
    assert torch.allclose(out, expected) and no_hooks(net)
    assert feats["bottleneck"].shape == (2, 16, 4, 4) and feats["decoder"].shape == (2, 4, 16, 16)
    assert torch.allclose(compiled(x), expected)  # compiled calls after the block are unaffected


def test_capture_through_ddp(tmp_path):
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = tiny_unet("plain", 2)
        ddp = nn.parallel.DistributedDataParallel(net)
        assert unwrap_network(ddp) == (net, False)
        out, feats = forward_with_features(ddp, image(2), "bottleneck")
        (out[0].sum() + feats["bottleneck"].sum()).backward()
        assert no_hooks(net) and net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()
