"""Real-data benchmark: every nnssl trainer against nnU-Net's labeled-only and fully labeled bounds.

    python benchmarks/run.py --dataset hippocampus --labeled 10%
    python benchmarks/run.py --dataset hc18 --labeled 10%
    python benchmarks/run.py --dataset hippocampus --quick          # whole chain in minutes (smoke test)

For one dataset and labeled fraction, in its own workspace (``--work``, default ``benchmarks/work/<dataset>``,
with its own nnUNet_raw/preprocessed/results), each step a real console script:

1. convert the release in ``../shared/data`` (``nnUNetv2_convert_MSD_dataset`` / ``nnssl_convert_hc18``), plan and
   preprocess with ``nnUNetv2_plan_and_preprocess``, write the CPU-scale plans variant (``nnssl_make_cpu_plans``;
   HC18 also at 4x spacing, preprocessed with ``nnUNetv2_preprocess``), preprocess unlabeled images;
2. the fixed, committed, seeded test list ``benchmarks/splits/<dataset>_test.txt`` (Hippocampus: 40 of the 200
   cases; HC18: 20 % of the mothers), which no training or model selection sees;
3. ``splits_final.json`` from ``nnssl_make_split``'s function on the other cases (5-fold partition, labeled share of
   each fold's training cases, HC18 grouped by mother). Fold k is seed k: its own validation cases and its own
   labeled subset. Folds 5..9 repeat folds 0..4 with every training label visible (the upper bound);
4. per seed, with the same plans and budget (``<Trainer>_<E>epochs_<I>iters_<V>valiters``): ``nnUNetTrainer`` on
   the labeled cases (lower bound), every nnSSL trainer, ``nnUNetTrainer`` on all training labels (upper bound),
   and ``nnUNetTrainer`` again with as many iterations per epoch as the costliest SSL trainer's measured cost ratio
   buys (compute-matched lower bound; also the check that the baseline no longer improves with more iterations;
   ``--skip-compute-matched`` defers this longest row to a later call);
5. ``nnUNetv2_predict`` of the test list from each final checkpoint and ``nnssl_evaluate`` against its labels;
6. ``benchmarks/results/<dataset>_<fraction>.json``, ``.md`` (table) and ``.png`` (metrics and learning curves).

Every finished step is skipped when the runner is started again; an interrupted training resumes with ``--c``
(its entry records ``resumed_at_epoch`` and no whole-run wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from nnssl.trainers.progress import VAL_DICE_PREFIX  # noqa: E402
from nnssl.utils import atomic_write_json, load_json_or_none  # noqa: E402

SHARED_DATA = os.environ.get("NNSSL_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
N_FOLDS = 5
UPPER_FOLD_OFFSET = N_FOLDS

DATASETS = {
    "hippocampus": dict(id=4, name="Dataset004_Hippocampus", source="Task04_Hippocampus", configuration="3d_fullres",
                        spacing_factor=1.0, batch_size=4, test_count=40, group_regex=None, hc=False),
    "hc18": dict(id=18, name="Dataset018_HC18", source="HC18", configuration="2d", spacing_factor=4.0,
                 batch_size=8, test_mother_fraction=0.2, group_regex=r"hc18_(\d+)_", hc=True),
}


def ssl_trainers() -> List[str]:
    """Every nnSSL trainer that exists: the re-exports that nnUNet_extTrainer points at."""
    import importlib.util

    from nnssl.nnunet_ext import EXT_TRAINER_DIR

    spec = importlib.util.spec_from_file_location("_exports", os.path.join(EXT_TRAINER_DIR,
                                                                            "nnssl_trainer_exports.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(n for n in vars(module) if n.startswith("nnSSL_"))


class Runner:
    def __init__(self, args):
        self.args = args
        self.ds = DATASETS[args.dataset]
        self.work = os.path.abspath(args.work or os.path.join(HERE, "work", args.dataset + ("_quick" if args.quick
                                                                                              else "")))
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        from nnssl.commands.trainer_path import ext_trainer_value

        self.env = dict(os.environ)
        self.env.update(nnUNet_raw=os.path.join(self.work, "nnUNet_raw"),
                        nnUNet_preprocessed=os.path.join(self.work, "nnUNet_preprocessed"),
                        nnUNet_results=os.path.join(self.work, "nnUNet_results"),
                        nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
        if args.device == "cpu":
            self.env.setdefault("nnUNet_n_proc_DA", "0")
            self.env.setdefault("nnUNet_def_n_proc", "1")
        self.plans = "nnUNetPlans_cpu" if args.plans == "cpu" else "nnUNetPlans"
        fraction = args.labeled.replace("%", "pct")
        self.results_path = args.results or os.path.join(HERE, "results",
                                                         f"{args.dataset}_{fraction}{'_quick' if args.quick else ''}")
        self.results = load_json_or_none(self.results_path + ".json") or {}
        self.raw_folder = os.path.join(self.env["nnUNet_raw"], self.ds["name"])
        self.pre_folder = os.path.join(self.env["nnUNet_preprocessed"], self.ds["name"])

    # ------------------------------------------------------------------ helpers
    def sh(self, args: List[str], title: str, env: Optional[dict] = None) -> dict:
        """Run a console script, log its output, return wall time and the child's peak RSS."""
        exe = os.path.join(os.path.dirname(sys.executable), args[0])
        cmd = [exe if os.path.isfile(exe) else args[0]] + [str(a) for a in args[1:]]
        log = os.path.join(self.work, "logs", title.replace(" ", "_") + ".log")
        print(f"[benchmark] {time.strftime('%H:%M:%S')} {title}: {' '.join(map(str, args))}", flush=True)
        start = time.time()
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, args))}\n")
            f.flush()
            p = subprocess.Popen(cmd, env=env or self.env, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise SystemExit(f"[benchmark] {title} failed (exit {p.returncode}); see {log}")
        return {"seconds": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024.0,
                "command": " ".join(shlex.quote(str(a)) for a in args)}

    def save(self) -> None:
        atomic_write_json(self.results, self.results_path + ".json")

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        ds, a = self.ds, self.args
        if not os.path.isfile(os.path.join(self.raw_folder, "dataset.json")):
            self.convert()
        plan_env = dict(self.env)
        plan_env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planner fails with nnUNet_n_proc_DA=0
        if not os.path.isfile(os.path.join(self.pre_folder, "nnUNetPlans.json")) or not os.path.isdir(
                os.path.join(self.pre_folder, "gt_segmentations")):
            self.sh(["nnUNetv2_plan_and_preprocess", "-d", ds["id"], "-c", ds["configuration"], "-np", 2, "-npfp",
                     2], "plan and preprocess", env=plan_env)
        if self.plans == "nnUNetPlans_cpu":
            if not os.path.isfile(os.path.join(self.pre_folder, self.plans + ".json")):
                self.sh(["nnssl_make_cpu_plans", "-d", ds["id"], "-c", ds["configuration"], "--features-scale",
                         a.features_scale, "--batch-size", a.batch_size or ds["batch_size"], "--spacing-factor",
                         ds["spacing_factor"]], "cpu plans")
            identifier = json.load(open(os.path.join(self.pre_folder, self.plans + ".json")))[
                "configurations"][ds["configuration"]]["data_identifier"]
            if not os.path.isdir(os.path.join(self.pre_folder, identifier)):
                self.sh(["nnUNetv2_preprocess", "-d", ds["id"], "-plans_name", self.plans, "-c", ds["configuration"],
                         "-np", 2], "preprocess cpu plans", env=plan_env)
        if os.path.isdir(os.path.join(self.raw_folder, "imagesUnlabeled")):
            self.sh(["nnssl_preprocess_unlabeled", "-d", ds["id"], "-c", ds["configuration"], "-p", self.plans,
                     "--no-progress"], "preprocess unlabeled")
        self.test_cases = self.test_list()
        self.make_splits()
        self.test_images, self.test_labels = os.path.join(self.work, "test", "images"), os.path.join(
            self.work, "test", "labels")
        if not os.path.isdir(self.test_labels) or len(os.listdir(self.test_labels)) != len(self.test_cases):
            shutil.rmtree(os.path.join(self.work, "test"), ignore_errors=True)
            os.makedirs(self.test_images)
            os.makedirs(self.test_labels)
            for c in self.test_cases:
                shutil.copy(os.path.join(self.raw_folder, "imagesTr", f"{c}_0000.nii.gz"), self.test_images)
                shutil.copy(os.path.join(self.raw_folder, "labelsTr", f"{c}.nii.gz"), self.test_labels)

    def convert(self) -> None:
        ds, src = self.ds, os.path.join(SHARED_DATA, self.ds["source"])
        if not os.path.isdir(src):
            raise SystemExit(f"[benchmark] {src} is missing: the benchmark needs the real data")
        os.makedirs(self.env["nnUNet_raw"], exist_ok=True)
        if self.args.dataset == "hippocampus":
            if self.args.quick:  # a 30-case copy of the release
                sub = os.path.join(self.work, "Task04_Hippocampus")
                shutil.rmtree(sub, ignore_errors=True)
                dj = json.load(open(os.path.join(src, "dataset.json")))
                dj["training"] = dj["training"][:30]
                dj["numTraining"] = 30
                for d in ("imagesTr", "labelsTr", "imagesTs"):
                    os.makedirs(os.path.join(sub, d))
                for case in dj["training"]:
                    for key, d in (("image", "imagesTr"), ("label", "labelsTr")):
                        name = os.path.basename(case[key])
                        os.symlink(os.path.join(src, d, name), os.path.join(sub, d, name))
                json.dump(dj, open(os.path.join(sub, "dataset.json"), "w"))
                src = sub
            self.sh(["nnUNetv2_convert_MSD_dataset", "-i", src, "-overwrite_id", ds["id"], "-np", 2], "convert")
        else:
            from nnssl.dataset_conversion.hc18 import convert_hc18

            files = sorted(f for f in os.listdir(os.path.join(src, "training_set")) if not f.endswith(
                "_Annotation.png"))
            tests = sorted(os.listdir(os.path.join(src, "test_set")))
            print("[benchmark] converting HC18", flush=True)
            old = {k: os.environ.get(k) for k in ("nnUNet_raw",)}
            os.environ["nnUNet_raw"] = self.env["nnUNet_raw"]
            try:
                convert_hc18(src, ds["id"], training_files=files[:60] if self.args.quick else None,
                             test_files=tests[:10] if self.args.quick else None, num_processes=2, progress=False)
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def test_list(self) -> List[str]:
        """The committed test list (made once, seeded), or a quick-mode list from the subset."""
        cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(self.raw_folder, "labelsTr")))
        path = os.path.join(HERE, "splits", f"{self.args.dataset}_test.txt")
        if not self.args.quick and os.path.isfile(path):
            listed = [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]
            missing = sorted(set(listed) - set(cases))
            if missing:
                raise SystemExit(f"[benchmark] {path} names cases that are not in the dataset: {missing[:5]}")
            return listed
        rng = np.random.RandomState(20261127)
        if self.ds["hc"]:
            from nnssl.dataset_conversion.hc18 import mother_id

            mothers = sorted({mother_id(c) for c in cases})
            chosen = set(rng.choice(mothers, int(round(self.ds["test_mother_fraction"] * len(mothers))),
                                    replace=False))
            test = sorted(c for c in cases if mother_id(c) in chosen)
        else:
            n = 6 if self.args.quick else self.ds["test_count"]
            test = sorted(rng.choice(cases, n, replace=False))
        if not self.args.quick:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"# {self.args.dataset} benchmark test cases (seed 20261127); never used for training or "
                        f"model selection\n" + "\n".join(test) + "\n")
        return test

    def make_splits(self) -> None:
        from nnssl.preprocessing.splits import labeled_case_ids, make_semi_supervised_splits

        os.environ["nnUNet_preprocessed"] = self.env["nnUNet_preprocessed"]
        spec = {"labeled": self.args.labeled, "folds": N_FOLDS, "seed": 12345, "exclude": self.test_cases,
                "group_regex": self.ds["group_regex"]}
        out = os.path.join(self.pre_folder, "splits_final.json")
        marker = out + ".benchmark.json"
        if load_json_or_none(marker) == spec and os.path.isfile(out):
            return
        splits = make_semi_supervised_splits(labeled_case_ids(self.ds["name"]), self.args.labeled, None, N_FOLDS,
                                             12345, self.test_cases, self.ds["group_regex"])
        upper = [{"train": sorted(f["train"] + f["unlabeled"]), "val": f["val"], "unlabeled": []} for f in splits]
        atomic_write_json(splits + upper, out)
        atomic_write_json(spec, marker)
        print(f"[benchmark] split: fold 0 has {len(splits[0]['train'])} labeled, {len(splits[0]['unlabeled'])} "
              f"hidden-label, {len(splits[0]['val'])} validation cases; {len(self.test_cases)} test cases",
              flush=True)

    # ------------------------------------------------------------------ training and evaluation
    def budget(self, iters: int) -> str:
        a = self.args
        return f"_{a.epochs}epochs_{iters}iters_{a.val_iters}valiters"

    def output_folder(self, variant: str, fold: int) -> str:
        return os.path.join(self.env["nnUNet_results"], self.ds["name"],
                            f"{variant}__{self.plans}__{self.ds['configuration']}", f"fold_{fold}")

    def run_one(self, key: str, trainer: str, fold: int, iters: int, seed: int) -> dict:
        """Train (or resume), predict the test list, evaluate; cached in the results file."""
        entry = self.results.setdefault("runs", {}).setdefault(key, {}).get(str(seed))
        if entry and entry.get("done"):
            return entry
        ds, a = self.ds, self.args
        variant = trainer + self.budget(iters)
        out = self.output_folder(variant, fold)
        cmd = ["nnUNetv2_train", ds["id"], ds["configuration"], fold, "-tr", variant, "-p", self.plans, "-device",
               a.device]
        import torch

        train, resumed_at_epoch = None, None
        if not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            latest = os.path.join(out, "checkpoint_latest.pth")
            if os.path.isfile(latest):  # an interrupted training (e.g. an earlier session's) goes on with --c
                resumed_at_epoch = int(torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"])
            train = self.sh(cmd + (["--c"] if resumed_at_epoch is not None else []), f"train {key} seed {seed}")
        ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        log = ckpt["logging"]
        phase = log.get("train_phase_seconds", [])
        epochs_seconds = float(sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])))
        preds = os.path.join(self.work, "predictions", f"{key}_seed{seed}")
        summary_file = preds + "_eval_summary.json"
        if train is not None and os.path.isfile(summary_file):  # a (re)trained checkpoint: no stale evaluation
            os.remove(summary_file)
        if not os.path.isfile(summary_file):
            shutil.rmtree(preds, ignore_errors=True)
            self.sh(["nnUNetv2_predict", "-i", self.test_images, "-o", preds, "-d", ds["id"], "-c",
                     ds["configuration"], "-f", fold, "-tr", variant, "-p", self.plans, "-device", a.device, "-npp",
                     1, "-nps", 1], f"predict {key} seed {seed}")
            from nnssl.evaluation.evaluate import evaluate_folders

            hc_csv = os.path.join(self.raw_folder, "hc_reference.csv") if ds["hc"] else None
            evaluate_folders(self.test_labels, preds, json.load(open(os.path.join(self.raw_folder,
                                                                                  "dataset.json"))),
                             output_prefix=preds + "_eval", hc=ds["hc"], hc_csv=hc_csv)
        summary = json.load(open(summary_file))
        per_class = {c["name"]: {m: c[m]["mean"] for m in ("dice", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")}
                     for c in summary["per_class"].values()}
        over = {m: summary["over_classes"][m]["mean"] for m in ("dice", "hd95_mm", "asd_mm")}
        entry = {"trainer": variant, "fold": fold, "iterations": a.epochs * iters, "per_class": per_class,
                 "mean": over, "seconds_per_iteration": float(np.median(phase)) / iters if phase else None,
                 "train_command": " ".join(map(str, cmd)),
                 "train_epochs_seconds": round(epochs_seconds, 1),
                 # wall time of one uninterrupted training process; a resumed run has none (its epochs' own
                 # durations are in train_epochs_seconds, restored with the checkpoint's log)
                 "train_wall_seconds": (None if train is None or resumed_at_epoch is not None
                                        else round(train["seconds"], 1)),
                 "resumed_at_epoch": resumed_at_epoch,
                 "peak_rss_mb": None if train is None else round(train["peak_rss_mb"], 1),
                 "learning_curve": {"ema_pseudo_dice": [float(v) for v in log["ema_fg_dice"]],
                                    "pseudo_dice": [float(v) for v in log["mean_fg_dice"]],
                                    "train_loss": [float(v) for v in log["train_losses"]],
                                    # validation pseudo-Dice of a method's other networks (teacher, 2nd student)
                                    **{k: [float(v) for v in log[k]] for k in log if k.startswith(VAL_DICE_PREFIX)}},
                 "done": True}
        # share of a training iteration spent in a method's own search step (CAD's region search), from the
        # per-iteration seconds the trainer logs (median over epochs, like seconds_per_iteration)
        for logged, name in (("region_search_s", "region_search_share"), ("pseudo_label_s", "pseudo_label_share")):
            if log.get(logged) and entry["seconds_per_iteration"]:
                entry[name] = float(np.median(log[logged])) / entry["seconds_per_iteration"]
        if train is None and self.results["runs"][key].get(str(seed)):  # keep what an earlier call measured
            old = self.results["runs"][key][str(seed)]
            entry["train_wall_seconds"], entry["peak_rss_mb"] = old.get("train_wall_seconds"), old.get("peak_rss_mb")
        if ds["hc"]:
            hc = summary["head_circumference"]
            entry["hc_abs_diff_mm"] = hc["abs_diff_mm"]["mean"]
            entry["hc_diff_mm"] = hc["diff_mm"]["mean"]
        self.results["runs"][key][str(seed)] = entry
        self.save()
        return entry

    def run(self) -> None:
        a = self.args
        self.prepare()
        self.results.update({
            "dataset": self.ds["name"], "labeled": a.labeled, "configuration": self.ds["configuration"],
            "plans": self.plans, "plans_detail": self.plans_detail(), "device": a.device,
            "budget": {"epochs": a.epochs, "iterations_per_epoch": a.iters, "val_iterations_per_epoch": a.val_iters},
            "seeds": a.seeds, "test_cases": len(self.test_cases),
            "protocol": "seed k = fold k of the benchmark's splits_final.json (own validation cases and labeled "
                        "subset); the test list is never used for training or checkpoint selection "
                        "(checkpoint_final is evaluated)",
            "command": "python benchmarks/run.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])})
        self.save()
        trainers = a.trainers or ssl_trainers()
        for seed in a.seeds:
            lower = self.run_one("nnUNetTrainer (labeled only)", "nnUNetTrainer", seed, a.iters, seed)
            ratios = []
            for tr in trainers:
                e = self.run_one(tr, tr, seed, a.iters, seed)
                if e["seconds_per_iteration"] and lower["seconds_per_iteration"]:
                    e["time_ratio_to_nnUNetTrainer"] = e["seconds_per_iteration"] / lower["seconds_per_iteration"]
                    ratios.append(e["time_ratio_to_nnUNetTrainer"])
            self.save()
            self.run_one("nnUNetTrainer (all labels, upper bound)", "nnUNetTrainer", seed + UPPER_FOLD_OFFSET,
                         a.iters, seed)
            if a.skip_compute_matched:
                continue
            # the costliest SSL trainer's measured cost; a costlier trainer added later retrains this row
            ratio = max(ratios) if ratios else 2.0
            self.results.setdefault("compute_ratio", {})[str(seed)] = ratio
            matched_key = "nnUNetTrainer (labeled only, compute-matched)"
            matched_iters = int(math.ceil(a.iters * ratio))
            old = self.results["runs"].get(matched_key, {}).get(str(seed))
            if old and old["iterations"] != a.epochs * matched_iters:
                del self.results["runs"][matched_key][str(seed)]
            self.run_one(matched_key, "nnUNetTrainer", seed, matched_iters, seed)
        for runs in self.results["runs"].values():
            for e in runs.values():
                if "train_epochs_seconds" not in e:  # entries written before this field existed
                    import torch

                    log = torch.load(os.path.join(self.output_folder(e["trainer"], e["fold"]),
                                                  "checkpoint_final.pth"), map_location="cpu",
                                     weights_only=False)["logging"]
                    e["train_epochs_seconds"] = round(float(sum(
                        b - a for a, b in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"]))), 1)
                base = self.results["runs"]["nnUNetTrainer (labeled only)"].get(str(e["fold"] % N_FOLDS))
                if e["seconds_per_iteration"] and base and base["seconds_per_iteration"]:
                    e["time_ratio_to_nnUNetTrainer"] = e["seconds_per_iteration"] / base["seconds_per_iteration"]
        self.save()
        write_report(self.results, self.results_path)

    def plans_detail(self) -> dict:
        cfg = json.load(open(os.path.join(self.pre_folder, self.plans + ".json")))["configurations"][
            self.ds["configuration"]]
        return {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
                "features_per_stage": cfg["architecture"]["arch_kwargs"]["features_per_stage"]}


def _mean_sd(values: List[Optional[float]]) -> str:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "-"
    return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")


def _other_networks_lines(runs: dict, last: int = 5) -> List[str]:
    """``trainer: deployed x, teacher y, ...`` for trainers that validated other networks (``val_dice_<name>``)."""
    out = []
    for key, r in runs.items():
        curves = r[min(r, key=int)].get("learning_curve", {})
        names = [k for k in curves if k.startswith(VAL_DICE_PREFIX)]
        if not names or "pseudo_dice" not in curves:
            continue
        parts = [f"deployed {np.nanmean(curves['pseudo_dice'][-last:]):.3f}"]
        parts += [f"{k[len(VAL_DICE_PREFIX):]} {np.nanmean(curves[k][-last:]):.3f}" for k in names]
        out.append(f"{key}: " + ", ".join(parts))
    return out


def write_report(results: dict, path: str) -> None:
    """Markdown table and PNG plot of a results dict."""
    runs = results["runs"]
    classes = list(next(iter(next(iter(runs.values())).values()))["per_class"])
    hc = any("hc_abs_diff_mm" in e for r in runs.values() for e in r.values())
    head = ["trainer", "iterations", "seeds"] + [f"Dice {c}" for c in classes] + ["mean Dice", "HD95 (mm)",
                                                                                  "ASD (mm)"]
    head += ["HC abs diff (mm)"] if hc else []
    head += ["s/iteration", "time ratio", "training (min)", "peak RSS (MB)"]
    search = any("region_search_share" in e for r in runs.values() for e in r.values())
    head += ["region search share"] if search else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in runs.items():
        es = list(r.values())
        row = [key, str(es[0]["iterations"]), str(len(es))]
        row += [_mean_sd([e["per_class"][c]["dice"] for e in es]) for c in classes]
        row += [_mean_sd([e["mean"][m] for e in es]) for m in ("dice", "hd95_mm", "asd_mm")]
        row += [_mean_sd([e.get("hc_abs_diff_mm") for e in es])] if hc else []
        row += [_mean_sd([e["seconds_per_iteration"] for e in es]),
                _mean_sd([e.get("time_ratio_to_nnUNetTrainer") for e in es]),
                _mean_sd([e["train_epochs_seconds"] / 60 if e.get("train_epochs_seconds") else None for e in es]),
                _mean_sd([e.get("peak_rss_mb") for e in es])]
        row += [_mean_sd([e.get("region_search_share") for e in es])] if search else []
        lines.append("| " + " | ".join(row) + " |")
    others = _other_networks_lines(runs)
    if others:
        lines += ["", "Validation pseudo-Dice of each trainer's networks (nnU-Net's online validation on the fold's "
                  "validation cases, mean of the last 5 epochs; the deployed network first): " + "; ".join(others)]
    resumed = [f"{key} seed {seed} at epoch {e['resumed_at_epoch']}" for key, r in runs.items()
               for seed, e in r.items() if e.get("resumed_at_epoch") is not None]
    if resumed:
        lines += ["", "Trained in more than one process (an interrupted training resumed with --c; training time is "
                  "the sum of its epochs, peak RSS the resumed process's): " + "; ".join(resumed)]
    b = results["budget"]
    lines += ["", f"{results['dataset']}, {results['labeled']} labeled, {results['test_cases']} held-out test cases, "
              f"{results['configuration']} with {results['plans']} {results['plans_detail']}, {b['epochs']} epochs x "
              f"{b['iterations_per_epoch']} iterations (compute-matched row: more iterations per epoch), device "
              f"{results['device']}; mean ± sd over seeds (folds) {results['seeds']}. Reproduce: "
              f"`{results['command']}`"]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, path + ".png")
    print("\n".join(lines))


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5))
    keys = list(runs)
    means = [np.mean([e["mean"]["dice"] for e in runs[k].values()]) for k in keys]
    sds = [np.std([e["mean"]["dice"] for e in runs[k].values()]) for k in keys]
    ax.bar(range(len(keys)), means, yerr=sds, color=["C0", *["C1"] * (len(keys) - 3), "C2", "C3"][:len(keys)],
           capsize=4)
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.3f}", ha="center", fontsize=9)
    lower, upper = "nnUNetTrainer (labeled only)", "nnUNetTrainer (all labels, upper bound)"
    for k, style in ((lower, "--"), (upper, ":")):
        if k in runs:
            ax.axhline(np.mean([e["mean"]["dice"] for e in runs[k].values()]), color="k", ls=style, lw=1)
    ax.set_xticks(range(len(keys)), [k.replace(" (", "\n(") for k in keys], fontsize=8)
    ax.set_ylabel("mean Dice on the held-out test list")
    ax.set_ylim(0, 1)
    ax.set_title(f"{results['dataset']}, {results['labeled']} labeled")
    for k in keys:
        e = runs[k][min(runs[k], key=int)]
        curve = e["learning_curve"]["ema_pseudo_dice"]
        x = np.linspace(e["iterations"] / len(curve), e["iterations"], len(curve))
        ax2.plot(x, curve, label=k)
    ax2.set_xlabel("training iterations")
    ax2.set_ylabel("EMA pseudo Dice (validation cases)")
    ax2.set_title("learning curves (first seed)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--labeled", default="10%", help="labeled share of each fold's training cases (10%%)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    p.add_argument("--iters", type=int, default=100, help="iterations per epoch (default 100)")
    p.add_argument("--val-iters", type=int, default=10, help="validation iterations per epoch (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="folds used as seeds (default 0)")
    p.add_argument("--plans", choices=("cpu", "default"), default="cpu",
                   help="cpu: nnssl_make_cpu_plans variant (features x0.25, HC18 at 4x spacing); default: nnU-Net's")
    p.add_argument("--features-scale", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=None, help="CPU plans' batch size (4 Hippocampus, 8 HC18)")
    p.add_argument("--trainers", nargs="+", default=None, help="nnSSL trainers (default: all that exist)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--work", default=None, help="workspace (default benchmarks/work/<dataset>)")
    p.add_argument("--results", default=None, help="results path without extension")
    p.add_argument("--skip-compute-matched", action="store_true",
                   help="leave out the compute-matched labeled-only row for now (a later run without the flag adds "
                        "it; finished runs are kept)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a subset of the data, 2 epochs x 5 iterations, results *_quick.*")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.iters, args.val_iters, args.seeds = 2, 5, 2, [0]
    Runner(args).run()


if __name__ == "__main__":
    main()
