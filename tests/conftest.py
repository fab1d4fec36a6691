"""Shared fixtures: one tiny synthetic nnU-Net dataset, planned and preprocessed once per test session.

The session workspace is made with the real console scripts (nnUNetv2_plan_and_preprocess,
nnssl_preprocess_unlabeled, nnssl_make_split, nnssl_make_cpu_plans); tests that change files get their own
copy (``workspace``).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from nnssl import workflow

DATASET_ID = 990
DATASET = "Dataset990_nnsslSynthetic"
# the tests' workspaces name nnU-Net's raw, preprocessed and results folders so
FOLDERS = ("raw", "pre", "res")
# one process, no augmentation workers, no compilation, two threads: what 2 shared cores allow
TEST_SETTINGS = dict(nnUNet_def_n_proc="1", nnUNet_compile="f", nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2")

script = workflow.console_script


def run(cmd, env, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a console script (:func:`nnssl.workflow.run_step`); fail the test with its output's tail if it fails.

    The result's ``stdout`` has stdout and stderr interleaved, ``stderr`` is empty."""
    step = workflow.run_step(cmd, env, cwd=cwd, timeout=timeout)
    return subprocess.CompletedProcess(cmd, step.returncode, step.output, "")


def nnunet_env(root: str, **extra) -> dict:
    """:func:`nnssl.workflow.nnunet_env` with the tests' folder names and settings."""
    return workflow.nnunet_env(root, folders=FOLDERS, **{**TEST_SETTINGS, **extra})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run of a minute or more (benchmark, demo); "
                                       "deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def session_workspace(tmp_path_factory) -> str:
    from nnssl.dataset_conversion.synthetic import make_synthetic_dataset

    root = str(tmp_path_factory.mktemp("nnssl_ws"))
    ws = workflow.Workspace(root, nnunet_env(root))
    make_synthetic_dataset(ws.raw, DATASET_ID, n_labeled=16, n_unlabeled=6, n_test=3)
    ws.run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "2d", "-np", 2, "-npfp", 2],
           env=workflow.planner_env(ws.env))
    ws.run(["nnssl_preprocess_unlabeled", "-d", DATASET_ID, "--no-progress"])
    ws.run(["nnssl_make_split", "-d", DATASET_ID, "--labeled", "25%"])
    ws.run(["nnssl_make_cpu_plans", "-d", DATASET_ID, "--batch-size", 2])
    return root


@pytest.fixture
def workspace(session_workspace, tmp_path, monkeypatch) -> str:
    """A private copy of the session workspace with nnU-Net's environment pointing at it (the user's
    ``nnUNet_extTrainer`` is left as it is: the tests of the stock commands set it themselves)."""
    return private_copy(session_workspace, tmp_path, monkeypatch)


def private_copy(root, tmp_path, monkeypatch) -> str:
    """A copy of the workspace ``root`` under ``tmp_path/ws``, nnU-Net's environment pointing at it."""
    ws = str(tmp_path / "ws")
    shutil.copytree(root, ws)
    env = nnunet_env(ws)
    for k in workflow.FOLDER_VARS + tuple(TEST_SETTINGS):
        monkeypatch.setenv(k, env[k])
    return ws
