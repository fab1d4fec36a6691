"""The base trainer and Mean Teacher, in-process on the tiny synthetic dataset (CPU-scale plans)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from conftest import DATASET
from nnssl.trainers.base import nnSSLTrainer
from nnssl.trainers.mean_teacher import nnSSL_MeanTeacherTrainer
from nnssl.data.layout import UNLABELED_MANIFEST
from trainer_helpers import batches, grads, make_trainer, started, started_2d


def test_unlabeled_term_nonzero_reaches_student_not_teacher(workspace):
    t = started(make_trainer())
    _, data_l, target_l, data_u = batches(t)
    _, out_u = t.forward_student(data_l, data_u)
    unsup, _ = t.unsupervised_loss(data_u, out_u)
    assert unsup.item() > 0
    unsup.backward()
    student_grad = sum(p.grad.abs().sum().item() for p in t.network.parameters() if p.grad is not None)
    assert student_grad > 0
    assert all(p.grad is None for p in t.teacher.parameters())
    assert all(not p.requires_grad for p in t.teacher.parameters())
    t.on_train_end()


def test_total_loss_carries_the_unlabeled_gradient(workspace):
    """Fails if the unlabeled term is dropped from the loss or detached from the student."""
    t = started(make_trainer())
    t.global_step = t.num_epochs * t.num_iterations_per_epoch  # ramp at full weight
    _, data_l, target_l, data_u = batches(t)
    total, terms = t.compute_loss(data_l, target_l, data_u)
    assert terms["unsup_weight"] == pytest.approx(t.unsup_weight)
    assert torch.isclose(total, terms["sup_loss"] + terms["unsup_weight"] * terms["unsup_loss"])
    params = [p for p in t.network.parameters()]
    g_total, g_sup, g_unsup = grads(total, params), grads(terms["sup_loss"], params), grads(terms["unsup_loss"], params)
    assert g_unsup.abs().sum() > 0
    # g_total - g_sup cancels float32 gradients of order max|g_total|: rounding, which depends on the number of
    # threads, reaches ~1e-5 of that scale; the unlabeled part itself is ~5e-4 of it on this data
    assert torch.allclose(g_total - g_sup, t.unsup_weight * g_unsup, atol=2e-5 * g_total.abs().max().item())
    assert not torch.allclose(g_total, g_sup)
    t.on_train_end()


def test_teacher_moves_towards_student(workspace):
    t = started(make_trainer())
    t.global_step = 1000  # past the EMA warm-up: decay 0.99
    teacher_before = [p.detach().clone() for p in t.teacher.parameters()]
    student_before = [p.detach().clone() for p in t.network.parameters()]
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["unsup_loss"] > 0 and out["n_unlabeled"] == 2
    student_after = list(t.network.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_after, student_before))
    for tb, ta, sa in zip(teacher_before, t.teacher.parameters(), student_after):
        assert torch.allclose(ta, 0.99 * tb + 0.01 * sa.detach(), atol=1e-6)
    dist_before = sum((tb - sa).norm() for tb, sa in zip(teacher_before, student_after))
    dist_after = sum((ta - sa).norm() for ta, sa in zip(t.teacher.parameters(), student_after))
    assert dist_after < dist_before
    t.on_train_end()


def test_unlabeled_loader_never_yields_labels_and_pool_is_right(workspace):
    t = started(make_trainer())
    batch = next(t.dataloader_unlabeled)
    assert set(batch) == {"data", "keys", "meta"}  # no target, ever
    assert batch["data"].shape == (2, 1, 32, 32, 32)
    assert [m["case"] for m in batch["meta"]] == list(batch["keys"])
    for m in batch["meta"]:  # 3D: the crop in its image, no slice position
        assert m["slice_index"] is None and m["slice_count"] is None and len(m["image_shape"]) == 3
        assert m["pseudo_label"] is None and m["confidence"] is None
    fold = load_json(join(os.environ["nnUNet_preprocessed"], DATASET, "splits_final.json"))[0]
    expected = set(fold["unlabeled"]) | {f"synthu_{i:03d}" for i in range(6)}
    assert set(t.unlabeled_pool.identifiers) == expected
    assert not expected & (set(fold["train"]) | set(fold["val"]))
    t.on_train_end()


def test_checkpoint_round_trip_restores_teacher_and_counters(workspace, tmp_path):
    t = started(make_trainer())
    for _ in range(3):
        t.train_step(next(t.dataloader_train))
    t.current_epoch = 1
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    t.on_train_end()

    for source in (path, torch.load(path, map_location="cpu", weights_only=False)):
        r = make_trainer()
        r.load_checkpoint(source)
        assert r.global_step == 3 and r.current_epoch == 2 and r._ssl_state_loaded
        for k, v in t.teacher.state_dict().items():
            assert torch.equal(r.teacher.state_dict()[k], v), k
        for k, v in t.network.state_dict().items():
            assert torch.equal(r.network.state_dict()[k], v), k
        assert not all(torch.equal(r.teacher.state_dict()[k], v) for k, v in r.network.state_dict().items())
        assert r.optimizer.state_dict()["state"].keys() == t.optimizer.state_dict()["state"].keys()
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnSSL_MeanTeacherTrainer"
    assert set(ckpt["nnssl"]["modules"]) == {"teacher"} and ckpt["nnssl"]["hyperparameters"]["ema_decay"] == 0.99


def test_run_training_logs_ssl_terms_and_resumes(workspace):
    t = make_trainer(epochs=2, iters=2)
    t.run_training()
    log = t.logger.local_logger.my_fantastic_logging
    for key in ("sup_loss", "unsup_loss", "unsup_weight", "n_labeled", "n_unlabeled", "val_dice_teacher"):
        assert len(log[key]) == 2, key
    assert log["unsup_weight"][1] > log["unsup_weight"][0]
    assert os.path.isfile(join(t.output_folder, "progress.png"))
    final = join(t.output_folder, "checkpoint_final.pth")
    teacher_final = {k: v.clone() for k, v in t.teacher.state_dict().items()}

    r = make_trainer(epochs=3, iters=2)  # what --c does with a longer budget
    r.load_checkpoint(final)
    assert r.global_step == 4 and r.current_epoch == 2
    for k, v in teacher_final.items():
        assert torch.equal(r.teacher.state_dict()[k], v)
    r.run_training()
    assert r.global_step == 6
    assert len(r.logger.local_logger.my_fantastic_logging["unsup_loss"]) == 3


def test_2d_configuration(workspace):
    t = started_2d(nnSSL_MeanTeacherTrainer)  # the 2D plans' batch of 26 slices is more than a CPU test needs
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["unsup_loss"] > 0
    batch = next(t.dataloader_unlabeled)
    assert batch["data"].ndim == 4
    for m in batch["meta"]:  # a 2D sample knows its slice's position in its scan
        assert m["slice_count"] == m["image_shape"][0] and 0 <= m["slice_index"] < m["slice_count"]
        assert m["slice_index"] == m["crop_start"][0]
    t.on_train_end()


def test_missing_unlabeled_data_is_a_clear_error(workspace):
    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    shutil.rmtree(join(pre, "unlabeled"))
    splits = load_json(join(pre, "splits_final.json"))
    for fold in splits:
        fold.pop("unlabeled")
    json.dump(splits, open(join(pre, "splits_final.json"), "w"))
    t = make_trainer()
    with pytest.raises(RuntimeError, match="nnssl_preprocess_unlabeled"):
        t.on_train_start()
    assert t.dataloader_train is None  # raised before nnU-Net started any loader


def test_stale_unlabeled_data_is_a_clear_error(workspace):
    manifest = join(os.environ["nnUNet_preprocessed"], DATASET, "unlabeled", "nnUNetPlans_3d_fullres",
                    UNLABELED_MANIFEST)
    m = load_json(manifest)
    m["preprocessing_fingerprint"] = "0000"
    json.dump(m, open(manifest, "w"))
    with pytest.raises(RuntimeError, match="--overwrite"):
        make_trainer().on_train_start()


def test_batch_composition_hook(workspace):
    class Composed(nnSSL_MeanTeacherTrainer):
        composition = (1, 1)

        def batch_composition(self):
            return self.composition

    t = started(make_trainer(Composed))
    out = t.train_step(next(t.dataloader_train))
    assert out["n_labeled"] == 1 and out["n_unlabeled"] == 1
    t.composition = (0, 2)
    out = t.train_step(next(t.dataloader_train))
    assert out["sup_loss"] == 0 and out["unsup_loss"] > 0
    t.composition = (3, 0)
    with pytest.raises(ValueError, match="batch_composition"):
        t.train_step(next(t.dataloader_train))
    t.on_train_end()


def test_deep_supervision_policy(workspace):
    t = make_trainer()
    t.initialize()
    outs = [torch.full((1,), float(i + 1)) for i in range(len(t.loss.weight_factors))]
    assert t.ds_loss(lambda a: a.sum(), outs).item() == 1.0  # highest resolution only
    t.ssl_deep_supervision = True
    expected = sum(w * (i + 1) for i, w in enumerate(t.loss.weight_factors))
    assert t.ds_loss(lambda a: a.sum(), outs).item() == pytest.approx(expected)


def test_base_trainer_has_no_unlabeled_term(workspace):
    t = started(make_trainer(nnSSLTrainer))
    with pytest.raises(NotImplementedError):
        t.train_step(next(t.dataloader_train))
    t.on_train_end()


def test_step_with_nonfinite_gradients_is_skipped_and_counted(workspace):
    """On the CPU path (no GradScaler) a NaN gradient must not reach the weights; the skip is logged."""
    t = started(make_trainer())
    compute_loss = t.compute_loss
    t.compute_loss = lambda dl, tl, du: (lambda loss, terms: (loss * float("nan"), terms))(*compute_loss(dl, tl, du))
    before = [p.detach().clone() for p in t.network.parameters()]
    out = t.train_step(next(t.dataloader_train))
    assert out["n_nonfinite_loss_skips"] == 1
    assert all(torch.equal(a, b) for a, b in zip(t.network.parameters(), before))
    t.compute_loss = compute_loss
    out = t.train_step(next(t.dataloader_train))
    assert out["n_nonfinite_grad_skips"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(t.network.parameters(), before))
    t.on_train_end()


class _Background(torch.nn.Module):
    """Predicts background everywhere (a list of outputs, like a network with deep supervision)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.zeros((x.shape[0], self.num_classes, *x.shape[2:]))
        logits[:, 0] = 1.0
        return [logits]


