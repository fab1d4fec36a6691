"""Real-data benchmark: every nnssl trainer against nnU-Net's labeled-only and fully labeled bounds.

    python benchmarks/run.py --dataset hippocampus --labeled 10%
    python benchmarks/run.py --dataset hc18 --labeled 10%
    python benchmarks/run.py --dataset hippocampus --quick          # whole chain in minutes (smoke test)

For one dataset and labeled fraction, in its own workspace (``--work``, default ``benchmarks/work/<dataset>``,
with its own nnUNet_raw/preprocessed/results), each step a real console script:

1. convert the release in ``../shared/data`` (``nnUNetv2_convert_MSD_dataset`` / ``nnssl_convert_hc18``'s
   function), plan and preprocess with ``nnUNetv2_plan_and_preprocess``, write the CPU-scale plans variant
   (``nnssl_make_cpu_plans``; HC18 also at 4x spacing, preprocessed with ``nnUNetv2_preprocess``), preprocess
   unlabeled images;
2. the fixed, committed, seeded test list ``benchmarks/splits/<dataset>_test.txt`` (Hippocampus: 40 of the 200
   cases; HC18: 20 % of the mothers), which no training or model selection sees;
3. ``splits_final.json`` from ``nnssl_make_split``'s function on the other cases (5-fold partition, labeled share of
   each fold's training cases, HC18 grouped by mother). Fold k is seed k: its own validation cases and its own
   labeled subset. Folds 5..9 repeat folds 0..4 with every training label visible (the upper bound);
4. per seed, with the same plans and budget (``<Trainer>_<E>epochs_<I>iters_<V>valiters``): ``nnUNetTrainer`` on
   the labeled cases (lower bound), every nnSSL trainer, ``nnUNetTrainer`` on all training labels (upper bound),
   and ``nnUNetTrainer`` again with as many iterations per epoch as the costliest SSL trainer's measured cost ratio
   buys (compute-matched lower bound; also the check that the baseline no longer improves with more iterations;
   ``--rows`` chooses which rows a call runs, e.g. leaving the longest ``matched`` row to a later call);
5. ``nnUNetv2_predict`` of the test list from each final checkpoint and ``nnssl_evaluate`` against its labels;
6. ``benchmarks/results/<dataset>_<fraction>.json``, ``.md`` (table) and ``.png`` (metrics and learning curves).

Every finished step is skipped when the runner is started again; an interrupted training resumes with ``--c``
(its entry records ``resumed_at_epoch`` and no whole-run wall time).

The datasets (conversion, test lists, splits) are in ``benchmarks/datasets.py``, the report in
``benchmarks/report.py``; every console script runs through :class:`nnssl.workflow.Workspace` (one log per step in
``<work>/logs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
from typing import Callable, Dict, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)  # the sibling modules datasets.py and report.py

from datasets import DATASETS, N_FOLDS, UPPER_FOLD_OFFSET, check_test_folder, copy_test_set  # noqa: E402
from report import LOWER, LOWER_2X, MATCHED, UPPER, write_report  # noqa: E402

from nnssl.trainers.progress import VAL_DICE_PREFIX  # noqa: E402
from nnssl.trainers.registry import TEACHER_FIRST, trainer_names  # noqa: E402
from nnssl.utils import UserInputError, atomic_write_json, load_json_or_none, run_command  # noqa: E402
from nnssl.workflow import Workspace, nnunet_env, planner_env  # noqa: E402

# outside the repository's working tree, so that a row interrupted by the end of a session resumes with --c when
# the next session has the same machine (a row never depends on that)
DEFAULT_WORK = os.environ.get("NNSSL_BENCHMARK_WORK", os.path.join(os.path.expanduser("~"), ".cache", "nnssl",
                                                                   "benchmarks"))


def _checkpoint(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _epochs_seconds(log: dict) -> float:
    """The summed durations of a checkpoint log's epochs (those of earlier processes too, for a resumed run)."""
    return float(sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])))


def time_ratio(entry: dict, lower: Optional[dict]) -> Optional[float]:
    """An entry's seconds per iteration over its seed's labeled-only nnUNetTrainer's (None unless both measured)."""
    if entry.get("seconds_per_iteration") and lower and lower.get("seconds_per_iteration"):
        return entry["seconds_per_iteration"] / lower["seconds_per_iteration"]
    return None


