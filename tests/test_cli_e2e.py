"""End to end with the real console scripts: plan, unlabeled preprocessing, split (session fixture), then
nnUNetv2_train with a short budget variant, --c, and nnUNetv2_predict; and nnssl's wrapper commands."""

import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET, DATASET_ID, run, script
from trainer_helpers import env_with_ext_trainer

VARIANT = "nnSSL_MeanTeacherTrainer_2epochs_3iters_1valiters"


@pytest.mark.slow
def test_train_resume_predict_with_stock_commands(workspace, tmp_path):
    env = env_with_ext_trainer()
    run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", VARIANT, "-p", "nnUNetPlans_cpu",
         "-device", "cpu"], env)
    out = os.path.join(workspace, "res", DATASET, f"{VARIANT}__nnUNetPlans_cpu__3d_fullres", "fold_0")
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == VARIANT and ckpt["nnssl"]["global_step"] == 6
    assert "teacher" in ckpt["nnssl"]["modules"]
    assert os.path.isfile(os.path.join(out, "validation", "summary.json"))
    assert os.path.isfile(os.path.join(out, "progress.png"))

    # --c on a finished run: nnU-Net resumes from checkpoint_final, trains nothing more, validates again
    run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", VARIANT, "-p", "nnUNetPlans_cpu",
         "-device", "cpu", "--c"], env)
    again = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert again["nnssl"]["global_step"] == 6
    for k, v in ckpt["nnssl"]["modules"]["teacher"].items():
        assert torch.equal(again["nnssl"]["modules"]["teacher"][k], v)

    preds = str(tmp_path / "preds")
    images = os.path.join(workspace, "raw", DATASET, "imagesTs")
    run([script("nnUNetv2_predict"), "-i", images, "-o", preds, "-d", str(DATASET_ID), "-c", "3d_fullres", "-f",
         "0", "-tr", VARIANT, "-p", "nnUNetPlans_cpu", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_tta"], env)
    files = sorted(f for f in os.listdir(preds) if f.endswith(".nii.gz"))
    assert files == [f"synthtest_{i:03d}.nii.gz" for i in range(3)]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(preds, files[0])))
    assert seg.shape == (32, 32, 32) and set(np.unique(seg)) <= {0, 1, 2}


@pytest.mark.slow
def test_predict_without_ext_trainer_fails_and_wrappers_work(workspace, tmp_path):
    env = dict(os.environ)
    env.pop("nnUNet_extTrainer", None)
    variant = "nnSSL_MeanTeacherTrainer_1epochs_2iters_1valiters"
    # the wrapper sets nnUNet_extTrainer itself
    run([script("nnssl_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
         "-device", "cpu", "--disable_checkpointing"], env)
    images = os.path.join(workspace, "raw", DATASET, "imagesTs")
    # no checkpoint_final with --disable_checkpointing: train a stock baseline variant to predict with instead
    run([script("nnssl_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainer_1epochs_2iters_1valiters",
         "-p", "nnUNetPlans_cpu", "-device", "cpu"], env)
    p = subprocess.run([script("nnUNetv2_predict"), "-i", images, "-o", str(tmp_path / "a"), "-d", str(DATASET_ID),
                        "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_1epochs_2iters_1valiters", "-p",
                        "nnUNetPlans_cpu", "-device", "cpu"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "nnUNet_extTrainer" in (p.stdout + p.stderr)
    run([script("nnssl_predict"), "-i", images, "-o", str(tmp_path / "b"), "-d", str(DATASET_ID), "-c",
         "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_1epochs_2iters_1valiters", "-p", "nnUNetPlans_cpu",
         "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    assert len([f for f in os.listdir(tmp_path / "b") if f.endswith(".nii.gz")]) == 3


@pytest.mark.slow
def test_mean_teacher_needs_unlabeled_images_clear_cli_error(workspace):
    import json
    import shutil

    pre = os.path.join(workspace, "pre", DATASET)
    shutil.rmtree(os.path.join(pre, "unlabeled"))
    splits = json.load(open(os.path.join(pre, "splits_final.json")))
    for fold in splits:
        fold.pop("unlabeled")
    json.dump(splits, open(os.path.join(pre, "splits_final.json"), "w"))
    p = subprocess.run([script("nnssl_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", VARIANT, "-p",
                        "nnUNetPlans_cpu", "-device", "cpu"], env=dict(os.environ), capture_output=True, text=True)
    assert p.returncode != 0
    assert "needs unlabeled images" in p.stderr and "nnssl_preprocess_unlabeled" in p.stderr