class _WithOtherNetworks(nnSSL_MeanTeacherTrainer):
    def validation_networks(self):
        return {"same": self.network, "background": _Background(self.label_manager.num_segmentation_heads)}


def test_other_networks_are_validated_on_the_same_patches(workspace):
    t = started(make_trainer(_WithOtherNetworks))
    batch = next(t.dataloader_val)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    t.on_validation_epoch_start()
    with torch.no_grad():
        out = t.validation_step(batch)
    for key in ("tp_hard", "fp_hard", "fn_hard"):  # the deployed network itself gives nnU-Net's own counts
        assert np.array_equal(out[f"same_{key}"], out[key]), key
    # background everywhere: no true or false positives, every foreground voxel of each class is missed
    classes = range(1, t.label_manager.num_segmentation_heads)
    assert np.array_equal(out["background_fn_hard"], [float((target == c).sum()) for c in classes])
    assert not out["background_tp_hard"].any() and not out["background_fp_hard"].any()
    assert out["background_fn_hard"].sum() > 0  # the test patch has foreground (nnU-Net oversamples it)

    t.on_validation_epoch_end([out])
    log = t.logger.local_logger.my_fantastic_logging
    assert log["val_dice_same"] == log["mean_fg_dice"]
    present = out["background_fn_hard"] > 0
    assert log["val_dice_background"][0] == 0.0 if present.any() else np.isnan(log["val_dice_background"][0])
    t.on_train_end()


