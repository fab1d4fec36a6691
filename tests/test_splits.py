"""nnssl_make_split: disjoint, reproducible, grouped splits; refusing and backing up."""

import json
import os
import subprocess

import pytest

from conftest import nnunet_env, script
from nnssl.preprocessing.splits import make_semi_supervised_splits
from nnssl.utils import UserInputError

CASES = [f"case_{i:03d}" for i in range(40)]


def _check_fold(fold, all_cases, exclude=()):
    tr, va, un = set(fold["train"]), set(fold["val"]), set(fold["unlabeled"])
    assert not (tr & va) and not (tr & un) and not (va & un)
    assert tr | va | un == set(all_cases) - set(exclude)


def test_kfold_partition_disjoint_and_complete():
    splits = make_semi_supervised_splits(CASES, "10%", folds=5, seed=1)
    assert len(splits) == 5
    for fold in splits:
        _check_fold(fold, CASES)
        assert len(fold["val"]) == 8 and len(fold["train"]) == 3 and len(fold["unlabeled"]) == 29
    vals = [c for f in splits for c in f["val"]]
    assert sorted(vals) == CASES  # every case validated exactly once


def test_reproducible_from_seed_and_seed_matters():
    assert make_semi_supervised_splits(CASES, "5", seed=7) == make_semi_supervised_splits(CASES, "5", seed=7)
    assert make_semi_supervised_splits(CASES, "5", seed=7) != make_semi_supervised_splits(CASES, "5", seed=8)


def test_fixed_val_size_count_and_exclude():
    exclude = CASES[:10]
    splits = make_semi_supervised_splits(CASES, "4", val="6", folds=3, seed=0, exclude=exclude)
    for fold in splits:
        _check_fold(fold, CASES, exclude)
        assert len(fold["val"]) == 6 and len(fold["train"]) == 4


def test_groups_never_split():
    cases = [f"hc18_{m:03d}_{k}" for m in range(20) for k in (1, 2)]
    splits = make_semi_supervised_splits(cases, "10%", folds=4, seed=3, group_regex=r"hc18_(\d+)_")
    for fold in splits:
        _check_fold(fold, cases)
        sides = {}
        for side in ("train", "val", "unlabeled"):
            for c in fold[side]:
                sides.setdefault(c.split("_")[1], set()).add(side)
        assert all(len(s) == 1 for s in sides.values())


@pytest.mark.parametrize("labeled,val", [("50", None), ("0", None), ("abc", None), ("150%", None), ("5", "45")])
def test_impossible_requests(labeled, val):
    with pytest.raises(UserInputError):
        make_semi_supervised_splits(CASES, labeled, val=val, folds=5)


def test_exclude_unknown_case():
    with pytest.raises(UserInputError, match="not in the dataset"):
        make_semi_supervised_splits(CASES, "5", exclude=["nope"])


def _raw_dataset(root):
    env = nnunet_env(root)
    folder = os.path.join(env["nnUNet_raw"], "Dataset991_Tiny")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub))
    for c in CASES[:12]:
        open(os.path.join(folder, "imagesTr", c + "_0000.nii.gz"), "w").close()
        open(os.path.join(folder, "labelsTr", c + ".nii.gz"), "w").close()
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "x": 1}, "numTraining": 12,
                   "file_ending": ".nii.gz"}, f)
    os.makedirs(os.path.join(env["nnUNet_preprocessed"], "Dataset991_Tiny"))
    return env


