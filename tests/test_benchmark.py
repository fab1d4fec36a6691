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
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "Task04_Hippocampus")),
                    reason=f"real data not found in {DATA} (Task04_Hippocampus)")
def test_quick_benchmark_chain(tmp_path):
    # three SSL trainers keep the chain short (every trainer has its own end-to-end test): Mean Teacher, CAD for
    # its timed region search and its other networks' validation, self-training for its teacher step and cost
    results = str(tmp_path / "res")
    trainers = ["nnSSL_MeanTeacherTrainer", "nnSSL_CADTrainer", "nnSSL_SelfTrainingTrainer"]
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--dataset", "hippocampus", "--quick",
           "--work", str(tmp_path / "work"), "--results", results, "--trainers", *trainers]
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # no weight download in a test
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(results + ".json"))
    assert set(r["runs"]) == {"nnUNetTrainer (labeled only)", "nnUNetTrainer (labeled only, compute-matched)",
                              "nnUNetTrainer (labeled only, 2x iterations)",
                              "nnUNetTrainer (all labels, upper bound)"} | set(trainers)
    assert r["runs"]["nnUNetTrainer (labeled only, 2x iterations)"]["0"]["iterations"] == \
        2 * r["runs"]["nnUNetTrainer (labeled only)"]["0"]["iterations"]
    # CAD's region search is timed and reported as a share of its iteration
    assert 0 < r["runs"]["nnSSL_CADTrainer"]["0"]["region_search_share"] < 1
    assert "region search share" in open(results + ".md").read()
    # the methods' other networks are validated beside the deployed one and reported
    cad_curves = r["runs"]["nnSSL_CADTrainer"]["0"]["learning_curve"]
    assert {"val_dice_teacher", "val_dice_student_2"} <= set(cad_curves)
    assert "nnSSL_CADTrainer: deployed" in open(results + ".md").read()
    # offline self-training: the labeled-only row taught it, and its cost counts that teacher's training and the
    # prediction pass of the pool
    st = r["runs"]["nnSSL_SelfTrainingTrainer"]["0"]
    lower = r["runs"]["nnUNetTrainer (labeled only)"]["0"]
    assert st["teacher_cost"]["teacher"] == lower["trainer"]
    assert st["teacher_cost"]["teacher_training_seconds"] == pytest.approx(lower["train_epochs_seconds"], abs=0.1)
    assert st["teacher_cost"]["prediction_seconds"] > 0
    assert st["compute_seconds"] == pytest.approx(st["train_epochs_seconds"] + st["teacher_cost"]["seconds"], abs=0.2)
    assert st["compute_ratio_to_nnUNetTrainer"] > st["time_ratio_to_nnUNetTrainer"]
    # the compute-matched row follows the costliest SSL trainer (rounded up to 0.1; self-training's whole cost)
    costliest = max(r["runs"][t]["0"]["compute_ratio_to_nnUNetTrainer" if t == "nnSSL_SelfTrainingTrainer"
                                      else "time_ratio_to_nnUNetTrainer"] for t in trainers)
    assert costliest <= r["compute_ratio"] < costliest + 0.1 + 1e-9
    for runs in r["runs"].values():
        e = runs["0"]
        assert e["done"] and set(e["per_class"]) == {"Anterior", "Posterior"} and e["seconds_per_iteration"] > 0
        assert e["over_60_minutes"] is False
    matched = r["runs"]["nnUNetTrainer (labeled only, compute-matched)"]["0"]["iterations"]
    assert matched > r["runs"]["nnUNetTrainer (labeled only)"]["0"]["iterations"]
    assert os.path.isfile(results + ".md") and os.path.isfile(results + ".png")
    # the summary reads the results file: headroom recovered of the bounds is defined by them
    summary = _benchmark_script("summary")
    rows = {row["row"]: row for row in summary.setting_rows(r)}
    assert rows["nnUNetTrainer (all labels, upper bound)"]["headroom"] == pytest.approx(1.0)
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


