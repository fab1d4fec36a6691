"""Offline self-training with the real console scripts on the synthetic workspace: a stock nnUNetTrainer teacher,
``nnssl_pseudolabel``, then ``nnUNetv2_train -tr nnSSL_SelfTrainingTrainer`` (3D and 2D), ``--c``; the stored
pseudo-labels against the teacher's own ``nnUNetv2_predict``; an interrupted store completed by a rerun; bad
input. Then, on teachers trained once for the module (``teachers``: folds 0 and 1 of the 3d_fullres teacher): a
``nnssl_pseudolabel`` really killed with SIGKILL and rerun, ``-pretrained_weights`` of the teacher, and an
ensemble teacher of two folds (``-f 0 1``) against ``nnUNetv2_predict -f 0 1``.

What a subprocess does at a chosen moment is arranged from the test's side, as in test_kill_resume.py: a
``sitecustomize`` module on the child's PYTHONPATH (written by the test) wraps an nnssl method; production code has
no hook for it."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET, DATASET_ID, nnunet_env, private_copy, run, script
from trainer_helpers import env_with_ext_trainer, make_trainer, started
from nnssl import workflow
from nnssl.data.pseudo_labels import PseudoLabelStore, case_files, teacher_cost
from nnssl.trainers.self_training import nnSSL_SelfTrainingTrainer

TEACHER = "nnUNetTrainer_1epochs_2iters_1valiters"
STUDENT = "nnSSL_SelfTrainingTrainer_1epochs_2iters_1valiters"
PLANS = "nnUNetPlans_cpu"


def _train(trainer, configuration, env, *extra):
    run([script("nnUNetv2_train"), str(DATASET_ID), configuration, "0", "-tr", trainer, "-p", PLANS, "-device",
         "cpu", *extra], env)


def _pseudolabel_command(configuration, *extra, folds=("0",)):
    return [script("nnssl_pseudolabel"), "-d", str(DATASET_ID), "-c", configuration, "-f", *folds, "-tr", TEACHER,
            "-p", PLANS, "-device", "cpu", "--no-progress", *extra]


def _pseudolabel(configuration, env, *extra, folds=("0",)):
    return workflow.run_step(_pseudolabel_command(configuration, *extra, folds=folds), env, timeout=600, check=False)


def _store(workspace, configuration, folds=("0",)):
    plans = json.load(open(os.path.join(workspace, "pre", DATASET, PLANS + ".json")))
    ident = plans["configurations"][configuration]["data_identifier"]
    folder = os.path.join(workspace, "pre", DATASET, "unlabeled", ident, "pseudo_labels",
                          f"{TEACHER}__{PLANS}__{configuration}__fold_{'_'.join(folds)}")
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


# ---------------------------------------------------------------------------------------------- trained teachers
def _teacher_checkpoint(workspace, fold):
    return os.path.join(workspace, "res", DATASET, f"{TEACHER}__{PLANS}__3d_fullres", f"fold_{fold}",
                        "checkpoint_final.pth")


def _train_teacher_fold(root, fold):
    run([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", str(fold), "-tr", TEACHER, "-p", PLANS,
         "-device", "cpu"], nnunet_env(root))
    assert os.path.isfile(_teacher_checkpoint(root, fold))


@pytest.fixture(scope="module")
def teachers(session_workspace, tmp_path_factory) -> str:
    """A copy of the session workspace with the 3d_fullres teacher (TEACHER) trained on fold 0, once for the
    module's tests (each works on its own copy, :func:`conftest.private_copy`)."""
    root = str(tmp_path_factory.mktemp("teachers") / "ws")
    shutil.copytree(session_workspace, root)
    _train_teacher_fold(root, 0)
    return root


@pytest.fixture(scope="module")
def teachers_two_folds(teachers) -> str:
    """``teachers`` with fold 1 trained too: another split's labeled cases, another random initialisation."""
    if not os.path.isfile(_teacher_checkpoint(teachers, 1)):
        _train_teacher_fold(teachers, 1)
    return teachers


