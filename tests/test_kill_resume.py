"""Real kills: the stock nnUNetv2_train in a subprocess, killed with SIGKILL mid-epoch and again while a checkpoint
is being written, then resumed with --c until it finishes and nnUNetv2_predict predicts.

What the resumed process trains on is reported by the process itself: a ``sitecustomize`` module on its
PYTHONPATH (made by the test) wraps ``nnSSLTrainer.train_step`` and saves, before the first step, the deployed
network, every extra network (teacher, second student), the epoch and the step counter; the test compares them
with the checkpoint_latest.pth the run resumed from. The write is widened with the test hook
``$nnssl_test_slow_checkpoint_s`` (a sleep between writing ``checkpoint_latest.pth.tmp<pid>`` and renaming it).
"""

import glob
import hashlib
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import DATASET, DATASET_ID, run, script
from nnssl.trainers.checkpoints import SLOW_CHECKPOINT_TEST_HOOK
from trainer_helpers import env_with_ext_trainer, predict_test_images

EPOCHS, ITERS = 3, 2  # a budget variant of 3 epochs writes checkpoint_latest.pth after epochs 0 and 1
REPORT = "nnssl_test_resumed_state"  # where the observer saves what the resumed run trains on
OBSERVER = f'''
import os

import torch

from nnssl.trainers.base import nnSSLTrainer, unwrap

_train_step = nnSSLTrainer.train_step


def _reporting_train_step(self, batch):
    if not os.path.exists(os.environ["{REPORT}"]):
        torch.save({{"current_epoch": self.current_epoch, "global_step": self.global_step,
                    "network": self.unwrapped_network.state_dict(),
                    "modules": {{k: unwrap(m).state_dict() for k, m in self.ssl_modules.items()}}}},
                   os.environ["{REPORT}"])
    return _train_step(self, batch)


nnSSLTrainer.train_step = _reporting_train_step
'''


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Run:
    """``nnUNetv2_train ... [--c]`` in the background, its output in a file."""

    def __init__(self, variant, env, log, resume):
        self.log = log
        cmd = [script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
               "-device", "cpu"] + (["--c"] if resume else [])
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, condition, what, timeout=600):
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                with open(self.log) as f:
                    pytest.fail(f"the run ended (exit code {self.proc.returncode}) before {what}:\n{f.read()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout} s")
            time.sleep(0.05)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL


def epoch_started(fold, epoch):
    def started():
        for log in glob.glob(os.path.join(fold, "training_log_*.txt")):
            with open(log) as f:
                if re.search(rf": Epoch {epoch} *$", f.read(), re.M):
                    return True
        return False
    return started


def assert_trains_on(report, checkpoint, modules):
    """The resumed process' state before its first step is the checkpoint's: epoch, step counter, networks."""
    assert os.path.isfile(report), "the resumed run reported no state (it never trained)"
    state = load(report)
    assert state["current_epoch"] == checkpoint["current_epoch"]
    assert state["global_step"] == checkpoint["nnssl"]["global_step"] == checkpoint["current_epoch"] * ITERS
    assert set(state["modules"]) == set(checkpoint["nnssl"]["modules"]) == set(modules)
    for k, v in checkpoint["network_weights"].items():
        assert torch.equal(state["network"][k], v), k
    for name in modules:
        saved = checkpoint["nnssl"]["modules"][name]
        # the comparison bites: the extra network differs from the student (a resume that re-copied it would fail)
        assert any(not torch.equal(v, checkpoint["network_weights"][k]) for k, v in saved.items()), name
        for k, v in saved.items():
            assert torch.equal(state["modules"][name][k], v), (name, k)


def assert_every_pth_readable(fold):
    for path in glob.glob(os.path.join(fold, "*.pth")):
        load(path)


@pytest.mark.slow
@pytest.mark.parametrize("trainer, modules", [("nnSSL_MeanTeacherTrainer", ("teacher",)),
                                              ("nnSSL_CADTrainer", ("student_2", "teacher"))])
def test_killed_mid_epoch_and_while_writing_resumes_with_c_finishes_and_predicts(workspace, tmp_path, trainer,
                                                                                  modules):
    variant = f"{trainer}_{EPOCHS}epochs_{ITERS}iters_1valiters"
    fold = os.path.join(workspace, "res", DATASET, f"{variant}__nnUNetPlans_cpu__3d_fullres", "fold_0")
    latest = os.path.join(fold, "checkpoint_latest.pth")
    env = env_with_ext_trainer()
    (tmp_path / "observer").mkdir()
    (tmp_path / "observer" / "sitecustomize.py").write_text(OBSERVER)
    observed = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "observer"),
                                                                  env.get("PYTHONPATH")])))

    # 1. SIGKILL mid-epoch: as soon as epoch 1 starts, after epoch 0 wrote checkpoint_latest.pth
    first = Run(variant, env, str(tmp_path / "run1.txt"), resume=False)
    first.wait_for(lambda: os.path.isfile(latest) and epoch_started(fold, 1)(), "epoch 1")
    first.kill()
    assert_every_pth_readable(fold)
    at_kill = load(latest)
    assert at_kill["current_epoch"] == 1 and at_kill["trainer_name"] == variant
    before_write = digest(latest)

    # 2. --c, SIGKILL while checkpoint_latest.pth is being written (between the temporary file and the rename)
    report1 = str(tmp_path / "resumed1.pth")
    second = Run(variant, dict(observed, **{SLOW_CHECKPOINT_TEST_HOOK: "120", REPORT: report1}),
                 str(tmp_path / "run2.txt"), resume=True)
    second.wait_for(lambda: glob.glob(latest + ".tmp*"), "checkpoint write")
    second.kill()
    assert_trains_on(report1, at_kill, modules)
    assert digest(latest) == before_write  # the previous checkpoint, untouched
    assert_every_pth_readable(fold)
    leftovers = [os.path.basename(p) for p in glob.glob(os.path.join(fold, "*.tmp*"))]
    assert leftovers == [f"checkpoint_latest.pth.tmp{second.proc.pid}"]  # not *.pth: no --c or predict reads it

    # 3. --c again, to the end: it resumes from the same checkpoint, then nnUNetv2_predict
    report2 = str(tmp_path / "resumed2.pth")
    run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
         "-device", "cpu", "--c"], dict(observed, **{REPORT: report2}))
    assert_trains_on(report2, at_kill, modules)
    final = load(os.path.join(fold, "checkpoint_final.pth"))
    assert final["current_epoch"] == EPOCHS and final["nnssl"]["global_step"] == EPOCHS * ITERS
    assert set(final["nnssl"]["modules"]) == set(modules)
    assert not glob.glob(os.path.join(fold, "*.tmp*")) and not os.path.exists(latest)
    predict_test_images(workspace, variant, env, str(tmp_path / "preds"))