def test_other_networks_validation_can_be_switched_off(workspace):
    t = started(make_trainer(_WithOtherNetworks))
    t.validate_other_networks = False
    with torch.no_grad():
        out = t.validation_step(next(t.dataloader_val))
    assert set(out) == {"loss", "tp_hard", "fp_hard", "fn_hard"}
    t.on_validation_epoch_end([out])
    assert not any(k.startswith("val_dice_") for k in t.logger.local_logger.my_fantastic_logging)
    t.on_train_end()


# ---------------------------------------------------------------------- the seams: toolkit, helpers, schema
def test_hyperparameters_are_declared_once_logged_and_checkpointed(workspace, tmp_path):
    from nnssl.trainers.hyperparameters import hyperparameter

    class WithOne(nnSSL_MeanTeacherTrainer):
        my_constant = hyperparameter(3, "a method's constant")

    t = make_trainer(WithOne)
    assert t.my_constant == 3 and WithOne.my_constant.doc == "a method's constant"
    t.my_constant = 4  # an instance value, e.g. set by a subclass' __init__
    assert make_trainer(WithOne).my_constant == 3  # not shared between instances
    hp = t.ssl_hyperparameters()
    assert hp["my_constant"] == 4 and hp["unsup_weight"] == 0.2 and hp["ema_decay"] == 0.99 and "seed" in hp
    t.initialize()
    path = str(tmp_path / "c.pth")
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["nnssl"]["hyperparameters"]["my_constant"] == 4