def test_cli_refuses_overwrite_and_keeps_backup(tmp_path):
    env = _raw_dataset(str(tmp_path))
    cmd = [script("nnssl_make_split"), "-d", "991", "--labeled", "2", "--folds", "3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = os.path.join(env["nnUNet_preprocessed"], "Dataset991_Tiny", "splits_final.json")
    first = json.load(open(out))
    assert len(first) == 3 and all(len(f["train"]) == 2 for f in first)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr
    assert json.load(open(out)) == first
    p = subprocess.run(cmd + ["--force", "--seed", "99"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    backups = [f for f in os.listdir(os.path.dirname(out)) if f.startswith("splits_final.json.bak_")]
    assert len(backups) == 1
    assert json.load(open(os.path.join(os.path.dirname(out), backups[0]))) == first


@pytest.mark.parametrize("args,message", [(["-d", "555", "--labeled", "2"], "unknown dataset"),
                                          (["-d", "991", "--labeled", "20"], "only"),
                                          (["-d", "991", "--labeled", "x"], "--labeled")])
def test_cli_clear_errors(tmp_path, args, message):
    env = _raw_dataset(str(tmp_path))
    p = subprocess.run([script("nnssl_make_split")] + args, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(os.path.join(env["nnUNet_preprocessed"], "Dataset991_Tiny", "splits_final.json"))


PATIENT_FRAMES = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 21) for f in (1, 2)]
PATIENT_RX = r"(patient\d+)_"


def test_fixed_labeled_and_val_cases_by_group_name():
    """A paper's fixed split: named patients (groups) take both frames; every fold is the same split."""
    splits = make_semi_supervised_splits(PATIENT_FRAMES, None, folds=3, group_regex=PATIENT_RX,
                                         labeled_cases=["patient003", "patient007_frame02"],
                                         val_cases=["patient001", "patient002"])
    assert len(splits) == 3 and splits[0] == splits[1] == splits[2]
    fold = splits[0]
    _check_fold(fold, PATIENT_FRAMES)
    assert fold["train"] == ["patient003_frame01", "patient003_frame02", "patient007_frame01", "patient007_frame02"]
    assert fold["val"] == ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02"]
    assert len(fold["unlabeled"]) == 40 - 8


def test_fixed_labeled_cases_are_never_validated_in_a_kfold_partition():
    labeled = ["patient003", "patient004"]
    splits = make_semi_supervised_splits(PATIENT_FRAMES, None, folds=4, group_regex=PATIENT_RX,
                                         labeled_cases=labeled)
    vals = sorted(c for f in splits for c in f["val"])
    assert vals == sorted(c for c in PATIENT_FRAMES if not c.startswith(("patient003", "patient004")))
    for fold in splits:
        _check_fold(fold, PATIENT_FRAMES)
        assert fold["train"] == ["patient003_frame01", "patient003_frame02", "patient004_frame01",
                                 "patient004_frame02"]


@pytest.mark.parametrize("kwargs,message", [
    ({"labeled_cases": ["patient999"]}, "patient999"),
    ({"labeled_cases": ["patient003"], "val_cases": ["patient003_frame01"]}, "in both"),
    ({"labeled_cases": ["patient003"], "val_cases": ["nobody"]}, "nobody"),
    ({"labeled_cases": []}, "no case"),
])
def test_fixed_lists_bad_names(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        make_semi_supervised_splits(PATIENT_FRAMES, None, folds=2, group_regex=PATIENT_RX, **kwargs)


def test_labeled_amount_and_list_are_exclusive():
    with pytest.raises(UserInputError, match="not both"):
        make_semi_supervised_splits(PATIENT_FRAMES, "2", labeled_cases=["patient003"], group_regex=PATIENT_RX)


def test_cli_fixed_lists(tmp_path):
    env = _raw_dataset(str(tmp_path))
    (tmp_path / "lab.txt").write_text("# labeled\ncase_003\ncase_005\n")
    (tmp_path / "val.txt").write_text("case_000\ncase_001\n")
    cmd = [script("nnssl_make_split"), "-d", "991", "--labeled-cases", str(tmp_path / "lab.txt"),
           "--val-cases", str(tmp_path / "val.txt")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = os.path.join(env["nnUNet_preprocessed"], "Dataset991_Tiny", "splits_final.json")
    splits = json.load(open(out))
    assert len(splits) == 1  # one fold by default with --val-cases
    assert splits[0]["train"] == ["case_003", "case_005"] and splits[0]["val"] == ["case_000", "case_001"]
    assert len(splits[0]["unlabeled"]) == 8
    (tmp_path / "bad.txt").write_text("case_003\ncase_077\n")
    p = subprocess.run(cmd[:4] + [str(tmp_path / "bad.txt")] + cmd[5:] + ["--force"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "case_077" in p.stderr and "Traceback" not in p.stderr
    assert json.load(open(out)) == splits  # nothing written on the error
