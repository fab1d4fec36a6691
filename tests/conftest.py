"""Shared fixtures: one tiny synthetic nnU-Net dataset, planned and preprocessed once per test session.

The session workspace is made with the real console scripts (nnUNetv2_plan_and_preprocess,
nnssl_preprocess_unlabeled, nnssl_make_split, nnssl_make_cpu_plans); tests that change files get their own
copy (``workspace``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

DATASET_ID = 990
DATASET = "Dataset990_nnsslSynthetic"
BIN = os.path.dirname(sys.executable)


def script(name: str) -> str:
    path = os.path.join(BIN, name)
    assert os.path.isfile(path), f"console script {name} not installed next to {sys.executable}"
    return path


def run(cmd, env, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a console script; fail the test with its output if it fails."""
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")
    return p


def nnunet_env(root: str, **extra) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
               nnUNet_results=os.path.join(root, "res"), nnUNet_def_n_proc="1", nnUNet_compile="f",
               nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def session_workspace(tmp_path_factory) -> str:
    from nnssl.dataset_conversion.synthetic import make_synthetic_dataset

    root = str(tmp_path_factory.mktemp("nnssl_ws"))
    env = nnunet_env(root)
    make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, n_labeled=16, n_unlabeled=6, n_test=3)
    plan_env = dict(env)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    plan_env.pop("nnUNet_n_proc_DA")
    run([script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "2d", "-np", "2",
         "-npfp", "2"], plan_env)
    run([script("nnssl_preprocess_unlabeled"), "-d", str(DATASET_ID), "--no-progress"], env)
    run([script("nnssl_make_split"), "-d", str(DATASET_ID), "--labeled", "25%"], env)
    run([script("nnssl_make_cpu_plans"), "-d", str(DATASET_ID), "--batch-size", "2"], env)
    return root


@pytest.fixture
def workspace(session_workspace, tmp_path, monkeypatch) -> str:
    """A private copy of the session workspace with nnU-Net's environment pointing at it."""
    root = str(tmp_path / "ws")
    shutil.copytree(session_workspace, root)
    for k, v in nnunet_env(root).items():
        if k.startswith("nnUNet") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)
    return root