def test_ds_loss_resizes_targets_and_follows_or_overrides_the_policy(workspace):
    t = make_trainer()
    t.initialize()
    outs = [torch.zeros(1, 2, 8 // 2 ** i, 8 // 2 ** i) for i in range(len(t.loss.weight_factors))]
    target = torch.arange(64).reshape(1, 1, 8, 8)
    seen = []

    def fn(o, y):
        assert y.shape[2:] == o.shape[2:] and y.dtype == target.dtype  # resized, still integer
        seen.append(y)
        return y.float().mean()

    assert t.ds_loss(fn, outs, targets=(target,)).item() == pytest.approx(31.5)  # top only by default
    total = t.ds_loss(fn, outs, targets=(target,), deep_supervision=True)
    assert len(seen) == 1 + sum(1 for w in t.loss.weight_factors if w != 0)
    assert torch.equal(seen[2], target[:, :, 1::2, 1::2])  # nearest-exact: the centre voxel of each 2x2
    assert total.item() == pytest.approx(sum(w * s.float().mean().item() for w, s in
                                             zip(t.loss.weight_factors, seen[1:])))


def test_step_log_schema_is_enforced_and_kinds_reach_the_logger(workspace):
    class NoSchema(nnSSL_MeanTeacherTrainer):
        def compute_loss(self, data_l, target_l, data_u):
            loss, log = super().compute_loss(data_l, target_l, data_u)
            return loss, dict(log)

    t = started(make_trainer())
    outputs = [t.train_step(next(t.dataloader_train))]
    t.on_train_epoch_end(outputs)
    kinds = t.logger.local_logger.kinds
    assert kinds["sup_loss"] == kinds["unsup_loss"] == "loss" and kinds["unsup_weight"] == "schedule"
    assert kinds["n_labeled"] == "count"
    t.on_train_end()
    bad = started(make_trainer(NoSchema))
    with pytest.raises(TypeError, match="step_log"):
        bad.train_step(next(bad.dataloader_train))
    bad.on_train_end()


def test_ema_teacher_helper_copies_at_start_updates_and_validates(workspace):
    t = started(make_trainer())
    assert t.validation_networks() == {"teacher": t.teacher}
    for a, b in zip(t.teacher.parameters(), t.network.parameters()):
        assert torch.equal(a, b)  # copied from the student when training starts
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.global_step = 1000
    t._update_ema_teachers()
    for a, b in zip(t.teacher.parameters(), t.network.parameters()):
        assert torch.allclose(a, 0.99 * (b - 1.0) + 0.01 * b, atol=1e-6)
    t.on_train_end()


def test_labeled_samples_kept_include_the_forced_foreground_one(workspace, monkeypatch):
    """nnU-Net forces foreground in the LAST sample of its batch of 2: a step with 1 labeled + 1 unlabeled sample
    keeps that one (the first would be kept by data[:1])."""
    class OneOne(nnSSL_MeanTeacherTrainer):
        def batch_composition(self):
            return 1, 1

    t = started(make_trainer(OneOne))
    assert t.batch_size == 2 and t.labeled_indices(1) == [1] and t.labeled_indices(2) == [0, 1]
    seen = {}
    real = t.compute_loss

    def spy(data_l, target_l, data_u):
        seen["data_l"], seen["target_l"] = data_l, target_l
        return real(data_l, target_l, data_u)

    monkeypatch.setattr(t, "compute_loss", spy)
    batch = next(t.dataloader_train)
    t.train_step(batch)
    assert torch.equal(seen["data_l"], batch["data"][1:2])
    assert torch.equal(seen["target_l"][0], batch["target"][0][1:2])
    t.on_train_end()


def _final_weights(trainer):
    trainer.run_training()
    ckpt = torch.load(join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return ckpt


@pytest.mark.slow
def test_same_seed_same_checkpoint_other_seed_other_checkpoint(workspace, monkeypatch):
    runs = {}
    for name, seed, env in (("a", 0, None), ("b", None, "0"), ("c", 1, None)):
        if env is not None:
            monkeypatch.setenv("nnssl_seed", env)  # the environment variable, when the attribute is unset
        else:
            monkeypatch.delenv("nnssl_seed", raising=False)
        torch.manual_seed(123 + len(runs))  # different global states: only the trainer's seed may matter
        np.random.seed(123 + len(runs))
        t = make_trainer(epochs=2, iters=2)
        t.seed = seed
        runs[name] = _final_weights(t)
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a["nnssl"]["seed"] == b["nnssl"]["seed"] == 0 and c["nnssl"]["seed"] == 1
    for part in ("network_weights",):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items())
        assert not all(torch.equal(v, c[part][k]) for k, v in a[part].items())
    teacher_a, teacher_b = a["nnssl"]["modules"]["teacher"], b["nnssl"]["modules"]["teacher"]
    assert all(torch.equal(v, teacher_b[k]) for k, v in teacher_a.items())


def test_old_checkpoint_format_resumes_and_predicts(workspace, tmp_path):
    """A checkpoint without what this round added (random streams, log kinds, seed) resumes with --c."""
    t = make_trainer(epochs=1, iters=2)
    t.run_training()
    final = join(t.output_folder, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    for key in ("rng_state", "batch_rng_state", "log_kinds", "seed"):
        del ckpt["nnssl"][key]
    old = str(tmp_path / "old.pth")
    torch.save(ckpt, old)
    r = make_trainer(epochs=2, iters=2)
    r.load_checkpoint(old)
    assert r.current_epoch == 1 and r.global_step == 2
    r.run_training()
    assert r.global_step == 4
    assert r.logger.local_logger.kinds["unsup_loss"] == "loss"  # kinds known again once logged


# ---------------------------------------------------------------------- Mean Teacher's faithfulness
def test_mean_teacher_keeps_ssl4mis_ratio_of_consistency_to_supervised_gradient(workspace):
    """SSL4MIS: 0.5 (Dice + CE) + 0.1 consistency; nnU-Net's supervised term is Dice + CE, so 0.2."""
    t = started(make_trainer())
    ssl4mis_supervised, ssl4mis_consistency = 0.5, 0.1
    assert t.unsup_weight / 1.0 == pytest.approx(ssl4mis_consistency / ssl4mis_supervised)
    t.global_step = t.num_epochs * t.num_iterations_per_epoch  # ramp at full weight
    _, data_l, target_l, data_u = batches(t)
    torch.manual_seed(0)
    total, terms = t.compute_loss(data_l, target_l, data_u)
    params = list(t.network.parameters())
    g_total, g_sup, g_unsup = grads(total, params), grads(terms["sup_loss"], params), grads(terms["unsup_loss"], params)
    ratio = ((g_total - g_sup) @ g_unsup) / (g_unsup @ g_unsup)
    assert ratio.item() == pytest.approx(0.2, rel=0.05)
    t.on_train_end()


def test_mean_teacher_student_is_perturbed_by_its_own_noise(workspace):
    """With a noiseless teacher equal to the student, only the student's own perturbation makes them differ."""
    t = started(make_trainer())
    t.teacher_noise_std = 0.0
    _, data_l, target_l, data_u = batches(t)
    _, with_noise = t.compute_loss(data_l, target_l, data_u)
    t.student_noise_std = 0.0
    _, without = t.compute_loss(data_l, target_l, data_u)
    assert with_noise["unsup_loss"].item() > 1e-8 and without["unsup_loss"].item() < 1e-10
    t.on_train_end()