def test_report_names_every_calls_seeds_and_the_replaced_runs(tmp_path):
    """The footer lists the seeds of all rows (a later call for seed 1 alone does not relabel the table) and a rerun
    that replaced an entry keeps the first value on record."""
    e = {"iterations": 100, "per_class": {"LV": {"dice": 0.7}}, "mean": {"dice": 0.7, "hd95_vox": 1.0, "asd_vox": 0.5},
         "seconds_per_iteration": 0.1, "train_epochs_seconds": 60.0,
         "learning_curve": {"ema_pseudo_dice": [0.5, 0.6]}}
    results = {"dataset": "D", "labeled": "7", "configuration": "2d", "plans": "p", "plans_detail": {}, "device": "cpu",
               "budget": {"epochs": 1, "iterations_per_epoch": 100}, "reported_set": "validation", "test_cases": 2,
               "seeds": [1], "command": "c", "runs": {"nnUNetTrainer (labeled only)": {"0": e, "1": e, "2": e},
                                                      "nnSSL_MeanTeacherTrainer": {"1": e}},
               "replaced_entries": [{"row": "nnUNetTrainer (labeled only)", "seed": "1", "dice": 0.72201,
                                     "why": "teacher checkpoint lost"}]}
    _benchmark_script("report").write_report(results, str(tmp_path / "r"))
    md = open(tmp_path / "r.md").read()
    assert "seeds (folds) [0, 1, 2]" in md
    assert "nnUNetTrainer (labeled only) seed 1 0.722 (teacher checkpoint lost)" in md


def test_upper_from_copies_only_the_same_training_and_the_report_says_so(tmp_path):
    """--upper-from: ACDC 3 takes ACDC 7's all-labels row only where it is the same training (fixed split, same
    plans, budget, device, reported set), marked; every difference is an error naming it; the report footnotes it."""
    run = _benchmark_script("run")
    e = {"trainer": "nnUNetTrainer_x", "fold": 5, "iterations": 100, "per_class": {"LV": {"dice": 0.8}},
         "mean": {"dice": 0.8, "hd95_vox": 1.0, "asd_vox": 0.5}, "seconds_per_iteration": 0.1,
         "train_epochs_seconds": 60.0, "learning_curve": {"ema_pseudo_dice": [0.5, 0.6]}, "done": True}
    here = {"dataset": "D", "labeled": "3", "configuration": "2d", "plans": "p", "plans_detail": {"patch_size": [9]},
            "device": "cpu", "budget": {"epochs": 1, "iterations_per_epoch": 100}, "reported_set": "validation",
            "test_cases": 2, "seeds": [0], "command": "c", "runs": {run.LOWER: {"0": {**e, "fold": 0}}}}
    source = {**here, "labeled": "7", "runs": {run.UPPER: {"0": e}}}
    copied = run.copied_upper_entry(here, source, "d_7.json", 0, fixed_split=True)
    assert copied["copied_from"] == "d_7.json" and copied["mean"] == e["mean"] and "copied_from" not in e
    with pytest.raises(run.UserInputError, match="draws its folds"):
        run.copied_upper_entry(here, source, "d_7.json", 0, fixed_split=False)
    with pytest.raises(run.UserInputError, match="differs from this setting in budget, device"):
        run.copied_upper_entry(here, {**source, "budget": {"epochs": 2}, "device": "cuda"}, "d_7.json", 0, True)
    with pytest.raises(run.UserInputError, match="no finished all-labels row for seed 1"):
        run.copied_upper_entry(here, source, "d_7.json", 1, fixed_split=True)
    here["runs"][run.UPPER] = {"0": copied}
    run.write_report(here, str(tmp_path / "r"))
    assert f"{run.UPPER} seeds 0 from d_7.json" in open(tmp_path / "r.md").read()


