"""Student or EMA teacher for inference? Decided on the fold's VALIDATION cases only (never the test list).

    python benchmarks/teacher_vs_student.py --work benchmarks/work/hippocampus \\
        --model nnSSL_MeanTeacherTrainer_30epochs_100iters_10valiters__nnUNetPlans_cpu__3d_fullres --fold 0

Predicts the fold's validation cases with the checkpoint as trained (``network_weights`` = student) and with a
copy whose ``network_weights`` are the teacher's (``nnssl/modules/teacher``), both through nnU-Net's
``nnUNetv2_predict_from_modelfolder``, and evaluates both with ``nnssl_evaluate`` against nnU-Net's
``gt_segmentations``. Writes ``<model folder>/teacher_vs_student_fold<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> None:
    import torch

    from nnssl.evaluation.evaluate import evaluate_folders
    from nnssl.utils import atomic_write_json
    from nnssl.workflow import nnunet_env, run_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="benchmark workspace (with nnUNet_raw/preprocessed/results)")
    p.add_argument("--model", required=True, help="results folder name <Trainer>__<Plans>__<configuration>")
    p.add_argument("--fold", type=int, default=0)
    args = p.parse_args(argv)
    work = os.path.abspath(args.work)
    env = nnunet_env(work, nnUNet_def_n_proc="1")
    (dataset,) = os.listdir(env["nnUNet_results"]) if len(os.listdir(env["nnUNet_results"])) == 1 else [
        d for d in os.listdir(env["nnUNet_results"]) if os.path.isdir(f"{env['nnUNet_results']}/{d}/{args.model}")]
    model = f"{env['nnUNet_results']}/{dataset}/{args.model}"
    pre = f"{env['nnUNet_preprocessed']}/{dataset}"
    dataset_json = json.load(open(f"{model}/dataset.json"))
    ending = dataset_json["file_ending"]
    val = json.load(open(f"{pre}/splits_final.json"))[args.fold]["val"]

    scratch = f"{work}/teacher_vs_student/{args.model}_fold{args.fold}"
    shutil.rmtree(scratch, ignore_errors=True)
    images, refs = f"{scratch}/images", f"{scratch}/refs"
    os.makedirs(images)
    os.makedirs(refs)
    for c in val:
        for f in os.listdir(f"{env['nnUNet_raw']}/{dataset}/imagesTr"):
            if f.startswith(c + "_") and f.endswith(ending) and len(f) == len(c) + 5 + len(ending):
                shutil.copy(f"{env['nnUNet_raw']}/{dataset}/imagesTr/{f}", images)
        shutil.copy(f"{pre}/gt_segmentations/{c}{ending}", refs)

    teacher_model = f"{scratch}/teacher_model"
    os.makedirs(f"{teacher_model}/fold_{args.fold}")
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(f"{model}/{f}", teacher_model)
    ckpt = torch.load(f"{model}/fold_{args.fold}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    ckpt["network_weights"] = ckpt["nnssl"]["modules"]["teacher"]
    torch.save(ckpt, f"{teacher_model}/fold_{args.fold}/checkpoint_final.pth")

    report = {"model": args.model, "fold": args.fold, "validation_cases": len(val)}
    for name, folder in (("student", model), ("teacher", teacher_model)):
        out = f"{scratch}/pred_{name}"
        run_step(["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", out, "-m", folder, "-f", args.fold,
                  "-device", "cuda" if torch.cuda.is_available() else "cpu", "-npp", 1, "-nps", 1], env,
                 title=f"predict with the {name}")
        summary = evaluate_folders(refs, out, dataset_json, output_prefix=f"{out}_eval")
        report[name] = {c["name"]: c["dice"]["mean"] for c in summary["per_class"].values()}
        report[name]["mean_dice"] = summary["over_classes"]["dice"]["mean"]
    atomic_write_json(report, f"{model}/teacher_vs_student_fold{args.fold}.json")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
