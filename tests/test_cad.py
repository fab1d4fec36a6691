"""nnSSL_CADTrainer in-process and through the real console scripts (tiny synthetic dataset, CPU plans)."""

import os

import numpy as np
import pytest
import torch

from conftest import DATASET, DATASET_ID, run, script
from nnssl.ema import ema_decay_with_warmup
from nnssl.trainers import cad as cad_module
from nnssl.trainers.cad import nnSSL_CADTrainer
from trainer_helpers import batches, env_with_ext_trainer, grads, make_trainer, predict_test_images, started, started_2d


def _full_ramp(t):
    t.global_step = t.num_epochs * t.num_iterations_per_epoch // 2  # ramp (first quarter) done, DTE halfway
    return t


def test_terms_reach_both_students_not_the_teacher_and_total_is_their_sum(workspace):
    t = _full_ramp(started(make_trainer(nnSSL_CADTrainer)))
    _, data_l, target_l, data_u = batches(t)
    total, terms = t.compute_loss(data_l, target_l, data_u)
    w = terms["unsup_weight"]
    assert w == pytest.approx(1.0)
    expected = t.mix_loss_weight * terms["sup_loss"] + w * t.cps_weight * (terms["cps_loss"]
                                                                            + terms["displaced_cps_loss"])
    assert torch.isclose(total, expected)
    for net in (t.network, t.student_2):
        params = list(net.parameters())
        for term in ("sup_loss", "cps_loss", "displaced_cps_loss"):  # fails if a term is dropped or detached
            assert grads(terms[term], params).abs().sum() > 0, term
    assert all(p.grad is None for p in t.teacher.parameters()) and not any(
        p.requires_grad for p in t.teacher.parameters())
    assert 0 < terms["replaced_fraction"] <= t.displacement_schedule()[1]
    # the schema every method logs, and timings kept apart from loss terms by kind (progress.png draws by kind)
    assert {"sup_loss", "unsup_loss", "unsup_weight"} <= set(terms)
    assert terms.kinds["region_search_s"] == terms.kinds["pseudo_label_s"] == "timing"
    assert terms.kinds["cps_loss"] == "loss" and terms.kinds["displacement_threshold"] == "schedule"
    assert torch.isclose(terms["unsup_loss"], terms["cps_loss"] + terms["displaced_cps_loss"])
    t.on_train_end()


def test_displacement_step_changes_what_the_students_learn(workspace, monkeypatch):
    """Fails if the displacement is removed: the displaced images, and so the loss, would be the mixed ones."""
    t = _full_ramp(started(make_trainer(nnSSL_CADTrainer)))
    _, data_l, target_l, data_u = batches(t)
    seen = {}
    real = cad_module.llcr_displace

    def spy(x_1, x_2, *args):
        out = real(x_1, x_2, *args)
        seen["changed"] = bool((out[0] != x_1).any() and (out[1] != x_2).any())
        return out

    monkeypatch.setattr(cad_module, "llcr_displace", spy)
    torch.manual_seed(0)
    _, displaced = t.compute_loss(data_l, target_l, data_u)
    assert seen["changed"]
    monkeypatch.setattr(cad_module, "llcr_displace", lambda x_1, x_2, *a: (x_1, x_2, 0.0))
    torch.manual_seed(0)
    _, plain = t.compute_loss(data_l, target_l, data_u)
    assert torch.isclose(displaced["sup_loss"], plain["sup_loss"])  # same draw of mask and strong view
    assert not torch.isclose(displaced["displaced_cps_loss"], plain["displaced_cps_loss"])
    t.on_train_end()


def test_pseudo_labels_come_from_the_teacher(workspace, monkeypatch):
    t = _full_ramp(started(make_trainer(nnSSL_CADTrainer)))
    _, data_l, target_l, data_u = batches(t)
    torch.manual_seed(0)
    _, with_teacher = t.compute_loss(data_l, target_l, data_u)
    monkeypatch.setattr(cad_module, "pseudo_labels", lambda logits, *a: torch.zeros_like(logits[:, :1]).long())
    torch.manual_seed(0)
    _, without = t.compute_loss(data_l, target_l, data_u)
    assert not torch.isclose(with_teacher["sup_loss"], without["sup_loss"])
    t.on_train_end()