def test_the_compute_matched_budget_is_kept_for_later_seeds_unless_another_trainer_costs_more():
    """The compute-matched row is one budget: set from the costliest trainer when first run, it is not moved by
    that trainer's later seeds (a slower machine's 9x below) and is replaced only by another trainer costing over
    10 % more."""
    run = _benchmark_script("run")
    cost = lambda *rs: {str(i): {"time_ratio_to_nnUNetTrainer": r} for i, r in enumerate(rs)}  # noqa: E731
    results = {"runs": {run.LOWER: cost(1.0), "nnSSL_CADTrainer": cost(4.71, 5.72), "nnSSL_MEDLTrainer": cost(4.8)}}
    assert run.compute_ratio(results) == 5.3 and results["compute_ratio_of"] == "nnSSL_CADTrainer"
    results["runs"]["nnSSL_CADTrainer"]["2"] = {"time_ratio_to_nnUNetTrainer": 9.0}
    assert run.compute_ratio(results) == 5.3  # the same trainer's third seed, on a slower machine
    results["runs"]["nnSSL_MEDLTrainer"]["1"] = {"time_ratio_to_nnUNetTrainer": 6.0}  # MEDL 5.4: within 10 %
    assert run.compute_ratio(results) == 5.3
    results["runs"]["nnSSL_MNTrainer"] = cost(6.01)
    assert run.compute_ratio(results) == 6.1 and results["compute_ratio_of"] == "nnSSL_MNTrainer"
    # a file written before compute_ratio_of: the trainer costliest now
    legacy = {"compute_ratio": 5.5, "runs": {"nnSSL_CADTrainer": cost(5.4, 8.0), "nnSSL_MEDLTrainer": cost(5.3)}}
    assert run.compute_ratio(legacy) == 5.5 and legacy["compute_ratio_of"] == "nnSSL_CADTrainer"
    assert run.compute_ratio({"runs": {run.LOWER: cost(1.0)}}) is None


