"""nnssl_make_cpu_plans: a smaller network on the same data, or nnU-Net's planning at a coarser spacing."""

import json
import os

import pytest

from conftest import DATASET, DATASET_ID
from nnssl.plans.cpu_plans import make_cpu_plans, scale_plans
from nnssl.utils import UserInputError


def _plans(name):
    return json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], DATASET, name + ".json")))


def test_scale_keeps_data_identifier_and_patch(workspace):
    src = _plans("nnUNetPlans")
    out = scale_plans(src, 0.25, batch_size=3, new_plans_name="p_cpu")
    for c, cfg in out["configurations"].items():
        orig = src["configurations"][c]
        assert cfg["data_identifier"] == orig["data_identifier"] and cfg["patch_size"] == orig["patch_size"]
        assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == [
            max(4, round(f / 4)) for f in orig["architecture"]["arch_kwargs"]["features_per_stage"]]
        assert cfg["batch_size"] == 3 and "inherits_from" not in cfg
    assert out["plans_name"] == "p_cpu" and src["plans_name"] == "nnUNetPlans"
    with pytest.raises(UserInputError):
        scale_plans(src, 0)


def test_spacing_factor_replans_with_nnunet_planner(workspace, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # the planner's trap: must still work
    make_cpu_plans(DATASET_ID, target_plans="coarse", configurations=["3d_fullres"], spacing_factor=2.0)
    cfg = _plans("coarse")["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [2.0, 2.0, 2.0] and cfg["data_identifier"] == "coarse_3d_fullres"
    assert all(p <= 16 for p in cfg["patch_size"])  # 32^3 images at half resolution
    with pytest.raises(UserInputError, match="exists"):
        make_cpu_plans(DATASET_ID, target_plans="coarse", spacing_factor=2.0)
