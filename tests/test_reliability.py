"""Runs that fail loudly instead of silently: the non-finite guard of the base step, checkpoints that cannot be
read on --c, and trainer names that give no trainer (in-process where possible; the real kill tests are in
test_kill_resume.py)."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATASET, DATASET_ID, script
from nnssl.commands import trainer_path
from nnssl.nnunet_ext import EXT_TRAINER_DIR
from nnssl.trainers.checkpoints import RESTART_ON_BAD_CHECKPOINT
from nnssl.trainers.variants import variant_name_problem
from trainer_helpers import env_with_ext_trainer, make_trainer, started


def poison_unsup_loss(trainer, calls):
    """Make the ``unsup_loss`` term (and so the total) NaN in the given calls of ``compute_loss`` (0-based)."""
    compute_loss, count = trainer.compute_loss, itertools.count()

    def poisoned(data_l, target_l, data_u):
        loss, log = compute_loss(data_l, target_l, data_u)
        if next(count) in calls:
            log["unsup_loss"] = log["unsup_loss"] * float("nan")
            loss = loss + log["unsup_loss"]
        return loss, log

    trainer.compute_loss = poisoned


def snapshot(trainer):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in (trainer.network, trainer.teacher)]


def unchanged(trainer, before) -> bool:
    return all(torch.equal(v, now.state_dict()[k]) for saved, now in zip(before, (trainer.network, trainer.teacher))
               for k, v in saved.items())


# ---------------------------------------------------------------------- the non-finite guard
def test_nonfinite_loss_skips_the_step_and_the_run_goes_on(workspace):
    t = started(make_trainer())
    poison_unsup_loss(t, calls=range(1, 4))
    after_step = []
    t.after_optimizer_step = lambda: after_step.append(t.global_step)
    outputs = [t.train_step(next(t.dataloader_train))]
    assert outputs[0]["n_nonfinite_loss_skips"] == 0 and t.global_step == 1
    for i in range(3):
        before = snapshot(t)
        outputs.append(t.train_step(next(t.dataloader_train)))
        assert outputs[-1]["n_nonfinite_loss_skips"] == 1 and outputs[-1]["n_nonfinite_grad_skips"] == 0
        assert unchanged(t, before)  # no optimizer step, no EMA teacher update
        assert t.global_step == 1 and after_step == [0]  # a skipped step is no optimizer step
        assert t._nonfinite_streak == (("unsup_loss",),) * (i + 1)
    before = snapshot(t)
    outputs.append(t.train_step(next(t.dataloader_train)))
    assert outputs[-1]["n_nonfinite_loss_skips"] == 0 and t._nonfinite_streak == ()
    assert not unchanged(t, before) and t.global_step == 2 and after_step == [0, 1]
    t.on_train_epoch_end(outputs)
    assert t.logger.local_logger.kinds["n_nonfinite_loss_skips"] == "count"
    assert t.logger.local_logger.my_fantastic_logging["n_nonfinite_loss_skips"] == [3 / 5]


def test_nonfinite_gradient_skips_the_whole_step(workspace):
    """CPU path: a finite loss with a NaN gradient norm is skipped like a NaN loss, and counted apart."""
    t = started(make_trainer())
    hook = next(t.network.parameters()).register_hook(lambda g: g * float("nan"))
    before = snapshot(t)
    out = t.train_step(next(t.dataloader_train))
    assert out["n_nonfinite_grad_skips"] == 1 and out["n_nonfinite_loss_skips"] == 0
    assert unchanged(t, before) and t.global_step == 0
    assert t._nonfinite_streak == (("the gradient norm of network",),)
    hook.remove()
    out = t.train_step(next(t.dataloader_train))
    assert out["n_nonfinite_grad_skips"] == 0 and t._nonfinite_streak == () and t.global_step == 1


def test_many_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(workspace):
    t = make_trainer(epochs=4, iters=2)
    t.save_every, t.max_consecutive_nonfinite_steps = 1, 3
    poison_unsup_loss(t, calls=range(2, 100))  # epoch 0 trains, then every step is NaN
    with pytest.raises(RuntimeError) as error:
        t.run_training()
    message = str(error.value)
    assert "3 steps in a row skipped for non-finite values at epoch 2, after optimizer step 2" in message
    assert "unsup_loss in 3" in message and "max_consecutive_nonfinite_steps" in message
    latest = os.path.join(t.output_folder, "checkpoint_latest.pth")
    ckpt = torch.load(latest, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1 and ckpt["nnssl"]["global_step"] == 2  # written after epoch 0, kept since
    for k, v in ckpt["network_weights"].items():  # the weights of the last good step, finite
        assert torch.equal(v, t.network.state_dict()[k]) and torch.isfinite(v).all(), k
    for k, v in ckpt["nnssl"]["modules"]["teacher"].items():
        assert torch.equal(v, t.teacher.state_dict()[k]), k
    with open(t.log_file) as f:
        assert "checkpoint_latest.pth kept as it is, not replaced: the last 2 steps were skipped" in f.read()


# ---------------------------------------------------------------------- checkpoints that cannot be read
GARBAGE = bytes(range(256)) * 16  # neither a zip archive nor a pickle


@pytest.fixture
def checkpoints(workspace, tmp_path):
    """A trainer that trained two steps, its checkpoint as checkpoint_best.pth in a folder, and a writer of bad
    checkpoint_latest.pth files there."""
    t = started(make_trainer())
    for _ in range(2):
        t.train_step(next(t.dataloader_train))
    folder = tmp_path / "fold_0"
    folder.mkdir()
    t.save_checkpoint(str(folder / "checkpoint_best.pth"))
    good = (folder / "checkpoint_best.pth").read_bytes()
    bad = {"truncated": good[:1000], "garbage": GARBAGE, "empty": b""}

    def write_latest(kind):
        (folder / "checkpoint_latest.pth").write_bytes(bad[kind])
        return str(folder / "checkpoint_latest.pth")

    return t, folder, write_latest


def resuming_trainer():
    r = make_trainer()
    r.logger.resume = True  # what nnU-Net's --c sets (plans["continue_training"])
    return r


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_unreadable_latest_falls_back_to_best(checkpoints, kind, capsys):
    t, folder, write_latest = checkpoints
    r = resuming_trainer()
    r.load_checkpoint(write_latest(kind))
    assert r.global_step == 2 and r._ssl_state_loaded
    for k, v in t.teacher.state_dict().items():
        assert torch.equal(r.teacher.state_dict()[k], v), k
    out = capsys.readouterr().out
    assert "checkpoint_latest.pth cannot be read (" in out and "resuming from checkpoint_best.pth (epoch 1)" in out
    assert ("empty file" if kind == "empty" else "truncated or not a checkpoint") in out


def test_unreadable_latest_without_fallback_fails_clearly_or_restarts_on_request(checkpoints, monkeypatch, capsys):
    t, folder, write_latest = checkpoints
    os.remove(folder / "checkpoint_best.pth")
    latest = write_latest("truncated")
    with pytest.raises(RuntimeError) as error:
        resuming_trainer().load_checkpoint(latest)
    message = str(error.value)
    assert message.startswith(f"{latest} cannot be read (truncated or not a checkpoint, 1000 bytes")
    assert "no readable checkpoint_best.pth to resume from" in message
    assert f"rerun with {RESTART_ON_BAD_CHECKPOINT}=1 or delete the file" in message
    assert error.value.__cause__ is None and error.value.__context__ is None  # no unpickling traceback attached
    with pytest.raises(RuntimeError, match="rerun the training with --c"):  # --val, --val_best, a caller's path
        make_trainer().load_checkpoint(latest)

    monkeypatch.setenv(RESTART_ON_BAD_CHECKPOINT, "1")
    r = resuming_trainer()
    r.load_checkpoint(latest)
    assert r.current_epoch == 0 and r.global_step == 0 and not r._ssl_state_loaded
    assert f"{RESTART_ON_BAD_CHECKPOINT}=1: starting this training over" in capsys.readouterr().out


def test_stock_train_with_c_on_an_unreadable_checkpoint_names_file_problem_and_fix(workspace):
    variant = "nnSSL_MeanTeacherTrainer_1epochs_1iters_1valiters"
    fold = os.path.join(workspace, "res", DATASET, f"{variant}__nnUNetPlans_cpu__3d_fullres", "fold_0")
    os.makedirs(fold)
    with open(os.path.join(fold, "checkpoint_latest.pth"), "wb") as f:
        f.write(GARBAGE)
    p = subprocess.run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p",
                        "nnUNetPlans_cpu", "-device", "cpu", "--c"], env=env_with_ext_trainer(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "checkpoint_latest.pth cannot be read (truncated or not a " \
        "checkpoint, 4096 bytes: UnpicklingError: invalid load key" in last and RESTART_ON_BAD_CHECKPOINT in last
    assert "During handling of the above exception" not in p.stderr


# ---------------------------------------------------------------------- trainer names
BAD_NAMES = {
    "nnSSL_MeanTeacherTrainer_5epochs_xiters": ("budget suffix '_5epochs_xiters' does not parse",
                                                "use nnSSL_MeanTeacherTrainer_5epochs"),
    "nnSSL_MeanTeacherTrainer_0epochs": ("its budget has 0 epochs", "use nnSSL_MeanTeacherTrainer_1epochs"),
    "nnSSL_MeanTeacherTrainer_5epochs_0iters": ("its budget has 0 iters",
                                                "use nnSSL_MeanTeacherTrainer_5epochs_1iters"),
    "nnSSL_CADTrainer_2epochs_2iters_0valiters": ("its budget has 0 valiters",
                                                  "use nnSSL_CADTrainer_2epochs_2iters_1valiters"),
    "nnSSL_MeanTeacherTrainer_5epoch": ("budget suffix '_5epoch' does not parse",
                                        "use nnSSL_MeanTeacherTrainer_5epochs"),
    "nnSSL_MeanTeachrTrainer_5epochs": ("there is no trainer 'nnSSL_MeanTeachrTrainer' to give a budget to",
                                        "use nnSSL_MeanTeacherTrainer_5epochs"),
    "nnUNetTrainer_5epochs_xiters": ("budget suffix '_5epochs_xiters' does not parse", "use nnUNetTrainer_5epochs"),
}


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_bad_budget_names_say_what_is_wrong_and_the_name_that_works(name):
    problem, fix = BAD_NAMES[name]
    message = variant_name_problem(name)
    assert message.startswith(f"{name!r} is not a trainer: ") and problem in message and message.endswith(fix)


@pytest.mark.parametrize("name", ["nnSSL_MeanTeacherTrainer", "nnSSL_MeanTeacherTrainer_5epochs_2iters_1valiters",
                                  "nnUNetTrainer_250epochs_NoMirroring", "MyTrainer", "MyTrainer_fast"])
def test_good_names_and_names_not_meant_as_variants_have_no_problem(name):
    assert variant_name_problem(name) is None


def test_stock_lookup_reports_a_bad_budget_unless_a_later_folder_may_define_it(tmp_path):
    """nnU-Net's own lookup (hasattr on the exports module) surfaces the clear error; with another
    nnUNet_extTrainer folder after nnssl's, the lookup goes on there (that folder may define the name)."""
    code = ("import io, contextlib\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "for ext in ({!r}, {!r}):\n"
            "    __import__('os').environ['nnUNet_extTrainer'] = ext\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()):\n"
            "            find('nnSSL_MeanTeacherTrainer_5epochs_xiters')\n"
            "    except RuntimeError as e:\n"
            "        print(type(e).__name__, str(e).splitlines()[0])\n"
            ).format(EXT_TRAINER_DIR, EXT_TRAINER_DIR + os.pathsep + str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    alone, followed = p.stdout.splitlines()
    assert alone == f"TrainerNameError {variant_name_problem('nnSSL_MeanTeacherTrainer_5epochs_xiters')}"
    assert followed.startswith("RuntimeError Could not find requested nnunet trainer")


@pytest.mark.parametrize("name, other_folder, expected", [
    ("nnSSL_MeanTeacherTrainer_0epochs", False, "its budget has 0 epochs; budget variants are "),
    ("nnSSL_MeanTeachrTrainer", True, "no trainer called 'nnSSL_MeanTeachrTrainer': not in nnU-Net, not one of "
                                      "nnssl's")])
def test_nnssl_train_says_what_is_wrong_with_a_name_in_one_line(name, other_folder, expected, tmp_path):
    """Through the exports module (a budget of zero) and through nnU-Net's generic error (a misspelled name,
    another folder in nnUNet_extTrainer): one line, no traceback."""
    env = dict(os.environ)
    env.pop("nnUNet_extTrainer", None)
    if other_folder:
        env["nnUNet_extTrainer"] = str(tmp_path)
    p = subprocess.run([script("nnssl_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", name, "-device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nnssl_train: ") and expected in last
    assert last.endswith("use nnSSL_MeanTeacherTrainer_1epochs" if "0epochs" in name else
                         "use nnSSL_MeanTeacherTrainer")


def test_trainer_path_check_reports_missing_and_stale_values_with_the_fix(tmp_path, monkeypatch, capsys):
    fix = f"fix: export nnUNet_extTrainer={EXT_TRAINER_DIR}"
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(SystemExit) as exit_:
        trainer_path.main(["--check"])
    assert str(exit_.value).startswith("nnssl_trainer_path: nnUNet_extTrainer is not set") and \
        str(exit_.value).endswith(fix)

    gone = str(tmp_path / "old_venv" / "nnssl" / "nnunet_ext")  # e.g. a virtual environment since recreated
    monkeypatch.setenv("nnUNet_extTrainer", gone + os.pathsep + str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        trainer_path.main(["--check"])
    assert f"({gone} does not exist; {tmp_path} holds no nnssl_trainer_exports.py)" in str(exit_.value)
    assert str(exit_.value).endswith(fix + os.pathsep + str(tmp_path))  # the user's own folder is kept

    monkeypatch.setenv("nnUNet_extTrainer", trainer_path.ext_trainer_value(str(tmp_path)))
    trainer_path.main(["--check"])
    assert capsys.readouterr().out.startswith("nnUNet_extTrainer finds nnssl's trainers: ")