def test_mix_loss_is_abds_two_halves_formula(workspace):
    """ABD: (dice_in + dice_out + ce_in + ce_out) / 2 per student: each half's loss summed, then halved; the
    earlier whole-batch mean gave half of that weight against the cross pseudo-supervision."""
    from nnssl.losses.segmentation import mix_loss

    t = make_trainer(nnSSL_CADTrainer)
    t.initialize()
    torch.manual_seed(0)
    out = torch.randn(4, 3, 8, 8, 8)
    target = torch.randint(0, 3, (4, 1, 8, 8, 8))
    region = (torch.rand(4, 1, 8, 8, 8) > 0.5).float()
    halves = mix_loss(out[:2], target[:2], region[:2], 1.0, 0.5) + mix_loss(out[2:], target[2:], region[2:], 1.0, 0.5)
    ours = t.mix_loss_weight * t.mix_loss_halves(out, target, region, 0.5, n_in=2)
    assert t.mix_loss_weight == 0.5 and torch.isclose(ours, 0.5 * halves)
    assert not torch.isclose(ours, 0.5 * mix_loss(out, target, region, 1.0, 0.5), rtol=0.2)


def test_strong_view_goes_to_student_2_and_the_teacher_follows_student_1(workspace, monkeypatch):
    t = _full_ramp(started(make_trainer(nnSSL_CADTrainer)))
    for a, b in zip(t.teacher.parameters(), t.network.parameters()):
        assert torch.equal(a, b)  # the teacher starts as student 1
    assert any(not torch.equal(a, b) for a, b in zip(t.student_2.parameters(), t.network.parameters()))
    inputs = {}
    for name, net in (("student_1", t.network), ("student_2", t.student_2)):
        net.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach().clone()))
    monkeypatch.setattr(cad_module, "strong_intensity_view", lambda x, *a: x + 100.0)
    before = [p.detach().clone() for p in t.network.parameters()]
    d = ema_decay_with_warmup(t.global_step, t.ema_decay)
    t.train_step(next(t.dataloader_train))
    assert inputs["student_1"].abs().max() < 50 and inputs["student_2"].abs().min() > 50  # only student 2's is strong
    # the teacher is the EMA of student 1, not of student 2
    s1, s2 = list(t.network.parameters()), list(t.student_2.parameters())
    for a, b0, b in zip(t.teacher.parameters(), before, s1):
        assert torch.allclose(a, d * b0 + (1 - d) * b, atol=1e-6)
    assert any(not torch.allclose(a, d * b0 + (1 - d) * c, atol=1e-6)
               for a, b0, c in zip(t.teacher.parameters(), before, s2))
    t.on_train_end()


def test_dte_escalates_threshold_and_size(workspace):
    t = make_trainer(nnSSL_CADTrainer, epochs=4, iters=5)
    t.global_step = 0
    assert t.displacement_schedule() == pytest.approx((0.80, 1 / 16))
    t.global_step = 20
    assert t.displacement_schedule() == pytest.approx((0.95, 1 / 4))
    t.global_step = 5  # ramp-up over the first quarter: full weight from step 5 of 20
    assert t.current_unsup_weight() == pytest.approx(1.0)


def test_train_step_checkpoint_round_trip(workspace, tmp_path):
    t = started(make_trainer(nnSSL_CADTrainer))
    s2_before = [p.detach().clone() for p in t.student_2.parameters()]
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["sup_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(t.student_2.parameters(), s2_before))  # 2nd optimizer
    t.current_epoch = 1
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    t.on_train_end()
    r = make_trainer(nnSSL_CADTrainer)
    r.load_checkpoint(path)
    assert r.global_step == 1
    for name in ("student_2", "teacher"):
        for k, v in t.ssl_modules[name].state_dict().items():
            assert torch.equal(r.ssl_modules[name].state_dict()[k], v), (name, k)
    assert len(r.ssl_optimizers["student_2"].state_dict()["state"]) > 0


def test_2d_configuration(workspace):
    t = started_2d(nnSSL_CADTrainer)
    _full_ramp(t)
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["sup_loss"] > 0 and out["replaced_fraction"] > 0
    t.on_train_end()


@pytest.mark.slow
def test_cli_train_and_predict_with_student_1(workspace, tmp_path):
    variant = "nnSSL_CADTrainer_2epochs_3iters_1valiters"
    env = env_with_ext_trainer()  # the stock console scripts find nnssl's trainers through nnUNet_extTrainer
    run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
         "-device", "cpu"], env)
    model = os.path.join(workspace, "res", DATASET, f"{variant}__nnUNetPlans_cpu__3d_fullres")
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert set(ckpt["nnssl"]["modules"]) == {"student_2", "teacher"}
    assert "displaced_cps_loss" in ckpt["logging"] and "region_search_s" in ckpt["logging"]
    for name in ("teacher", "student_2"):  # validated beside student 1 every epoch
        assert len(ckpt["logging"][f"val_dice_{name}"]) == 2
    predict_test_images(workspace, variant, env, str(tmp_path / "preds"))