def _with_sitecustomize(env, folder, code, **variables):
    """``env`` with a ``sitecustomize`` module holding ``code`` first on PYTHONPATH, plus ``variables``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(code)
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")])),
                **{k: str(v) for k, v in variables.items()})


def _refusal_of_fold_0_student() -> str:
    with pytest.raises(RuntimeError) as e:
        started(make_trainer(nnSSL_SelfTrainingTrainer, plans_name=PLANS, epochs=1, iters=1))
    return str(e.value)


# once a case is listed in the manifest, the next case's write stops in its manifest save: both of its files are
# written and renamed into place, it is listed in memory but not on disk; the child then says which case and waits
# to be killed
PAUSE_BEFORE_LISTING = '''
import os
import time

from nnssl.data import pseudo_labels

_write_case = pseudo_labels.PseudoLabelStore.write_case


def _write_case_pausing_before_listing(self, case, *args, **kwargs):
    if self.manifest["cases"]:
        def paused_save():
            with open(os.environ["nnssl_test_paused"] + ".tmp", "w") as f:
                f.write(case)
            os.replace(os.environ["nnssl_test_paused"] + ".tmp", os.environ["nnssl_test_paused"])
            time.sleep(3600)
        self.save = paused_save
    return _write_case(self, case, *args, **kwargs)


pseudo_labels.PseudoLabelStore.write_case = _write_case_pausing_before_listing
'''


@pytest.mark.slow
def test_sigkilled_pseudolabel_leaves_an_incomplete_store_that_the_same_command_completes(teachers, tmp_path,
                                                                                         monkeypatch):
    workspace = private_copy(teachers, tmp_path, monkeypatch)
    env = env_with_ext_trainer()
    store, _, _ = _store(workspace, "3d_fullres")

    # the reference: an uninterrupted run into an empty store, read into memory, then removed
    step = _pseudolabel("3d_fullres", env, "--disable-tta")
    assert step.ok, step.tail()
    reference = PseudoLabelStore(store.folder)
    assert reference.complete
    expected = reference.manifest["expected_cases"]
    assert len(expected) >= 3
    labels = {c: tuple(np.array(a) for a in reference.load_case(c)) for c in expected}
    shutil.rmtree(store.folder)

    # the same command, SIGKILLed while it writes its second case (after the first is listed)
    paused = tmp_path / "paused_case"
    with open(tmp_path / "killed.txt", "w") as log:
        proc = subprocess.Popen(_pseudolabel_command("3d_fullres", "--disable-tta"),
                                env=_with_sitecustomize(env, tmp_path / "pause", PAUSE_BEFORE_LISTING,
                                                        nnssl_test_paused=paused),
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not paused.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"nnssl_pseudolabel never reached its second case (exit code {proc.returncode}):\n"
                        + (tmp_path / "killed.txt").read_text()[-3000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL

    # what the kill left: one listed case; the second case's files exist but it is not listed, so it does not count
    killed = PseudoLabelStore(store.folder)
    hung = paused.read_text()
    assert killed.manifest is not None and not killed.complete and killed.manifest["completed"] is None
    assert killed.manifest["expected_cases"] == expected
    assert len(killed.manifest["cases"]) == 1 and hung in expected and hung not in killed.manifest["cases"]
    assert all(os.path.isfile(p) for p in case_files(store.folder, hung))
    with pytest.raises(KeyError):
        killed.load_case(hung)

    # the student refuses it, naming the fix
    msg = _refusal_of_fold_0_student()
    assert killed.tag in msg and f"incomplete (1 of {len(expected)} cases" in msg and "nnssl_pseudolabel" in msg

    # the same command again completes it: only the missing cases, ending equal to the uninterrupted run
    step = _pseudolabel("3d_fullres", env, "--disable-tta")
    assert step.ok, step.tail()
    assert "1 case(s) already pseudo-labeled" in step.output
    assert f"{len(expected) - 1} case(s) pseudo-labeled into" in step.output
    done = PseudoLabelStore(store.folder)
    assert done.complete and done.manifest["cases"] == reference.manifest["cases"]
    assert not [f for f in os.listdir(store.folder) if f.endswith(".tmp")]
    for c in expected:
        pl, conf = done.load_case(c)
        assert np.array_equal(pl, labels[c][0]) and np.array_equal(conf, labels[c][1]), c


# the state the student trains from, saved by the process itself before its first step; then it stops (the
# weights right after -pretrained_weights and on_train_start are all this test needs)
REPORT_START_STATE = '''
import os

import torch

from nnssl.trainers.base import nnSSLTrainer


def _report_and_stop(self, batch):
    torch.save({"current_epoch": self.current_epoch, "global_step": self.global_step,
                "network": self.unwrapped_network.state_dict()}, os.environ["nnssl_test_start_state"])
    os._exit(0)


nnSSLTrainer.train_step = _report_and_stop
'''


@pytest.mark.slow
def test_self_training_student_starts_from_the_teachers_pretrained_weights(teachers, tmp_path, monkeypatch):
    from test_self_training import _fake_store  # any complete store of fold 0's pool lets the student start

    workspace = private_copy(teachers, tmp_path, monkeypatch)
    _fake_store()
    teacher_checkpoint = _teacher_checkpoint(workspace, 0)
    report = tmp_path / "start_state.pth"
    step = workflow.run_step([script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", STUDENT, "-p",
                              PLANS, "-device", "cpu", "-pretrained_weights", teacher_checkpoint],
                             _with_sitecustomize(env_with_ext_trainer(), tmp_path / "report", REPORT_START_STATE,
                                                 nnssl_test_start_state=report), timeout=600, check=False)
    assert step.ok and report.is_file(), step.tail()
    state = torch.load(report, map_location="cpu", weights_only=False)
    teacher = torch.load(teacher_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    assert state["current_epoch"] == 0 and state["global_step"] == 0
    assert set(state["network"]) == set(teacher)
    # nnU-Net's load_pretrained_weights transfers everything but the output layers (.seg_layers.)
    transferred = [k for k in teacher if ".seg_layers." not in k]
    kept = [k for k in teacher if ".seg_layers." in k]
    assert transferred and kept
    for k in transferred:
        assert torch.equal(state["network"][k], teacher[k]), k
    # ... which keep the student's own initialisation: random weights (the biases start at 0, as does the teacher's
    # lowest-resolution output, whose deep-supervision weight is 0 in nnU-Net)
    assert all(not torch.equal(state["network"][k], teacher[k]) for k in kept if k.endswith(".weight"))


@pytest.mark.slow
def test_ensemble_teacher_of_two_folds_equals_nnunet_predict_and_keeps_either_folds_validation_out(
        teachers_two_folds, tmp_path, monkeypatch):
    workspace = private_copy(teachers_two_folds, tmp_path, monkeypatch)
    env = env_with_ext_trainer()
    splits = json.load(open(os.path.join(workspace, "pre", DATASET, "splits_final.json")))
    w0, w1 = (torch.load(_teacher_checkpoint(workspace, f), map_location="cpu", weights_only=False)["network_weights"]
              for f in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # two different teachers: the ensemble is not one of them

    step = _pseudolabel("3d_fullres", env, "--disable-tta", folds=("0", "1"))
    assert step.ok, step.tail()
    store, plans, ident = _store(workspace, "3d_fullres", folds=("0", "1"))
    m = store.manifest
    assert store.complete and set(m["cases"]) == set(m["expected_cases"])

    # the manifest records both folds: their training cases, their training time, the cost of both
    assert m["teacher"]["folds"] == [0, 1]
    assert m["teacher"]["training_cases"] == {"0": sorted(splits[0]["train"]), "1": sorted(splits[1]["train"])}
    assert set(m["teacher"]["training_seconds"]) == {"0", "1"} and min(m["teacher"]["training_seconds"].values()) > 0
    cost = teacher_cost(m)
    assert cost["teacher_folds"] == 2
    assert cost["teacher_training_seconds"] == pytest.approx(sum(m["teacher"]["training_seconds"].values()))

    # the pool: the hidden-label cases of both folds, less every validation case of either fold (here some of
    # each fold's hidden-label cases are the other fold's validation cases, so the rule is exercised both ways)
    val = {0: set(splits[0]["val"]), 1: set(splits[1]["val"])}
    hidden = set(splits[0]["unlabeled"]) | set(splits[1]["unlabeled"])
    assert set(splits[0]["unlabeled"]) & val[1] and set(splits[1]["unlabeled"]) & val[0]
    assert {c for c, s in m["expected_cases"].items() if s == "hidden_label"} == hidden - val[0] - val[1]
    assert not set(m["cases"]) & (val[0] | val[1])
    assert {c for c, s in m["expected_cases"].items() if s == "unlabeled"} == {f"synthu_{i:03d}" for i in range(6)}

    # nnU-Net's own ensemble of the two folds (nnUNetv2_predict -f 0 1: the folds' logits averaged, then softmax),
    # brought to the preprocessed grid: same hard labels, confidence = its max class probability
    preds = str(tmp_path / "preds")
    run([script("nnUNetv2_predict"), "-i", os.path.join(workspace, "raw", DATASET, "imagesUnlabeled"), "-o", preds,
         "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "1", "-tr", TEACHER, "-p", PLANS, "-device", "cpu",
         "-npp", "1", "-nps", "1", "--disable_tta", "--save_probabilities"], env)
    unlabeled_folder = os.path.join(workspace, "pre", DATASET, "unlabeled", ident)
    transpose = list(plans["transpose_forward"])
    compared = 0
    for case in sorted(c for c, e in m["cases"].items() if e["source"] == "unlabeled"):
        props = pickle.load(open(os.path.join(unlabeled_folder, case + ".pkl"), "rb"))
        crop = tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(preds, case + ".nii.gz"))).transpose(transpose)
        probabilities = np.load(os.path.join(preds, case + ".npz"))["probabilities"]
        probabilities = probabilities.transpose([0] + [i + 1 for i in transpose])[(slice(None),) + crop]
        pl, conf = store.load_case(case)
        assert np.array_equal(pl, pred[crop]), case
        np.testing.assert_allclose(conf.astype(np.float32), probabilities.max(0), rtol=0, atol=1e-3, err_msg=case)
        compared += 1
    assert compared == 6

    # a fold-0 student refuses this teacher: fold 1 trained on labels of fold 0's validation cases
    seen = sorted(set(splits[1]["train"]) & val[0])
    assert seen
    msg = _refusal_of_fold_0_student()
    assert store.tag in msg and "validation" in msg and seen[0] in msg
