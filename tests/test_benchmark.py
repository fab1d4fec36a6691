"""The benchmark scripts: run.py's --quick chain on a subset of the real Hippocampus data (skipped without the
data), the report of the committed results, step_time.py on the synthetic workspace, cuda_check.py's CPU parts."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from nnssl.trainers.registry import trainer_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("NNSSL_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def _benchmark_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"nnssl_benchmark_{name}",
                                                  os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "Task04_Hippocampus")),
                    reason=f"real data not found in {DATA} (Task04_Hippocampus)")
def test_quick_benchmark_chain(tmp_path):
    results = str(tmp_path / "res")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--dataset", "hippocampus", "--quick",
           "--work", str(tmp_path / "work"), "--results", results]
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # M&N's 2D network: no weight download in a test
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(results + ".json"))
    assert set(r["runs"]) == {"nnUNetTrainer (labeled only)", "nnUNetTrainer (labeled only, compute-matched)",
                              "nnUNetTrainer (all labels, upper bound)"} | set(trainer_names("3d"))
    assert {"nnSSL_MeanTeacherTrainer", "nnSSL_MEDLTrainer", "nnSSL_CADTrainer", "nnSSL_MNTrainer"} <= set(r["runs"])
    # CAD's region search is timed and reported as a share of its iteration
    assert 0 < r["runs"]["nnSSL_CADTrainer"]["0"]["region_search_share"] < 1
    assert "region search share" in open(results + ".md").read()
    # the methods' other networks are validated beside the deployed one and reported
    cad_curves = r["runs"]["nnSSL_CADTrainer"]["0"]["learning_curve"]
    assert {"val_dice_teacher", "val_dice_student_2"} <= set(cad_curves)
    assert "nnSSL_CADTrainer: deployed" in open(results + ".md").read()
    # the compute-matched row follows the costliest SSL trainer
    assert r["compute_ratio"]["0"] == pytest.approx(max(r["runs"][t]["0"]["time_ratio_to_nnUNetTrainer"]
                                                         for t in trainer_names("3d")))
    for runs in r["runs"].values():
        e = runs["0"]
        assert e["done"] and set(e["per_class"]) == {"Anterior", "Posterior"} and e["seconds_per_iteration"] > 0
    matched = r["runs"]["nnUNetTrainer (labeled only, compute-matched)"]["0"]["iterations"]
    assert matched > r["runs"]["nnUNetTrainer (labeled only)"]["0"]["iterations"]
    assert os.path.isfile(results + ".md") and os.path.isfile(results + ".png")
    # a second call finds everything done and only rewrites the report
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0 and "train " not in p.stdout
    assert r["runs"]["nnSSL_MeanTeacherTrainer"]["0"]["resumed_at_epoch"] is None
    # an interrupted training (checkpoint_latest, no checkpoint_final, e.g. cut off by the end of a session)
    # resumes with --c, and its entry says so instead of giving the resumed part's wall time as the run's
    variant = r["runs"]["nnSSL_MeanTeacherTrainer"]["0"]["trainer"]
    out = os.path.join(str(tmp_path / "work"), "nnUNet_results", r["dataset"],
                       f"{variant}__{r['plans']}__{r['configuration']}", "fold_0")
    # nnU-Net deletes checkpoint_latest at the end of a training: rebuild the state after epoch 0 of 2 from the
    # final checkpoint (epoch counter 1, each logged list cut to its first epoch)
    import torch

    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ckpt["current_epoch"] = 1
    ckpt["logging"] = {k: v[:1] if isinstance(v, list) else v for k, v in ckpt["logging"].items()}
    torch.save(ckpt, os.path.join(out, "checkpoint_latest.pth"))
    os.remove(os.path.join(out, "checkpoint_final.pth"))
    del r["runs"]["nnSSL_MeanTeacherTrainer"]
    with open(results + ".json", "w") as f:
        json.dump(r, f)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "train nnSSL_MeanTeacherTrainer" in p.stdout and "--c" in p.stdout
    e = json.load(open(results + ".json"))["runs"]["nnSSL_MeanTeacherTrainer"]["0"]
    assert e["done"] and e["resumed_at_epoch"] == 1 and e["train_wall_seconds"] is None
    assert len(e["learning_curve"]["pseudo_dice"]) == 2  # epoch 0 from the checkpoint's log, epoch 1 trained now
    assert "predict nnSSL_MeanTeacherTrainer" in p.stdout  # the retrained checkpoint is evaluated again
    assert "nnSSL_MeanTeacherTrainer seed 0 at epoch 1" in open(results + ".md").read()


def test_report_lists_the_other_networks_validation_dice():
    curves = {"pseudo_dice": [0.1, 0.5, 0.6, 0.7, 0.8, 0.9], "val_dice_teacher": [0.0, 0.6, 0.7, 0.8, 0.9, 1.0]}
    runs = {"nnUNetTrainer (labeled only)": {"0": {"learning_curve": {"pseudo_dice": [0.5]}}},
            "nnSSL_MeanTeacherTrainer": {"0": {"learning_curve": curves}}}
    # mean of the last 5 epochs: (0.5 + 0.6 + 0.7 + 0.8 + 0.9) / 5 and (0.6 + ... + 1.0) / 5
    assert _benchmark_script("report")._other_networks_lines(runs) == [
        "nnSSL_MeanTeacherTrainer: deployed 0.700, teacher 0.800"]


@pytest.mark.parametrize("name", ["hc18_10pct", "hippocampus_10pct"])
def test_report_of_the_committed_results_is_the_committed_table(name, tmp_path):
    """Results files written by earlier versions of the runner still make the same report."""
    report = _benchmark_script("report")
    results = os.path.join(REPO, "benchmarks", "results", name)
    report.main([results + ".json", "--out", str(tmp_path / name)])
    assert open(tmp_path / f"{name}.md").read() == open(results + ".md").read()
    assert os.path.getsize(tmp_path / f"{name}.png") > 10000


def test_step_time_script_times_trainers_on_a_workspace(workspace, tmp_path):
    from conftest import DATASET

    work = tmp_path / "work"  # the layout benchmarks/run.py makes
    work.mkdir()
    os.symlink(os.path.join(workspace, "raw"), work / "nnUNet_raw")
    os.symlink(os.path.join(workspace, "pre"), work / "nnUNet_preprocessed")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "step_time.py"), "--work", str(work), "--dataset",
           DATASET, "-c", "3d_fullres", "--trainers", "nnUNetTrainer", "nnSSL_MEDLTrainer", "--steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = re.findall(r"^(\S+): (\S+) s/step over (\d+) steps \((\S+), (\S+), (\S+), torch ", p.stdout, re.M)
    assert [r[0] for r in rows] == ["nnUNetTrainer", "nnSSL_MEDLTrainer"], p.stdout
    for _, seconds, steps, dataset, configuration, plans in rows:
        assert 0 < float(seconds) < 60 and math.isfinite(float(seconds))
        assert (int(steps), dataset, configuration, plans) == (2, DATASET, "3d_fullres", "nnUNetPlans_cpu")
    # the trainers ran on the workspace's data and wrote nowhere but their own results folder
    assert sorted(os.listdir(work)) == ["nnUNet_preprocessed", "nnUNet_raw", "step_time_results"]


def test_cuda_check_scripts_and_fp16_maths_on_cpu():
    """The GPU check's pieces that run anywhere: its fallback for uninstalled scripts reads setup.py's entry points
    (all of nnssl's installed scripts, no other) and starts them, its commands start, and MEDL's evidential maths
    stays finite for tiny and huge logits (here without autocast)."""
    import importlib.metadata

    cc = _benchmark_script("cuda_check")
    installed = {e.name: e.value for e in importlib.metadata.distribution("nnssl").entry_points
                 if e.group == "console_scripts"}
    assert cc.setup_py_scripts() == installed, "setup.py's entry points changed: pip install -e . again"
    fallback = cc.python_c("nnssl_make_split", cc.setup_py_scripts()["nnssl_make_split"])
    for cmd in (fallback, cc.console("nnUNetv2_train")):
        p = subprocess.run(cmd + ["-h"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stdout[-2000:] + p.stderr[-2000:]
    checks = cc.evidential_fp16_check("cpu")
    assert len(checks) == 3 and all(c["finite"] and c["grad_finite"] for c in checks.values())
