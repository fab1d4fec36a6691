"""Seconds per training step of any trainer on a benchmark workspace's real data, optionally with a profile.

    python benchmarks/step_time.py --work benchmarks/work/hc18 --dataset Dataset018_HC18 -c 2d \\
        --trainers nnUNetTrainer nnSSL_MEDLTrainer nnSSL_CADTrainer --steps 10
    python benchmarks/step_time.py --work benchmarks/work/hippocampus --dataset Dataset004_Hippocampus \\
        -c 3d_fullres --trainers nnSSL_CADTrainer --profile

The workspace is one that ``benchmarks/run.py`` prepared (converted, planned, preprocessed, unlabeled images
preprocessed, split). Each trainer is built in-process on the CPU plans (``-p``), fold 0, with nnU-Net's
augmentation in the main process (``nnUNet_n_proc_DA=0``, as the benchmark's CPU rows), its step counter set
to mid-training (so ramped terms are active), one warm-up step, then ``--steps`` timed steps on pre-drawn
batches (data loading is not timed). ``--profile`` prints torch's operator table of two more steps. A quick
way to see what a change costs per step without a 2-3 hour benchmark row; the rows' ``s/iteration`` (median
epoch, data loading included) remains the reported number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nnssl.trainers.registry import trainer_class, trainer_names  # noqa: E402
from nnssl.workflow import environ, nnunet_env  # noqa: E402

TRAINERS = ("nnUNetTrainer",) + trainer_names()


def _trainer_class(name: str) -> type:
    """nnU-Net's nnUNetTrainer (the baseline) or a registered nnSSL trainer."""
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    return trainer_class(name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="benchmark workspace (benchmarks/work/<dataset>)")
    p.add_argument("--dataset", required=True, help="dataset folder name, e.g. Dataset018_HC18")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans_cpu")
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnSSL_MEDLTrainer"], choices=TRAINERS,
                   metavar="TRAINER", help=f"any of {', '.join(TRAINERS)} (default: nnUNetTrainer nnSSL_MEDLTrainer)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work)
    # nnU-Net reads its folders when first imported: set for the whole run (its own results folder), then restored
    env = nnunet_env(work, nnUNet_results=os.path.join(work, "step_time_results"), nnUNet_n_proc_DA="0",
                     nnUNet_compile="f")
    with environ(env):
        time_steps(args, os.path.join(env["nnUNet_preprocessed"], args.dataset))


def time_steps(args, pre: str) -> None:
    """Time ``args.trainers`` on the preprocessed dataset ``pre``: one line per trainer,
    ``<trainer>: <seconds> s/step over <steps> steps (<dataset>, <configuration>, ...)``."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    for name in args.trainers:
        cls = _trainer_class(name)
        plans = load_json(join(pre, args.plans + ".json"))
        plans["continue_training"] = False
        t = cls(plans, args.configuration, 0, load_json(join(pre, "dataset.json")), torch.device("cpu"))
        t.num_epochs, t.num_iterations_per_epoch = 30, 100
        t.on_train_start()
        if hasattr(t, "global_step"):
            t.global_step = t.num_epochs * t.num_iterations_per_epoch // 2
        batches = [next(t.dataloader_train) for _ in range(args.steps + 1)]
        t.train_step(batches[0])
        start = time.perf_counter()
        for b in batches[1:]:
            t.train_step(b)
        seconds = (time.perf_counter() - start) / args.steps
        print(f"{name}: {seconds:.3f} s/step over {args.steps} steps ({args.dataset}, {args.configuration}, "
              f"{args.plans}, torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for b in batches[1:3]:
                    t.train_step(b)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        t.on_train_end()


if __name__ == "__main__":
    main()
