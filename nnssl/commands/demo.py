"""``nnssl_demo``: the whole nnssl workflow on a small dataset, on this machine, in minutes.

Without arguments it writes a small synthetic 3D dataset (:mod:`nnssl.dataset_conversion.synthetic`); with
``--msd PATH`` it uses a Medical Segmentation Decathlon task (e.g. Task04_Hippocampus) through nnU-Net's own
converter and holds out ``--test-fraction`` of its labeled cases as a test set. Then, each step a real console
script in a subprocess, with nnU-Net's environment pointing into the work folder:

1. ``nnUNetv2_plan_and_preprocess`` (stock) and ``nnssl_make_cpu_plans`` (a CPU-scale plans variant);
2. ``nnssl_preprocess_unlabeled`` (when the dataset has unlabeled images);
3. ``nnssl_make_split --labeled`` (the other training cases' labels are hidden);
4. ``nnUNetv2_train`` of the labeled-only ``nnUNetTrainer`` and of ``nnSSL_MeanTeacherTrainer`` on the same
   split, plans and budget (budget variants ``_<E>epochs_<I>iters``);
5. ``nnUNetv2_predict`` of the test images with both, ``nnssl_evaluate`` against the test labels;
6. a side-by-side table (``demo_results.md``, ``demo_results.json``) and a plot (``demo_results.png``).

The default budget is a demonstration, not a benchmark: at 600 iterations the labeled-only baseline has not
converged, and a difference between the two rows may be compute, not semi-supervision (see benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnssl.utils import UserInputError, atomic_write_json, run_command
from nnssl.workflow import Workspace, nnunet_env, planner_env

SYNTHETIC_ID = 990


def workspace(workdir: str) -> Workspace:
    """The demo's workspace: nnU-Net's folders in ``workdir``, every step logged to ``demo_log.txt``.

    nnU-Net's defaults spawn 8 export workers and 12 augmentation workers: slower than none on few cores, so
    unless the user set them, fewer."""
    cores = multiprocessing.cpu_count()
    env = nnunet_env(workdir)
    env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, cores // 2))))
    if cores <= 4:
        env.setdefault("nnUNet_n_proc_DA", "0")
    return Workspace(workdir, env, log=os.path.join(workdir, "demo_log.txt"), echo="nnssl_demo")


def _link_cases(cases: Sequence[str], src_images: str, src_labels: str, dst_images: str, dst_labels: str,
                ending: str) -> None:
    os.makedirs(dst_images, exist_ok=True)
    os.makedirs(dst_labels, exist_ok=True)
    for c in cases:
        shutil.copy(os.path.join(src_images, f"{c}_0000{ending}"), dst_images)
        shutil.copy(os.path.join(src_labels, f"{c}{ending}"), dst_labels)


def _training_seconds_per_iteration(results_folder: str) -> Optional[float]:
    """Median epoch time over iterations per epoch, from the final checkpoint's log (validation included)."""
    import torch

    ckpt = os.path.join(results_folder, "fold_0", "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        return None
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    log = c["logging"]
    durations = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return float(np.median(durations))


def plot_results(rows: List[dict], class_names: List[str], path: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(class_names), 4.5))
    width = 0.8 / len(rows)
    x = np.arange(len(class_names) + 1)
    for i, row in enumerate(rows):
        values = [row["dice"][c] for c in class_names] + [row["mean_dice"]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=row["trainer"])
        for xi, v in zip(x, values):
            ax.text(xi + (i - (len(rows) - 1) / 2) * width, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_xticks(x, class_names + ["mean"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice on held-out test cases")
    ax.legend(loc="lower right")
    ax.set_title("nnssl demo: same split, plans and budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(workdir: str = "nnssl_demo", msd: Optional[str] = None, epochs: int = 15, iters: int = 40,
             val_iters: int = 10, labeled: str = "10%", test_fraction: float = 0.2, features_scale: float = 0.25,
             batch_size: Optional[int] = None, seed: int = 0, device: str = "cpu", overwrite: bool = False,
             synthetic_cases: Tuple[int, int, int] = (40, 20, 10)) -> dict:
    """Run the workflow (see module docstring) and return the results dict that is also written to disk.

    ``synthetic_cases`` = (labeled, unlabeled, test) images of the synthetic dataset.
    """
    from nnssl.evaluation.evaluate import evaluate_folders

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    if os.path.isdir(workdir) and os.listdir(workdir):
        if not overwrite:
            raise UserInputError(f"{workdir} exists and is not empty; use --overwrite or another -o")
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    ws = workspace(workdir)
    raw = ws.raw
    os.makedirs(raw)

    if msd is None:
        from nnssl.dataset_conversion.synthetic import make_synthetic_dataset

        folder = make_synthetic_dataset(raw, SYNTHETIC_ID, n_labeled=synthetic_cases[0],
                                        n_unlabeled=synthetic_cases[1], n_test=synthetic_cases[2], seed=seed)
        dataset_id, exclude = SYNTHETIC_ID, None
        test_images, test_labels = os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")
        batch_size = batch_size or 2
    else:
        if not os.path.isfile(os.path.join(msd, "dataset.json")):
            raise UserInputError(f"{msd} is not an MSD task folder (no dataset.json)")
        dataset_id = 991
        ws.run(["nnUNetv2_convert_MSD_dataset", "-i", os.path.abspath(msd), "-overwrite_id", str(dataset_id),
                "-np", "2"], "convert MSD")
        folder = [os.path.join(raw, d) for d in os.listdir(raw) if d.startswith(f"Dataset{dataset_id}_")][0]
        if os.listdir(os.path.join(folder, "imagesTs")):  # MSD test images: unlabeled for nnssl
            os.rename(os.path.join(folder, "imagesTs"), os.path.join(folder, "imagesUnlabeled"))
        cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(folder, "labelsTr")))
        rng = np.random.RandomState(seed)
        test_cases = sorted(rng.choice(cases, max(1, int(round(test_fraction * len(cases)))), replace=False))
        exclude = os.path.join(workdir, "test_cases.txt")
        with open(exclude, "w") as f:
            f.write("\n".join(test_cases) + "\n")
        test_images, test_labels = os.path.join(workdir, "test", "images"), os.path.join(workdir, "test", "labels")
        _link_cases(test_cases, os.path.join(folder, "imagesTr"), os.path.join(folder, "labelsTr"), test_images,
                    test_labels, ".nii.gz")
        batch_size = batch_size or 4

    ws.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "2", "-npfp", "2"],
           "plan and preprocess", env=planner_env(ws.env))
    ws.run(["nnssl_make_cpu_plans", "-d", str(dataset_id), "--features-scale", str(features_scale),
            "--batch-size", str(batch_size)], "CPU-scale plans")
    if os.path.isdir(os.path.join(folder, "imagesUnlabeled")):
        ws.run(["nnssl_preprocess_unlabeled", "-d", str(dataset_id), "-c", "3d_fullres", "--no-progress"],
               "preprocess unlabeled images")
    split = ["nnssl_make_split", "-d", str(dataset_id), "--labeled", labeled, "--seed", str(seed)]
    ws.run(split + (["--exclude", exclude] if exclude else []), "semi-supervised split")

    dataset_json = json.load(open(os.path.join(folder, "dataset.json")))
    class_names = [k for k, v in sorted(dataset_json["labels"].items(), key=lambda kv: kv[1]) if v != 0]
    budget = f"_{epochs}epochs_{iters}iters_{val_iters}valiters"
    rows = []
    for base in ("nnUNetTrainer", "nnSSL_MeanTeacherTrainer"):
        trainer = base + budget
        train = ws.run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", trainer, "-p",
                        "nnUNetPlans_cpu", "-device", device], f"train {base}")
        preds = os.path.join(workdir, "predictions", base)
        ws.run(["nnUNetv2_predict", "-i", test_images, "-o", preds, "-d", str(dataset_id), "-c", "3d_fullres",
                "-f", "0", "-tr", trainer, "-p", "nnUNetPlans_cpu", "-device", device, "-npp", "1", "-nps", "1"],
               f"predict {base}")
        summary = evaluate_folders(test_labels, preds, dataset_json, num_processes=1)
        per_class = {c["name"]: c for c in summary["per_class"].values()}
        mean_of = lambda name, m: float("nan") if per_class[name][m]["mean"] is None \
            else float(per_class[name][m]["mean"])  # noqa: E731
        dice = {name: mean_of(name, "dice") for name in class_names}
        hd95 = {name: mean_of(name, "hd95_mm") for name in class_names}
        results_folder = os.path.join(ws.results, os.path.basename(folder), f"{trainer}__nnUNetPlans_cpu__3d_fullres")
        epoch_seconds = _training_seconds_per_iteration(results_folder)
        rows.append({"trainer": base, "variant": trainer, "dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
                     "hd95_mm": hd95, "train_wall_seconds": round(train.seconds, 1),
                     "median_epoch_seconds": None if epoch_seconds is None else round(epoch_seconds, 2)})

    results = {"dataset": os.path.basename(folder), "labeled": labeled, "budget": {"epochs": epochs,
               "iterations_per_epoch": iters, "val_iterations_per_epoch": val_iters},
               "plans": f"nnUNetPlans_cpu (features x{features_scale}, batch size {batch_size})", "device": device,
               "test_cases": len([f for f in os.listdir(test_images) if f.endswith(".nii.gz")]),
               "rows": rows, "steps": [{"step": s.title, "command": s.command, "seconds": round(s.seconds, 1)}
                                       for s in ws.steps], "total_wall_seconds": round(time.time() - t0, 1)}
    table = format_table(results, class_names)
    atomic_write_json(results, os.path.join(workdir, "demo_results.json"))
    with open(os.path.join(workdir, "demo_results.md"), "w") as f:
        f.write(table + "\n")
    plot_results(rows, class_names, os.path.join(workdir, "demo_results.png"))
    print("\n" + table)
    print(f"\nresults, plot and logs in {workdir} (demo_results.md/.json/.png, demo_log.txt)")
    return results