def set_time_ratios(results: dict) -> None:
    """Every entry's ``time_ratio_to_nnUNetTrainer``, against its seed's labeled-only row as it is now (the upper
    bound's fold ``UPPER_FOLD_OFFSET`` + k is seed k)."""
    for runs in results["runs"].values():
        for e in runs.values():
            lower = results["runs"].get(LOWER, {}).get(str(e["fold"] % N_FOLDS))
            ratio = time_ratio(e, lower)
            if ratio is not None:
                e["time_ratio_to_nnUNetTrainer"] = ratio
            # the whole row's compute (a self-training row: its teacher's training and the prediction pass too)
            # over the labeled-only row's, at the same iterations
            if e.get("compute_seconds") and lower and lower.get("train_epochs_seconds") and \
                    e["iterations"] == lower["iterations"]:
                e["compute_ratio_to_nnUNetTrainer"] = e["compute_seconds"] / lower["train_epochs_seconds"]


def row_cost(e: dict) -> Optional[float]:
    """An entry's cost relative to its seed's labeled-only row: the whole row's compute where it owes more than
    its own training (self-training: teacher and prediction pass), else its seconds per iteration's ratio."""
    return e.get("compute_ratio_to_nnUNetTrainer") if e.get("teacher_cost") else e.get("time_ratio_to_nnUNetTrainer")


def trainer_costs(results: dict) -> Dict[str, float]:
    """Each SSL trainer's cost (:func:`row_cost`), the mean over its seeds that have one."""
    return {key: float(np.mean(rs)) for key, r in results.get("runs", {}).items() if key.startswith("nnSSL_")
            for rs in [[row_cost(e) for e in r.values() if row_cost(e)]] if rs}


def compute_ratio(results: dict) -> Optional[float]:
    """The compute-matched row's cost ratio, rounded up to 0.1 (None when no SSL row has a cost), recorded in
    ``results`` as ``compute_ratio`` with the trainer it comes from, ``compute_ratio_of``.

    Set from the costliest SSL trainer when the row is first run and kept for every later seed, so that the row is
    one budget: more seeds of that trainer do not move it (a seed's ratio is its seconds per iteration over its
    labeled-only run's, measured hours apart on a machine whose speed drifts by up to 1.6x). Another trainer whose
    cost exceeds it by more than 10 % replaces it (and the row's seeds are retrained). A file written before
    ``compute_ratio_of`` existed names the trainer that is costliest now."""
    costs = trainer_costs(results)
    if not costs:
        return None
    top = max(costs, key=costs.get)
    stored, of = results.get("compute_ratio"), results.get("compute_ratio_of") or top
    others = {k: v for k, v in costs.items() if k != of}
    if stored is None or of not in costs or (others and max(others.values()) > 1.1 * stored):
        of = top if stored is None or of not in costs else max(others, key=others.get)
        stored = math.ceil(costs[of] * 10) / 10
    results["compute_ratio"], results["compute_ratio_of"] = stored, of
    return stored


def backfill_old_entries(results: dict, output_folder: Callable[[str, int], str]) -> None:
    """The one patch of results files written by earlier versions of this runner: entries without
    ``train_epochs_seconds`` get it from their final checkpoint's log (``output_folder(variant, fold)``)."""
    for runs in results["runs"].values():
        for e in runs.values():
            if "train_epochs_seconds" not in e:
                log = _checkpoint(os.path.join(output_folder(e["trainer"], e["fold"]), "checkpoint_final.pth"))[
                    "logging"]
                e["train_epochs_seconds"] = round(_epochs_seconds(log), 1)


# what must be equal for two settings' all-labels rows to be one training; the split's all-labels folds are not
# compared here: only a fixed split's are independent of --labeled (ACDC 3's and 7's folds 5-9 checked identical)
SAME_TRAINING = ("dataset", "configuration", "plans", "plans_detail", "budget", "device", "reported_set",
                 "test_cases")


