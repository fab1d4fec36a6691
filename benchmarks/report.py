"""The benchmark's report: a results file (``benchmarks/results/<dataset>_<fraction>.json``) as a Markdown table
(``.md``) and a plot of the metrics and learning curves (``.png``).

``benchmarks/run.py`` writes the report after every call; this script writes it again from a results file, e.g.
after a change of the report's format or a hand-edited entry:

    python benchmarks/report.py benchmarks/results/hc18_10pct.json                  # rewrites hc18_10pct.md/.png
    python benchmarks/report.py benchmarks/results/hc18_10pct.json --out /tmp/hc18  # /tmp/hc18.md/.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nnssl.trainers.progress import VAL_DICE_PREFIX  # noqa: E402

# the bounds' rows of a results file ("runs"), beside one row per nnSSL trainer
LOWER = "nnUNetTrainer (labeled only)"
UPPER = "nnUNetTrainer (all labels, upper bound)"
MATCHED = "nnUNetTrainer (labeled only, compute-matched)"
LOWER_2X = "nnUNetTrainer (labeled only, 2x iterations)"


def _mean_sd(values: List[Optional[float]]) -> str:
    """``mean ± sd`` of the measured values (None and NaN left out; sample sd, n - 1; no sd for one value), ``-``
    for none."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "-"
    return f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "")


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
    vox = results.get("reported_set") == "validation"  # ACDC: the literature reports distances in voxels
    dist = ("hd95_vox", "asd_vox") if vox else ("hd95_mm", "asd_mm")
    head = ["trainer", "iterations", "seeds"] + [f"Dice {c}" for c in classes] + (
        ["mean Dice", "HD95 (vox)", "ASD (vox)"] if vox else ["mean Dice", "HD95 (mm)", "ASD (mm)"])
    head += ["HC abs diff (mm)"] if hc else []
    head += ["s/iteration", "time ratio", "training (min)", "peak RSS (MB)"]
    test_folder = any("test_folder" in e for r in runs.values() for e in r.values())
    head += ["mean Dice, --test-folder"] if test_folder else []
    search = any("region_search_share" in e for r in runs.values() for e in r.values())
    head += ["region search share"] if search else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in runs.items():
        es = list(r.values())
        row = [key, str(es[0]["iterations"]), str(len(es))]
        row += [_mean_sd([e["per_class"][c]["dice"] for e in es]) for c in classes]
        row += [_mean_sd([e["mean"].get(m) for e in es]) for m in ("dice",) + dist]
        row += [_mean_sd([e.get("hc_abs_diff_mm") for e in es])] if hc else []
        row += [_mean_sd([e["seconds_per_iteration"] for e in es]),
                _mean_sd([e.get("time_ratio_to_nnUNetTrainer") for e in es]),
                _mean_sd([e["train_epochs_seconds"] / 60 if e.get("train_epochs_seconds") else None for e in es]),
                _mean_sd([e.get("peak_rss_mb") for e in es])]
        row += [_mean_sd([e["test_folder"]["mean"]["dice"] for e in es if "test_folder" in e])] if test_folder else []
        row += [_mean_sd([e.get("region_search_share") for e in es])] if search else []
        lines.append("| " + " | ".join(row) + " |")
    others = _other_networks_lines(runs)
    if others:
        lines += ["", "Validation pseudo-Dice of each trainer's networks (nnU-Net's online validation on the fold's "
                  "validation cases, mean of the last 5 epochs; the deployed network first): " + "; ".join(others)]
    taught = [f"{key} seed {seed}: own training {e['train_epochs_seconds'] / 60:.1f} min + teacher "
              f"{e['teacher_cost']['teacher_training_seconds'] / 60:.1f} min + prediction pass "
              f"{e['teacher_cost']['prediction_seconds'] / 60:.1f} min = "
              f"{e['compute_ratio_to_nnUNetTrainer']:.2f}x the labeled-only row"
              for key, r in runs.items() for seed, e in r.items()
              if e.get("teacher_cost") and e.get("compute_ratio_to_nnUNetTrainer")]
    if taught:
        lines += ["", "Offline self-training's whole cost (its teacher is the seed's labeled-only row; the table's "
                  "time ratio is its own iterations only): " + "; ".join(taught)]
    resumed = [f"{key} seed {seed} at epoch {e['resumed_at_epoch']}" for key, r in runs.items()
               for seed, e in r.items() if e.get("resumed_at_epoch") is not None]
    if resumed:
        lines += ["", "Trained in more than one process (an interrupted training resumed with --c; training time is "
                  "the sum of its epochs, peak RSS the resumed process's): " + "; ".join(resumed)]
    replaced = [f"{e['row']} seed {e['seed']} {e['dice']:.3f} ({e['why']})"
                for e in results.get("replaced_entries", [])]
    if replaced:
        lines += ["", "Runs replaced by a rerun of the same command and seed (the table holds the rerun; the first "
                  "values, kept here for the record, show the run-to-run spread at a fixed seed): "
                  + "; ".join(replaced)]
    copied = {}
    for key, r in runs.items():
        for seed, e in r.items():
            if e.get("copied_from"):
                copied.setdefault((key, e["copied_from"]), []).append(seed)
    if copied:
        lines += ["", "Rows taken from another setting's results file (the same training: the fixed split's "
                  "all-labels folds do not depend on the labeled count; same plans, budget and seeds): "
                  + "; ".join(f"{key} seeds {', '.join(sorted(s, key=int))} from {src}"
                              for (key, src), s in copied.items())]
    b = results["budget"]
    seeds = sorted({int(s) for r in runs.values() for s in r})  # every call's seeds, not the last call's
    reported = (f"reported on {results['test_cases']} validation cases (the literature's fixed split; they select "
                f"nothing)" if results.get("reported_set") == "validation" else
                f"{results['test_cases']} held-out test cases")
    lines += ["", f"{results['dataset']}, {results['labeled']} labeled, {reported}, "
              f"{results['configuration']} with {results['plans']} {results['plans_detail']}, {b['epochs']} epochs x "
              f"{b['iterations_per_epoch']} iterations (compute-matched row: more iterations per epoch), device "
              f"{results['device']}; mean ± sample sd over seeds (folds) {seeds} (the seeds column: how many each row "
              f"has). Reproduce: "
              + ("; then ".join(f"`{c}`" for c in results.get("commands") or [results["command"]]))]
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
    sds = [np.std([e["mean"]["dice"] for e in runs[k].values()], ddof=1) if len(runs[k]) > 1 else 0.0
           for k in keys]
    ax.bar(range(len(keys)), means, yerr=sds, color=["C0", *["C1"] * (len(keys) - 3), "C2", "C3"][:len(keys)],
           capsize=4)
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.3f}", ha="center", fontsize=9)
    for k, style in ((LOWER, "--"), (UPPER, ":")):
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
    p.add_argument("results", help="a results file of benchmarks/run.py (.json)")
    p.add_argument("--out", default=None, help="report path without extension (default: beside the results file)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    write_report(results, args.out or os.path.splitext(args.results)[0])


if __name__ == "__main__":
    main()
