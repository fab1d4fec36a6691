"""Offline self-training with the real console scripts on the synthetic workspace: a stock nnUNetTrainer teacher,
``nnssl_pseudolabel``, then ``nnUNetv2_train -tr nnSSL_SelfTrainingTrainer`` (3D and 2D), ``--c``; the stored
pseudo-labels against the teacher's own ``nnUNetv2_predict``; an interrupted store completed by a rerun; bad
input."""

import json
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET, DATASET_ID, run, script
from trainer_helpers import env_with_ext_trainer
from nnssl import workflow
from nnssl.data.pseudo_labels import PseudoLabelStore, teacher_cost

TEACHER = "nnUNetTrainer_1epochs_2iters_1valiters"
STUDENT = "nnSSL_SelfTrainingTrainer_1epochs_2iters_1valiters"
PLANS = "nnUNetPlans_cpu"


def _train(trainer, configuration, env, *extra):
    run([script("nnUNetv2_train"), str(DATASET_ID), configuration, "0", "-tr", trainer, "-p", PLANS, "-device",
         "cpu", *extra], env)


def _pseudolabel(configuration, env, *extra):
    return workflow.run_step([script("nnssl_pseudolabel"), "-d", str(DATASET_ID), "-c", configuration, "-f", "0",
                              "-tr", TEACHER, "-p", PLANS, "-device", "cpu", "--no-progress", *extra], env,
                             timeout=600, check=False)


def _store(workspace, configuration):
    plans = json.load(open(os.path.join(workspace, "pre", DATASET, PLANS + ".json")))
    ident = plans["configurations"][configuration]["data_identifier"]
    folder = os.path.join(workspace, "pre", DATASET, "unlabeled", ident, "pseudo_labels",
                          f"{TEACHER}__{PLANS}__{configuration}__fold_0")
    return PseudoLabelStore(folder), plans, ident