def copied_upper_entry(results: dict, source: dict, source_name: str, seed: int, fixed_split: bool) -> dict:
    """The all-labels row of ``seed`` taken from another setting's results file (``--upper-from``), marked
    ``copied_from``. Only on a fixed split (ACDC): its all-labels folds are every training patient whatever
    ``--labeled`` is, so with the same plans, budget, device and reported set it is the same training, and running
    it again would only measure run-to-run noise. Anything else is a :class:`UserInputError` naming the difference."""
    if not fixed_split:
        raise UserInputError(f"--upper-from: {results.get('dataset')} draws its folds per setting, so another "
                             f"setting's all-labels row is not this one's training; run the upper row here")
    differ = [k for k in SAME_TRAINING if json.dumps(source.get(k), sort_keys=True) !=
              json.dumps(results.get(k), sort_keys=True)]
    if differ:
        raise UserInputError(f"--upper-from {source_name} differs from this setting in {', '.join(differ)}: not the "
                             f"same training; run the upper row here (leave out --upper-from)")
    entry = source.get("runs", {}).get(UPPER, {}).get(str(seed))
    if not (entry and entry.get("done")):
        raise UserInputError(f"--upper-from {source_name} has no finished all-labels row for seed {seed}: run it "
                             f"there first (--rows upper --seeds {seed}) or here without --upper-from")
    return {**json.loads(json.dumps(entry)), "copied_from": source_name}


