"""Helpers shared by the trainer tests: in-process trainers on the session's synthetic workspace, their batches
and gradients, and the stock console scripts' environment and prediction."""

import os
import subprocess

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from conftest import DATASET, DATASET_ID, run, script
from nnssl.trainers.mean_teacher import nnSSL_MeanTeacherTrainer


def make_trainer(cls=nnSSL_MeanTeacherTrainer, configuration="3d_fullres", plans_name="nnUNetPlans_cpu", fold=0,
                 epochs=2, iters=2):
    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    plans = load_json(join(pre, plans_name + ".json"))
    plans["continue_training"] = False
    trainer = cls(plans, configuration, fold, load_json(join(pre, "dataset.json")), torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iters, 1
    return trainer


def started(trainer):
    torch.manual_seed(0)
    np.random.seed(0)
    trainer.on_train_start()
    return trainer


def started_2d(cls, batch_size=4):
    """A started trainer of the 2D configuration (nnU-Net's plans) with ``batch_size`` labeled and unlabeled."""
    t = started(make_trainer(cls, configuration="2d", plans_name="nnUNetPlans"))
    t.batch_size = t.unlabeled_batch_size_per_rank = batch_size
    t.dataloader_train = t.get_dataloaders()[0]
    t.dataloader_unlabeled = t.get_unlabeled_dataloader(t.unlabeled_pool)
    return t


def batches(trainer):
    batch = next(trainer.dataloader_train)
    data_l = batch["data"]
    target_l = batch["target"]
    data_u = next(trainer.dataloader_unlabeled)["data"]
    return batch, data_l, target_l, data_u


def grads(loss, params):
    """Flat gradient of ``loss`` w.r.t. ``params`` (zeros for parameters the loss does not use)."""
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(gs, params)])


def predict_test_images(workspace: str, variant: str, env: dict, preds: str) -> None:
    """The stock nnUNetv2_predict of the synthetic test images with ``variant``'s fold 0 (CPU plans, no TTA); one
    prediction per image."""
    images = os.path.join(workspace, "raw", DATASET, "imagesTs")
    run([script("nnUNetv2_predict"), "-i", images, "-o", preds, "-d", str(DATASET_ID), "-c", "3d_fullres", "-f",
         "0", "-tr", variant, "-p", "nnUNetPlans_cpu", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_tta"], env)
    assert sorted(f for f in os.listdir(preds) if f.endswith(".nii.gz")) == sorted(
        f.replace("_0000", "") for f in os.listdir(images))


def env_with_ext_trainer():
    """The environment with nnUNet_extTrainer as `nnssl_trainer_path` prints it (the stock scripts find nnssl)."""
    env = dict(os.environ)
    export = subprocess.run([script("nnssl_trainer_path")], capture_output=True, text=True, env=env).stdout
    assert export.startswith("export nnUNet_extTrainer=")
    env["nnUNet_extTrainer"] = export.strip().split("=", 1)[1].strip("'\"")
    return env
