"""nnssl_demo runs the whole workflow (a tiny budget here; the default budget is measured in the README), through
:mod:`nnssl.workflow`, whose environment, logging and errors are checked here too."""

import json
import os
import subprocess
import sys

import pytest

from conftest import nnunet_env
from nnssl import workflow
from nnssl.nnunet_ext import EXT_TRAINER_DIR
from nnssl.utils import UserInputError


def test_workflow_environment_leaves_os_environ_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/my/trainers")
    monkeypatch.setenv("nnUNet_raw", "/my/raw")
    before = dict(os.environ)
    env = workflow.nnunet_env(str(tmp_path), nnUNet_def_n_proc=1)
    assert env["nnUNet_raw"] == str(tmp_path / "nnUNet_raw") and env["nnUNet_def_n_proc"] == "1"
    assert env["nnUNet_extTrainer"] == EXT_TRAINER_DIR + os.pathsep + "/my/trainers"
    assert "nnUNet_n_proc_DA" not in workflow.planner_env(dict(env, nnUNet_n_proc_DA="0"))
    with workflow.Workspace(str(tmp_path), env).environ():
        assert os.environ["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    assert dict(os.environ) == before


def test_workflow_step_is_logged_and_a_failure_names_its_output(tmp_path):
    log = str(tmp_path / "logs" / "steps.txt")
    ws = workflow.Workspace(str(tmp_path), log=log)
    code = "import os, sys; print(os.environ['nnUNet_results']); sys.exit(int(sys.argv[1]))"
    step = ws.run([sys.executable, "-c", code, 0], "ok step")
    assert step.ok and step.output.strip() == ws.results and step.seconds > 0 and step.peak_rss_mb > 1
    failed = r"(?s)'bad step' failed \(exit code 3\).*steps.txt\n--- end of its output ---\n.*nnUNet_results"
    with pytest.raises(workflow.StepFailed, match=failed):
        ws.run([sys.executable, "-c", code, 3], "bad step")
    assert [s.returncode for s in ws.steps] == [0, 3]
    text = open(log).read()
    assert text.count(f"$ {sys.executable} -c") == 2 and "[exit code 3 after" in text and ws.results in text
    slow = workflow.run_step([sys.executable, "-c", "import time; time.sleep(30)"], {}, timeout=0.5, check=False)
    assert slow.timed_out and not slow.ok and slow.seconds < 10
    with pytest.raises(UserInputError, match="no_such_script_anywhere"):
        workflow.console_script("no_such_script_anywhere")


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    work = str(tmp_path / "demo")
    code = ("from nnssl.commands.demo import run_demo\n"
            f"run_demo({work!r}, epochs=1, iters=2, val_iters=1, labeled='3', synthetic_cases=(10, 3, 2))\n")
    env = nnunet_env(str(tmp_path))  # the demo must ignore the user's nnU-Net folders and use its own
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.load(open(os.path.join(work, "demo_results.json")))
    assert [r["trainer"] for r in results["rows"]] == ["nnUNetTrainer", "nnSSL_MeanTeacherTrainer"]
    for row in results["rows"]:
        assert set(row["dice"]) == {"anterior", "posterior"}
    assert [s["step"] for s in results["steps"]][-2:] == ["train nnSSL_MeanTeacherTrainer",
                                                          "predict nnSSL_MeanTeacherTrainer"]
    for f in ("demo_results.md", "demo_results.png", "demo_log.txt"):
        assert os.path.isfile(os.path.join(work, f))
    assert not os.path.exists(os.path.join(str(tmp_path), "res"))  # nothing written to the user's nnUNet_results
    p = subprocess.run([sys.executable, "-m", "nnssl.commands.demo", "-o", work], env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "--overwrite" in p.stderr