def format_table(results: dict, class_names: List[str]) -> str:
    head = "| trainer | " + " | ".join(f"Dice {c}" for c in class_names) + " | mean Dice | mean HD95 (mm) | " \
           "train wall time (s) | median epoch (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["rows"]:
        lines.append(f"| {r['trainer']} | " + " | ".join(f"{r['dice'][c]:.3f}" for c in class_names) +
                     f" | {r['mean_dice']:.3f} | {np.mean(list(r['hd95_mm'].values())):.2f} | "
                     f"{r['train_wall_seconds']:.0f} | {r['median_epoch_seconds']} |")
    b = results["budget"]
    lines.append("")
    lines.append(f"{results['dataset']}, {results['labeled']} labeled, {results['test_cases']} held-out test cases, "
                 f"{b['epochs']} epochs x {b['iterations_per_epoch']} iterations, {results['plans']}, "
                 f"device {results['device']}; total wall time {results['total_wall_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="nnssl_demo", description=__doc__.split("\n\n")[0] +
                                     " Compares labeled-only nnUNetTrainer and nnSSL_MeanTeacherTrainer.")
    parser.add_argument("-o", default="nnssl_demo", help="work folder (default ./nnssl_demo)")
    parser.add_argument("--msd", default=None, help="an MSD task folder (e.g. Task04_Hippocampus) instead of "
                                                    "synthetic data")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per training (default 15)")
    parser.add_argument("--iters", type=int, default=40, help="iterations per epoch (default 40)")
    parser.add_argument("--val-iters", type=int, default=10, help="validation iterations per epoch (default 10)")
    parser.add_argument("--labeled", default="10%", help="labeled cases of each fold's training pool (10%%)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share for --msd (0.2)")
    parser.add_argument("--features-scale", type=float, default=0.25, help="CPU plans' feature factor (0.25)")
    parser.add_argument("--batch-size", type=int, default=None, help="CPU plans' batch size (2 synthetic, 4 MSD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing work folder")
    args = parser.parse_args(argv)
    run_command(lambda: run_demo(args.o, args.msd, args.epochs, args.iters, args.val_iters, args.labeled,
                                 args.test_fraction, args.features_scale, args.batch_size, args.seed, args.device,
                                 args.overwrite))


if __name__ == "__main__":
    main()