def test_only_calls_that_add_a_row_are_named_to_reproduce_the_table(tmp_path, monkeypatch):
    """A call stopped before its first row (here self-training's missing teacher; the end of a session likewise)
    leaves the results file's command, seeds and commands as they were; a call that adds a row is listed once."""
    run = _benchmark_script("run")
    argv = ["--dataset", "hippocampus", "--labeled", "4", "--seeds", "2", "--rows", "ssl", "--trainers",
            "nnSSL_SelfTrainingTrainer", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r")]
    monkeypatch.setattr(sys, "argv", ["run.py", *argv])
    before = {"command": "python benchmarks/run.py A", "seeds": [0], "commands": ["python benchmarks/run.py A"],
              "runs": {run.LOWER: {"0": {"done": True}}}}
    with open(tmp_path / "r.json", "w") as f:
        json.dump(before, f)
    runner = run.Runner(run.parse_args(argv))
    runner.prepare, runner.plans_detail, runner.reported_cases = (lambda: None), (lambda: {}), []

    def stopped(*args, **kwargs):
        raise run.UserInputError("the teacher's checkpoint is not in the workspace")

    runner.run_one = stopped
    with pytest.raises(run.UserInputError, match="teacher"):
        runner.run()
    after = json.load(open(tmp_path / "r.json"))
    assert (after["command"], after["seeds"], after["commands"]) == ("python benchmarks/run.py A", [0],
                                                                     before["commands"])
    assert after["plans"] == runner.plans  # the setting's description is written all the same
    for _ in range(2):
        runner.record(run.LOWER, 2, {"done": True})
    after = json.load(open(tmp_path / "r.json"))
    assert after["commands"] == ["python benchmarks/run.py A", runner.call_command] and after["seeds"] == [2]
    assert after["command"] == runner.call_command and "--seeds 2 --rows ssl" in runner.call_command
    assert set(after["runs"][run.LOWER]) == {"0", "2"}


@pytest.mark.parametrize("name", ["hc18_10pct", "hippocampus_10pct", "acdc_7cases", "hc18_10pct_sf8", "acdc_3cases",
                                  "hippocampus_8cases_sf1.5_b2", "hippocampus_4cases_sf1.5_b2", "acdc_7cases_sf3_b4",
                                  "acdc_3cases_sf3_b4"])
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


def test_summary_headroom_equal_compute_and_verdicts(tmp_path):
    """Headroom recovered, the equal-compute difference and the verdict from a hand-made results file."""
    summary = _benchmark_script("summary")

    def entry(dice, ratio=None, it=100):
        return {"mean": {"dice": dice, "hd95_vox": 2.0, "asd_vox": 1.0}, "iterations": it,
                "time_ratio_to_nnUNetTrainer": ratio, "train_epochs_seconds": 600.0}

    results = {"dataset": "D", "labeled": "7", "configuration": "2d", "plans": "p", "plans_detail": {},
               "device": "cpu", "budget": {"epochs": 1, "iterations_per_epoch": 100}, "reported_set": "validation",
               "runs": {"nnUNetTrainer (labeled only)": {"0": entry(0.60, 1.0), "1": entry(0.62, 1.0)},
                        "nnUNetTrainer (all labels, upper bound)": {"0": entry(0.90)},
                        "nnUNetTrainer (labeled only, compute-matched)": {"0": entry(0.70, 1.0, 400)},
                        "nnSSL_A": {"0": entry(0.75, 4.0), "1": entry(0.77, 4.0)},
                        "nnSSL_B": {"0": entry(0.66, 2.0), "1": entry(0.66, 2.0)},
                        "nnSSL_C": {"0": entry(0.50, 2.0), "1": entry(0.50, 2.0)}}}
    rows = {r["row"]: r for r in summary.setting_rows(results)}
    assert rows["nnSSL_A"]["headroom"] == pytest.approx((0.76 - 0.61) / (0.90 - 0.61))
    assert rows["nnSSL_A"]["vs_matched"] == pytest.approx(0.06)
    assert rows["nnSSL_A"]["cost"] == 4.0
    lower_sd = rows["nnUNetTrainer (labeled only)"]["sd"]
    assert lower_sd == pytest.approx(0.02 / 2 ** 0.5)  # the sample sd (n - 1) of 0.60 and 0.62, not 0.01
    assert summary.verdict(rows["nnSSL_A"], lower_sd).startswith("better than nnU-Net")
    assert "not than labeled-only given the same compute" in summary.verdict(rows["nnSSL_B"], lower_sd)
    assert summary.verdict(rows["nnSSL_C"], lower_sd).startswith("worse")
    # one seed of a trainer: judged against twice labeled-only's spread (the seed rule), and says it is one seed;
    # within that spread, or with no spread known, no verdict but "3 seeds needed"
    assert summary.verdict(dict(rows["nnSSL_A"], sd=None), lower_sd).startswith("better than nnU-Net on the same "
                                                                                "labels (one seed")
    assert summary.verdict(dict(rows["nnSSL_C"], sd=None), lower_sd).startswith("worse than labeled-only nnU-Net "
                                                                                "(one seed")
    near = dict(rows["nnSSL_A"], sd=None, vs_lower=0.01)
    assert "within twice labeled-only's seed spread" in summary.verdict(near, lower_sd)
    assert "spread is unknown" in summary.verdict(dict(rows["nnSSL_A"], sd=None), None)
    # paired by seed: labeled-only spread 0.1 (0.5/0.6/0.7), the trainer +0.03 on each seed. Unpaired that is no
    # difference (0.03 < 2 x 0.1); paired it is a gain (+0.03 ± 0.00); a trainer whose per-seed differences flip
    # sign is no difference either way
    seeds3 = {"nnUNetTrainer (labeled only)": {"0": entry(0.5, 1.0), "1": entry(0.6, 1.0), "2": entry(0.7, 1.0)},
              "nnSSL_P": {"0": entry(0.53, 2.0), "1": entry(0.63, 2.0), "2": entry(0.73, 2.0)},
              "nnSSL_Q": {"0": entry(0.60, 2.0), "1": entry(0.55, 2.0), "2": entry(0.74, 2.0)}}
    r3 = {r["row"]: r for r in summary.setting_rows(dict(results, runs=seeds3))}
    assert r3["nnSSL_P"]["paired"] == pytest.approx([0.03, 0.03, 0.03])
    sd3 = r3["nnUNetTrainer (labeled only)"]["sd"]
    assert summary.verdict(r3["nnSSL_P"], sd3).startswith("better than nnU-Net on the same labels (paired over 3")
    assert summary.verdict(dict(r3["nnSSL_P"], paired=[]), sd3).startswith("no difference")  # unpaired rule
    assert summary.verdict(r3["nnSSL_Q"], sd3).startswith("no difference beyond the paired")
    # no equal-compute row: a gain that twice the labeled-only iterations match at no more compute is named as such
    seeds3["nnUNetTrainer (labeled only, 2x iterations)"] = {s: entry(x, 1.0, 200) for s, x in
                                                             (("0", 0.54), ("1", 0.64), ("2", 0.74))}
    r3 = {r["row"]: r for r in summary.setting_rows(dict(results, runs=seeds3))}
    twice = r3["nnUNetTrainer (labeled only, 2x iterations)"]
    assert "twice the labeled-only iterations (2.0x the compute) gave as much (+0.040" in summary.verdict(
        r3["nnSSL_P"], sd3, twice)
    assert "twice" not in summary.verdict(r3["nnSSL_P"], sd3, dict(twice, paired=[0.01, 0.01, 0.01]))
    assert "twice" not in summary.verdict(dict(r3["nnSSL_P"], cost=1.5), sd3, twice)  # cheaper than 2x
    # a gain over labeled-only that leads the compute-matched row by less than twice the seed spread is not called a
    # gain at equal compute (nnSSL_A: +0.06 over the matched row against 2 x 0.014 above; here 2 x 0.05)
    assert summary.verdict(rows["nnSSL_A"], lower_sd).startswith("better than nnU-Net on the same labels")
    close = summary.verdict(dict(rows["nnSSL_A"], matched_sd=0.05), lower_sd)
    assert close.startswith("better than labeled-only") and "within twice the seed spread (0.100)" in close
    assert "not yet a demonstrated gain at equal compute" in summary.verdict(
        dict(r3["nnSSL_P"], vs_matched=0.01), sd3)
    path = json.dumps(results)
    (tmp_path / "acdc_7cases.json").write_text(path)
    summary.write_summary([str(tmp_path / "acdc_7cases.json")], str(tmp_path / "summary"))
    md = (tmp_path / "summary.md").read_text()
    assert "90.40" in md and "theirs" in md.lower()  # the literature beside ours, labelled as theirs
    assert os.path.isfile(tmp_path / "summary.png")
    assert "Ablation" not in md  # no trainer with its ablation in this file


def test_summary_lists_what_the_seed_rule_still_asks():
    """The seed rule per row: 3 seeds for the bounds and Mean Teacher whatever their difference, a trainer far below
    twice labeled-only's spread needs no more, one near it or far above it does (a gain is recommended on 3 seeds),
    every trainer of the configuration must appear."""
    summary = _benchmark_script("summary")

    def entry(dice):
        return {"mean": {"dice": dice}, "iterations": 100, "time_ratio_to_nnUNetTrainer": 2.0}

    three = lambda *d: {str(i): entry(x) for i, x in enumerate(d)}  # noqa: E731
    runs = {"nnUNetTrainer (labeled only)": three(0.60, 0.61, 0.62),  # sd 0.01
            "nnUNetTrainer (all labels, upper bound)": three(0.80, 0.81),
            "nnUNetTrainer (labeled only, 2x iterations)": three(0.62),
            "nnSSL_MeanTeacherTrainer": three(0.40),  # far below, but Mean Teacher always wants 3
            "nnSSL_MEDLTrainer": three(0.40),  # far below labeled-only: one seed is enough
            "nnSSL_CADTrainer": three(0.62),  # within 2 x 0.01: 3 seeds
            "nnSSL_SelfTrainingTrainer": three(0.70)}  # far above: 3 seeds before it is recommended
    results = {"configuration": "2d", "runs": runs}
    todo = summary.seeds_still_wanted(results, summary.setting_rows(results))
    assert todo == ["nnUNetTrainer (all labels, upper bound): 2 of 3 seeds",
                    "nnUNetTrainer (labeled only, compute-matched): not run",
                    "nnSSL_MeanTeacherTrainer: 1 of 3 seeds", "nnSSL_CADTrainer: 1 of 3 seeds",
                    "nnSSL_SelfTrainingTrainer: 1 of 3 seeds"]
    runs3d = dict(runs, **{"nnSSL_MeanTeacherTrainer": three(0.6, 0.6, 0.6), "nnSSL_CADTrainer": three(0.3)})
    todo3d = summary.seeds_still_wanted(dict(results, configuration="3d_fullres", runs=runs3d),
                                        summary.setting_rows(dict(results, runs=runs3d)))
    assert "nnSSL_MNTrainer: not run" in todo3d and not any(t.startswith("nnSSL_CAD") for t in todo3d)
    # the compute-matched row: one seed, unless a trainer above labeled-only leads it by less than twice the spread
    # (self-training 0.70 against 0.69: 3 seeds); a clear lead (against 0.60) or a trainer below it needs one
    for matched, want in ((0.69, 3), (0.60, 1), (0.75, 1)):
        r = dict(runs, **{"nnUNetTrainer (labeled only, compute-matched)": three(matched),
                          "nnSSL_SelfTrainingTrainer": three(0.70, 0.70, 0.71)})
        got = summary.seeds_still_wanted(dict(results, runs=r), summary.setting_rows(dict(results, runs=r)))
        assert ("nnUNetTrainer (labeled only, compute-matched): 1 of 3 seeds" in got) == (want == 3), (matched, got)


def test_summary_ablation_difference_and_cost():
    """M&N with the shipped 2D weights against its random-weights ablation: Dice difference and cost ratio."""
    summary = _benchmark_script("summary")
    e = lambda d, r: {"mean": {"dice": d}, "iterations": 100, "time_ratio_to_nnUNetTrainer": r}  # noqa: E731
    results = {"runs": {"nnUNetTrainer (labeled only)": {"0": e(0.80, 1.0)},
                        "nnSSL_MNTrainer": {"0": e(0.77, 6.0), "1": e(0.79, 6.0)},
                        "nnSSL_MNRandom2DTrainer": {"0": e(0.74, 4.0)}}}
    rows = summary.setting_rows(results)
    (line,) = summary.ablations(rows)
    assert "0.780 (2)" in line and "0.740 (1)" in line and "+0.040 mean Dice" in line
    assert "cost 1.50x the ablation's" in line
    assert summary.ablations([r for r in rows if r["row"] != "nnSSL_MNRandom2DTrainer"]) == []


def test_summary_literature_follows_the_setting_whatever_the_plans():
    """A results file on other CPU plans (acdc_7cases_sf3_b4) is the same setting: the literature's ACDC 7 numbers
    stand beside it; the plans' tag is all that is stripped."""
    summary = _benchmark_script("summary")
    assert summary.setting_of("acdc_7cases_sf3_b4") == "acdc_7cases"
    assert summary.setting_of("hippocampus_4cases_sf1.5_b2") == "hippocampus_4cases"
    assert summary.setting_of("acdc_3cases") == "acdc_3cases"
    assert summary.LITERATURE[summary.setting_of("acdc_7cases_sf3_b4")][2]["dice"] == 90.40  # MEDL's paper


@pytest.mark.parametrize("labeled,message", [("5", "3 and 7"), ("x", "--labeled")])
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "ACDC")), reason=f"ACDC not found in {DATA}")
def test_acdc_setting_that_does_not_exist_is_a_clear_error(tmp_path, labeled, message):
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--dataset", "acdc",
                        "--labeled", labeled, "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "work") and not os.path.exists(tmp_path / "r.json")