class Runner:
    """One dataset and labeled fraction (``args``, see :func:`main`): prepares the workspace, then trains, predicts
    and evaluates every row and seed that the results file does not have yet, saving it after each; the report
    last."""

    def __init__(self, args):
        self.args = args
        self.ds = DATASETS[args.dataset]
        self.ds.check_labeled(args.labeled)  # before anything is written
        # one workspace per setting: the settings of a dataset use the same fold numbers for other splits
        self.work = os.path.abspath(args.work or os.path.join(
            DEFAULT_WORK, f"{args.dataset}_{self.ds.setting_name(args.labeled)}" + ("_quick" if args.quick else "")))
        env = nnunet_env(self.work)
        if args.device == "cpu":
            env.setdefault("nnUNet_n_proc_DA", "0")
            env.setdefault("nnUNet_def_n_proc", "1")
        # one log per step: logs/<title>.log
        self.ws = Workspace(self.work, env, log=lambda title: os.path.join(self.work, "logs",
                                                                           title.replace(" ", "_") + ".log"),
                            echo="benchmark")
        # CPU plans other than the dataset's default get their own plans name (and results file), so that they
        # share the workspace's data and splits without ever reusing plans made with other numbers
        self.spacing_factor = args.spacing_factor if args.spacing_factor is not None else self.ds.spacing_factor
        self.batch_size = args.batch_size or self.ds.batch_size
        tag = cpu_plans_tag(self.ds, self.spacing_factor, self.batch_size, args.features_scale)
        self.plans = f"nnUNetPlans_cpu{tag}" if args.plans == "cpu" else "nnUNetPlans"
        fraction = self.ds.setting_name(args.labeled) + (tag if args.plans == "cpu" else "")
        self.default_results_path = os.path.join(HERE, "results",
                                                 f"{args.dataset}_{fraction}{'_quick' if args.quick else ''}")
        self.results_path = args.results or self.default_results_path
        self.results = load_json_or_none(self.results_path + ".json") or {}
        self.call_command = self.command()  # recorded with each row this call adds (see record)
        self.raw_folder = os.path.join(self.ws.raw, self.ds.name)
        self.pre_folder = os.path.join(self.ws.preprocessed, self.ds.name)

    def command(self) -> str:
        """This call's command line as a newcomer runs it from the repository: ``--results`` relative to it, and
        left out where it is the default."""
        argv, out, skip = list(sys.argv[1:]), [], False
        default = self.default_results_path
        for i, x in enumerate(argv):
            if skip:
                skip = False
                continue
            if x == "--results" and i + 1 < len(argv):
                path = os.path.abspath(argv[i + 1])
                skip = True
                if path == os.path.abspath(default):
                    continue
                if path.startswith(os.path.dirname(HERE) + os.sep):
                    path = os.path.relpath(path, os.path.dirname(HERE))
                out += ["--results", path]
                continue
            out.append(x)
        return "python benchmarks/run.py " + " ".join(shlex.quote(x) for x in out)

    def save(self) -> None:
        atomic_write_json(self.results, self.results_path + ".json")

    def record(self, key: str, seed: int, entry: dict) -> None:
        """Store a finished row and name the call that made it: ``command``, ``seeds`` and ``commands`` (every
        call that added rows, in order: a table made in several calls is reproduced by all of them) list only
        calls that added or re-measured a row, so that a call stopped before its first row (an error, the end of
        a session) leaves no command that reproduces nothing."""
        self.results.setdefault("runs", {}).setdefault(key, {})[str(seed)] = entry
        self.results["command"], self.results["seeds"] = self.call_command, self.args.seeds
        commands = self.results.setdefault("commands", [])
        if self.call_command not in commands:
            commands.append(self.call_command)
        self.save()

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        """Convert, plan and preprocess (CPU plans too), preprocess the unlabeled images, the test list, the
        splits and the test set's files; every step that is done already is skipped."""
        ds, a, ws = self.ds, self.args, self.ws
        if not os.path.isfile(os.path.join(self.raw_folder, "dataset.json")):
            os.makedirs(ws.raw, exist_ok=True)
            ds.convert(ws, a.quick)
        plan_env = planner_env(ws.env)
        if not os.path.isfile(os.path.join(self.pre_folder, "nnUNetPlans.json")) or not os.path.isdir(
                os.path.join(self.pre_folder, "gt_segmentations")):
            ws.run(["nnUNetv2_plan_and_preprocess", "-d", ds.id, "-c", ds.configuration, "-np", 2, "-npfp", 2],
                   "plan and preprocess", env=plan_env)
        if a.plans == "cpu":
            plans_file = os.path.join(self.pre_folder, self.plans + ".json")
            if not os.path.isfile(plans_file):
                ws.run(["nnssl_make_cpu_plans", "-d", ds.id, "-c", ds.configuration, "-o", self.plans,
                        "--features-scale", a.features_scale, "--batch-size", self.batch_size, "--spacing-factor",
                        self.spacing_factor], "cpu plans")
            batch = json.load(open(plans_file))["configurations"][ds.configuration]["batch_size"]
            if batch != self.batch_size:  # e.g. a workspace from before the plans name told the numbers apart
                raise UserInputError(f"{plans_file} has batch size {batch}, not the requested {self.batch_size}: "
                                     f"delete it (and its preprocessed folder) or use another --work")
            identifier = json.load(open(os.path.join(self.pre_folder, self.plans + ".json")))[
                "configurations"][ds.configuration]["data_identifier"]
            if not os.path.isdir(os.path.join(self.pre_folder, identifier)):
                ws.run(["nnUNetv2_preprocess", "-d", ds.id, "-plans_name", self.plans, "-c", ds.configuration,
                        "-np", 2], "preprocess cpu plans", env=plan_env)
        if os.path.isdir(os.path.join(self.raw_folder, "imagesUnlabeled")):
            ws.run(["nnssl_preprocess_unlabeled", "-d", ds.id, "-c", ds.configuration, "-p", self.plans,
                    "--no-progress"], "preprocess unlabeled")
        self.test_cases = ds.test_cases(ws, a.quick)
        ds.make_splits(ws, a.labeled, self.test_cases, a.quick)
        # the reported set: the held-out test list, or (ACDC's fixed split) the validation patients
        self.reported_cases = ds.reported_cases(ws, a.quick)
        test = os.path.join(self.work, "validation" if ds.fixed_split else "test")
        copy_test_set(ws, ds, self.reported_cases, test)
        self.test_images, self.test_labels = os.path.join(test, "images"), os.path.join(test, "labels")
        self.test_folder = a.test_folder
        if a.test_folder:
            self.test_folder_images, self.test_folder_labels = check_test_folder(
                a.test_folder, json.load(open(os.path.join(self.raw_folder, "dataset.json"))))

    # ------------------------------------------------------------------ training and evaluation
    def budget(self, iters: int) -> str:
        a = self.args
        return f"_{a.epochs}epochs_{iters}iters_{a.val_iters}valiters"

    def output_folder(self, variant: str, fold: int) -> str:
        return os.path.join(self.ws.results, self.ds.name, f"{variant}__{self.plans}__{self.ds.configuration}",
                            f"fold_{fold}")

    def run_one(self, key: str, trainer: str, fold: int, iters: int, seed: int,
                env: Optional[dict] = None) -> dict:
        """Train (or resume), predict the test list, evaluate; cached in the results file. ``env``: more
        environment variables for the training."""
        entry = self.results.setdefault("runs", {}).setdefault(key, {}).get(str(seed))
        if entry and entry.get("done"):
            return entry
        ds, a = self.ds, self.args
        variant = trainer + self.budget(iters)
        out = self.output_folder(variant, fold)
        cmd = ["nnUNetv2_train", ds.id, ds.configuration, fold, "-tr", variant, "-p", self.plans, "-device", a.device]
        train, resumed_at_epoch = None, None
        if not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            latest = os.path.join(out, "checkpoint_latest.pth")
            if os.path.isfile(latest):  # an interrupted training (e.g. an earlier session's) goes on with --c
                resumed_at_epoch = int(_checkpoint(latest)["current_epoch"])
            # every row of seed k is trained with $nnssl_seed = k (nnssl trainers and budget variants of stock ones
            # seed themselves from it); on the folds of a drawn split seed k is also fold k's own split
            train = self.ws.run(cmd + (["--c"] if resumed_at_epoch is not None else []), f"train {key} seed {seed}",
                                env={**self.ws.env, "nnssl_seed": str(seed), **(env or {})})
        log = _checkpoint(os.path.join(out, "checkpoint_final.pth"))["logging"]
        phase = log.get("train_phase_seconds", [])
        preds = os.path.join(self.work, "predictions", f"{key}_seed{seed}")
        summary_file = preds + "_eval_summary.json"
        if train is not None and os.path.isfile(summary_file):  # a (re)trained checkpoint: no stale evaluation
            os.remove(summary_file)
        if not os.path.isfile(summary_file):
            shutil.rmtree(preds, ignore_errors=True)
            self.ws.run(["nnUNetv2_predict", "-i", self.test_images, "-o", preds, "-d", ds.id, "-c", ds.configuration,
                         "-f", fold, "-tr", variant, "-p", self.plans, "-device", a.device, "-npp", 1, "-nps", 1],
                        f"predict {key} seed {seed}")
            from nnssl.evaluation.evaluate import evaluate_folders

            hc_csv = os.path.join(self.raw_folder, "hc_reference.csv") if ds.head_circumference else None
            evaluate_folders(self.test_labels, preds, json.load(open(os.path.join(self.raw_folder,
                                                                                  "dataset.json"))),
                             output_prefix=preds + "_eval", hc=ds.head_circumference, hc_csv=hc_csv)
        summary = json.load(open(summary_file))
        per_class = {c["name"]: {m: c[m]["mean"] for m in ("dice", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")}
                     for c in summary["per_class"].values()}
        over = {m: summary["over_classes"][m]["mean"] for m in ("dice", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")}
        entry = {"trainer": variant, "fold": fold, "iterations": a.epochs * iters, "per_class": per_class,
                 "mean": over, "seconds_per_iteration": float(np.median(phase)) / iters if phase else None,
                 "train_command": " ".join(map(str, cmd)),
                 "train_epochs_seconds": round(_epochs_seconds(log), 1),
                 "compute_seconds": round(_epochs_seconds(log), 1),
                 # wall time of one uninterrupted training process; a resumed run has none (its epochs' own
                 # durations are in train_epochs_seconds, restored with the checkpoint's log)
                 "train_wall_seconds": (None if train is None or resumed_at_epoch is not None
                                        else round(train.seconds, 1)),
                 "resumed_at_epoch": resumed_at_epoch,
                 "peak_rss_mb": None if train is None or train.peak_rss_mb is None else round(train.peak_rss_mb, 1),
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
        if ds.head_circumference:
            hc = summary["head_circumference"]
            entry["hc_abs_diff_mm"] = hc["abs_diff_mm"]["mean"]
            entry["hc_diff_mm"] = hc["diff_mm"]["mean"]
        if self.test_folder:
            entry["test_folder"] = self.evaluate_test_folder(key, variant, fold, seed)
        entry["over_60_minutes"] = bool(entry["train_epochs_seconds"] > 3600)
        self.record(key, seed, entry)
        return entry

    def run_self_training(self, trainer: str, seed: int) -> dict:
        """Offline self-training, one round: the seed's labeled-only row is the teacher, ``nnssl_pseudolabel``
        labels the fold's pool with it (mirroring on, as a user would), the student trains on the same budget. Its
        entry counts the teacher's training and the prediction pass (``teacher_cost``, ``compute_seconds``)."""
        from nnssl.data.layout import PSEUDO_LABEL_MANIFEST as MANIFEST
        from nnssl.data.pseudo_labels import teacher_cost

        entry = self.results.setdefault("runs", {}).setdefault(trainer, {}).get(str(seed))
        if entry and entry.get("done"):
            return entry
        ds, a = self.ds, self.args
        teacher = "nnUNetTrainer" + self.budget(a.iters)
        self.run_one(LOWER, "nnUNetTrainer", seed, a.iters, seed)
        if not os.path.isfile(os.path.join(self.output_folder(teacher, seed), "checkpoint_final.pth")):
            raise UserInputError(f"the teacher of {trainer} seed {seed}, the labeled-only row, is in "
                                 f"{self.results_path}.json but its checkpoint is not in the workspace {self.work}: "
                                 f"delete that row's seed {seed} entry from the results file to retrain it there")
        tag = f"{teacher}__{self.plans}__{ds.configuration}__fold_{seed}"
        identifier = json.load(open(os.path.join(self.pre_folder, self.plans + ".json")))["configurations"][
            ds.configuration]["data_identifier"]
        store = os.path.join(self.pre_folder, "unlabeled", identifier, "pseudo_labels", tag)
        manifest = load_json_or_none(os.path.join(store, MANIFEST))
        if not (manifest and manifest.get("complete")):
            self.ws.run(["nnssl_pseudolabel", "-d", ds.id, "-c", ds.configuration, "-f", seed, "-tr", teacher, "-p",
                         self.plans, "-device", a.device, "--no-progress"], f"pseudolabel seed {seed}")
            manifest = json.load(open(os.path.join(store, MANIFEST)))
        entry = self.run_one(trainer, trainer, seed, a.iters, seed, env={"nnssl_pseudo_labels": tag})
        cost = teacher_cost(manifest)
        entry["teacher_cost"] = {"teacher": teacher, "store": tag, **cost}
        entry["compute_seconds"] = round(entry["train_epochs_seconds"] + cost["seconds"], 1)
        self.save()
        return entry

    def copy_upper(self, seed: int) -> dict:
        """The all-labels row of ``seed`` from ``--upper-from`` (see :func:`copied_upper_entry`)."""
        entry = self.results.setdefault("runs", {}).setdefault(UPPER, {}).get(str(seed))
        if entry and entry.get("done"):
            return entry
        source = load_json_or_none(self.args.upper_from)
        if source is None:
            raise UserInputError(f"--upper-from {self.args.upper_from}: no such results file")
        if self.test_folder:
            raise UserInputError("--upper-from copies a row without its checkpoint, so --test-folder cannot "
                                 "evaluate it: run the upper row here instead")
        entry = copied_upper_entry(self.results, source, os.path.basename(self.args.upper_from), seed,
                                   self.ds.fixed_split)
        self.record(UPPER, seed, entry)
        return entry

    def evaluate_test_folder(self, key: str, variant: str, fold: int, seed: int) -> dict:
        """The row's final checkpoint on ``--test-folder`` (predicted and evaluated once per checkpoint)."""
        from nnssl.evaluation.evaluate import evaluate_folders

        ds, a = self.ds, self.args
        preds = os.path.join(self.work, "predictions_test_folder", f"{key}_seed{seed}")
        summary_file = preds + "_eval_summary.json"
        ckpt = os.path.join(self.output_folder(variant, fold), "checkpoint_final.pth")
        if os.path.isfile(summary_file) and os.path.getmtime(summary_file) < os.path.getmtime(ckpt):
            os.remove(summary_file)  # a retrained checkpoint
        if not os.path.isfile(summary_file):
            shutil.rmtree(preds, ignore_errors=True)
            self.ws.run(["nnUNetv2_predict", "-i", self.test_folder_images, "-o", preds, "-d", ds.id, "-c",
                         ds.configuration, "-f", fold, "-tr", variant, "-p", self.plans, "-device", a.device, "-npp",
                         1, "-nps", 1], f"predict test folder {key} seed {seed}")
            evaluate_folders(self.test_folder_labels, preds, json.load(open(os.path.join(self.raw_folder,
                                                                                        "dataset.json"))),
                             output_prefix=preds + "_eval")
        summary = json.load(open(summary_file))
        return {"folder": os.path.abspath(a.test_folder), "cases": len(os.listdir(self.test_folder_labels)),
                "per_class": {c["name"]: {m: c[m]["mean"] for m in ("dice", "hd95_vox", "asd_vox", "hd95_mm",
                                                                     "asd_mm")}
                              for c in summary["per_class"].values()},
                "mean": {m: summary["over_classes"][m]["mean"] for m in ("dice", "hd95_vox", "asd_vox", "hd95_mm",
                                                                          "asd_mm")}}

    def run(self) -> None:
        a = self.args
        self.prepare()
        if a.prepare_only:
            print(f"[benchmark] prepared {self.work}", flush=True)
            return
        self.results.update({
            "dataset": self.ds.name, "labeled": a.labeled, "configuration": self.ds.configuration,
            "plans": self.plans, "plans_detail": self.plans_detail(), "device": a.device,
            "budget": {"epochs": a.epochs, "iterations_per_epoch": a.iters, "val_iterations_per_epoch": a.val_iters},
            "test_cases": len(self.reported_cases),
            "reported_set": "validation" if self.ds.fixed_split else "test",
            "protocol": ("the literature's fixed split (labeled, unlabeled and validation patients); seed k = "
                         "training seed k ($nnssl_seed) on fold k, a copy of that split; reported on the "
                         "validation patients, which select nothing (checkpoint_final is evaluated)"
                         if self.ds.fixed_split else
                         "seed k = fold k of the benchmark's splits_final.json (own validation cases and labeled "
                         "subset) and training seed k ($nnssl_seed); the test list is never used for training or "
                         "checkpoint selection (checkpoint_final is evaluated)")})
        self.save()
        trainers = a.trainers if a.trainers is not None else trainer_names(self.ds.dimensionality)
        rows = set(a.rows)
        for seed in a.seeds:
            if rows & {"lower", "ssl", "matched"}:  # the SSL rows' time ratios need the seed's labeled-only row
                self.run_one(LOWER, "nnUNetTrainer", seed, a.iters, seed)
            if "lower2x" in rows:  # does the baseline still improve with twice the iterations?
                self.run_one(LOWER_2X, "nnUNetTrainer", seed, 2 * a.iters, seed)
            if "ssl" in rows:
                for tr in trainers:
                    if tr in TEACHER_FIRST:
                        self.run_self_training(tr, seed)
                    else:
                        self.run_one(tr, tr, seed, a.iters, seed)
                    set_time_ratios(self.results)
                    self.save()
            if "upper" in rows and a.upper_from:
                self.copy_upper(seed)
            elif "upper" in rows:
                self.run_one(UPPER, "nnUNetTrainer", seed + UPPER_FOLD_OFFSET, a.iters, seed)
            if "matched" in rows:
                ratio = compute_ratio(self.results)
                if ratio is None:
                    print(f"[benchmark] seed {seed}: no SSL row measured yet, so no compute-matched row",
                          flush=True)
                    continue
                matched_iters = int(math.ceil(a.iters * ratio))
                old = self.results["runs"].get(MATCHED, {}).get(str(seed))
                # a costlier trainer added later retrains the row (not timing noise: compute_ratio keeps it)
                if old and abs(old["iterations"] / (a.epochs * matched_iters) - 1) > 0.1:
                    del self.results["runs"][MATCHED][str(seed)]
                self.run_one(MATCHED, "nnUNetTrainer", seed, matched_iters, seed)
        backfill_old_entries(self.results, self.output_folder)
        set_time_ratios(self.results)
        self.save()
        write_report(self.results, self.results_path)

    def plans_detail(self) -> dict:
        cfg = json.load(open(os.path.join(self.pre_folder, self.plans + ".json")))["configurations"][
            self.ds.configuration]
        return {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
                "features_per_stage": cfg["architecture"]["arch_kwargs"]["features_per_stage"]}


ROWS = ("lower", "lower2x", "ssl", "upper", "matched")


def cpu_plans_tag(ds, spacing_factor: float, batch_size: int, features_scale: float) -> str:
    """The suffix of the CPU plans' name and of the results file for CPU plans other than the dataset's default
    (``""``; ``"_sf8"`` for ``--spacing-factor 8``, ``"_sf2_b2"``, ``"_f0.5"`` ...)."""
    parts = []
    if spacing_factor != ds.spacing_factor:
        parts.append(f"sf{spacing_factor:g}")
    if batch_size != ds.batch_size:
        parts.append(f"b{batch_size}")
    if features_scale != 0.25:
        parts.append(f"f{features_scale:g}")
    return "".join("_" + x for x in parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--labeled", default="10%",
                   help="labeled share (10%%) or count (8) of each fold's training cases; ACDC: the literature's "
                        "setting, 3 or 7 labeled patients")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    p.add_argument("--iters", type=int, default=100, help="iterations per epoch (default 100)")
    p.add_argument("--val-iters", type=int, default=10, help="validation iterations per epoch (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="folds used as seeds (default 0)")
    p.add_argument("--plans", choices=("cpu", "default"), default="cpu",
                   help="cpu: nnssl_make_cpu_plans variant (features x0.25, HC18 at 4x spacing); default: nnU-Net's")
    p.add_argument("--features-scale", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=None,
                   help="CPU plans' batch size (default 4 Hippocampus, 8 HC18 and ACDC)")
    p.add_argument("--spacing-factor", type=float, default=None,
                   help="CPU plans at this factor times nnU-Net's spacing (default 1 Hippocampus, 2 ACDC, 4 HC18); "
                        "like --batch-size and --features-scale, a value other than the default names its own plans "
                        "and results file (e.g. hc18_10pct_sf8)")
    p.add_argument("--trainers", nargs="*", default=None,
                   help="nnSSL trainers (default: every registered one that trains the dataset's configuration)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--work", default=None,
                   help="workspace (default ~/.cache/nnssl/benchmarks/<dataset>_<setting>, e.g. acdc_7cases; or under "
                        "$NNSSL_BENCHMARK_WORK)")
    p.add_argument("--results", default=None, help="results path without extension")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="which rows to run for each seed (default all): lower (labeled only), lower2x (labeled only, "
                        "twice the iterations: does the baseline still improve?), ssl (the --trainers), upper (all "
                        "labels), matched (labeled only with the costliest SSL trainer's measured cost in "
                        "iterations); finished rows are kept")
    p.add_argument("--upper-from", default=None, metavar="RESULTS_JSON",
                   help="ACDC: take the all-labels row from the other setting's results file (e.g. "
                        "benchmarks/results/acdc_7cases_sf3_b4.json) instead of training it again: with the fixed "
                        "split it is the same training (every training patient labeled) when plans, budget and "
                        "device are the same, which is checked; the entries are marked copied_from")
    p.add_argument("--skip-compute-matched", action="store_true",
                   help="the same as leaving 'matched' out of --rows (kept for the commands of older results)")
    p.add_argument("--test-folder", default=None, metavar="DIR",
                   help="also evaluate every finished row's final checkpoint on DIR (imagesTr/CASE_0000.nii.gz and "
                        "labelsTr/CASE.nii.gz, e.g. ACDC's 20 test patients); kept apart in each entry's "
                        "'test_folder'")
    p.add_argument("--prepare-only", action="store_true",
                   help="convert, plan, preprocess and split, then stop (e.g. before benchmarks/step_time.py)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a subset of the data, 2 epochs x 5 iterations, results *_quick.*")
    args = p.parse_args(argv)
    if args.skip_compute_matched:
        args.rows = [r for r in args.rows if r != "matched"]
    if args.quick:
        args.epochs, args.iters, args.val_iters, args.seeds = 2, 5, 2, [0]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run_command(lambda: Runner(args).run())


if __name__ == "__main__":
    main()