def _student_checkpoint(workspace, configuration):
    return torch.load(os.path.join(workspace, "res", DATASET, f"{STUDENT}__{PLANS}__{configuration}", "fold_0",
                                   "checkpoint_final.pth"), map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_3d_pseudo_labels_equal_nnunet_predict_resume_after_interruption_and_self_training(workspace, tmp_path):
    env = env_with_ext_trainer()
    _train(TEACHER, "3d_fullres", env)
    step = _pseudolabel("3d_fullres", env)
    assert step.ok, step.tail()
    store, plans, ident = _store(workspace, "3d_fullres")
    m = store.manifest
    splits = json.load(open(os.path.join(workspace, "pre", DATASET, "splits_final.json")))
    assert m["complete"] and set(m["cases"]) == set(m["expected_cases"])
    assert {c for c, s in m["expected_cases"].items() if s == "hidden_label"} == set(splits[0]["unlabeled"])
    assert not set(m["cases"]) & set(splits[0]["val"])
    assert m["teacher"]["training_cases"] == {"0": sorted(splits[0]["train"])}
    assert m["teacher"]["mirroring"] is True and m["teacher"]["training_seconds"]["0"] > 0
    assert teacher_cost(m)["seconds"] == pytest.approx(m["teacher"]["training_seconds"]["0"] + m["prediction_seconds"])

    # the teacher's own nnUNetv2_predict (TTA on, as nnssl_pseudolabel by default), brought to the preprocessed grid
    preds = str(tmp_path / "preds")
    run([script("nnUNetv2_predict"), "-i", os.path.join(workspace, "raw", DATASET, "imagesUnlabeled"), "-o", preds,
         "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", TEACHER, "-p", PLANS, "-device", "cpu",
         "-npp", "1", "-nps", "1"], env)
    unlabeled_folder = os.path.join(workspace, "pre", DATASET, "unlabeled", ident)
    compared = 0
    for case in sorted(c for c, e in m["cases"].items() if e["source"] == "unlabeled"):
        props = pickle.load(open(os.path.join(unlabeled_folder, case + ".pkl"), "rb"))
        # no resampling in this dataset: the preprocessed grid is the cropped image's
        assert list(props["shape_after_cropping_and_before_resampling"]) == m["cases"][case]["shape"]
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(preds, case + ".nii.gz")))
        pred = pred.transpose(plans["transpose_forward"])
        pred = pred[tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])]
        pl, conf = store.load_case(case)
        assert pl.shape == pred.shape and np.array_equal(pl, pred), case
        assert conf.min() >= 1 / 3 - 1e-3 and conf.max() <= 1.0
        compared += 1
    assert compared == 6

    # an interrupted run (killed while writing): three cases unlisted, one file half-written, a temporary file left
    before = {c: store.load_case(c) for c in m["cases"]}
    lost = sorted(m["cases"])[:3]
    for c in lost:
        del m["cases"][c]
    m["complete"], m["completed"] = False, None
    store.save()
    pl_file = os.path.join(store.folder, lost[0] + "_pl.npy")
    with open(pl_file, "r+b") as f:
        f.truncate(40)
    open(os.path.join(store.folder, lost[1] + "_conf.npy.tmp"), "wb").write(b"\0" * 7)
    refused = workflow.run_step([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", STUDENT, "-p",
                                 PLANS, "-device", "cpu"], env, timeout=600, check=False)
    assert not refused.ok and "incomplete" in refused.output and "nnssl_pseudolabel" in refused.output
    step = _pseudolabel("3d_fullres", env)
    assert step.ok and f"{len(before) - 3} case(s) already pseudo-labeled" in step.output, step.tail()
    store = PseudoLabelStore(store.folder)
    assert store.complete and set(store.manifest["cases"]) == set(before)
    for c in lost:
        for new, old in zip(store.load_case(c), before[c]):
            assert np.array_equal(new, old)

    # the student through the stock CLI; its checkpoint names the pseudo-labels and their cost; --c keeps them
    _train(STUDENT, "3d_fullres", env)
    ident_ckpt = _student_checkpoint(workspace, "3d_fullres")["nnssl"]["extra"]["pseudo_labels"]
    assert ident_ckpt["folder"] == store.folder and ident_ckpt["cost"] == teacher_cost(store.manifest)
    _train(STUDENT, "3d_fullres", env, "--c")
    assert _student_checkpoint(workspace, "3d_fullres")["nnssl"]["extra"]["pseudo_labels"]["folder"] == store.folder


@pytest.mark.slow
def test_2d_two_commands_and_bad_input(workspace):
    env = env_with_ext_trainer()
    missing = _pseudolabel("2d", env)
    assert missing.returncode == 2 and "no trained teacher" in missing.output and "nnUNetv2_train" in missing.output
    _train(TEACHER, "2d", env)
    no_fold = workflow.run_step([script("nnssl_pseudolabel"), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "1",
                                 "-tr", TEACHER, "-p", PLANS, "-device", "cpu"], env, check=False)
    assert no_fold.returncode == 2 and "fold_1" in no_fold.output and "fold_0" in no_fold.output
    step = _pseudolabel("2d", env, "--disable-tta")
    assert step.ok, step.tail()
    store, _, _ = _store(workspace, "2d")
    assert store.complete and store.manifest["teacher"]["mirroring"] is False
    _train(STUDENT, "2d", env)
    ckpt = _student_checkpoint(workspace, "2d")
    assert ckpt["nnssl"]["extra"]["pseudo_labels"]["tag"] == store.tag and ckpt["nnssl"]["global_step"] == 2
    # other TTA settings than the stored ones: replace explicitly
    other = _pseudolabel("2d", env)
    assert other.returncode == 2 and "--overwrite" in other.output
    # an empty pool: fold 'all' has no hidden-label cases, and without unlabeled images there is nothing
    os.remove(os.path.join(store.folder, "..", "..", "nnssl_unlabeled.json"))
    empty = workflow.run_step([script("nnssl_pseudolabel"), "-d", str(DATASET_ID), "-c", "2d", "-f", "all", "-tr",
                               TEACHER, "-p", PLANS], env, check=False)
    assert empty.returncode == 2 and "empty" in empty.output and "nnssl_preprocess_unlabeled" in empty.output