def _label_file(path, values):
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.array(values, dtype=np.uint8).reshape(1, 1, -1)), str(path))


def test_test_folder_checks(tmp_path):
    datasets = _benchmark_script("datasets")
    dj = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "RV": 1}, "file_ending": ".nii.gz"}
    folder = tmp_path / "test"
    with pytest.raises(datasets.UserInputError, match="imagesTr"):
        datasets.check_test_folder(str(folder), dj)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    _label_file(folder / "imagesTr" / "p1_frame01_0000.nii.gz", [0, 5, 9])
    _label_file(folder / "imagesTr" / "p2_frame01_0000.nii.gz", [0, 5, 9])
    _label_file(folder / "labelsTr" / "p1_frame01.nii.gz", [0, 1, 1])
    with pytest.raises(datasets.UserInputError, match="p2_frame01"):  # an image without its label
        datasets.check_test_folder(str(folder), dj)
    _label_file(folder / "labelsTr" / "p2_frame01.nii.gz", [0, 1, 3])
    with pytest.raises(datasets.UserInputError, match=r"p2_frame01.nii.gz has values \[3\]"):
        datasets.check_test_folder(str(folder), dj)
    _label_file(folder / "labelsTr" / "p2_frame01.nii.gz", [0, 1, 0])
    assert datasets.check_test_folder(str(folder), dj) == (str(folder / "imagesTr"), str(folder / "labelsTr"))


def test_cpu_plans_other_than_the_default_get_their_own_name():
    """--spacing-factor / --batch-size / --features-scale other than the dataset's default name their own plans and
    results file, so that rows of other plans never land in (or reuse plans of) the default setting's."""
    run = _benchmark_script("run")
    hc18 = run.DATASETS["hc18"]
    assert run.cpu_plans_tag(hc18, hc18.spacing_factor, hc18.batch_size, 0.25) == ""
    assert run.cpu_plans_tag(hc18, 8.0, hc18.batch_size, 0.25) == "_sf8"
    assert run.cpu_plans_tag(run.DATASETS["hippocampus"], 2.0, 2, 0.5) == "_sf2_b2_f0.5"
