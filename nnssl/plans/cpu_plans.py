"""``nnssl_make_cpu_plans``: a CPU-scale variant of a dataset's plans, used through nnU-Net's own ``-p``.

By default the variant keeps every configuration's name, patch size and ``data_identifier`` (so it reuses the
data that ``nnUNetv2_plan_and_preprocess`` already wrote, and the unlabeled data of
``nnssl_preprocess_unlabeled``), and only shrinks the network (features per stage times a factor) and optionally
the batch size. Example::

    nnssl_make_cpu_plans -d 4 --features-scale 0.25 --batch-size 4     # writes nnUNetPlans_cpu.json
    nnUNetv2_train 4 3d_fullres 0 -p nnUNetPlans_cpu -tr nnSSL_MeanTeacherTrainer -device cpu

On a 2-core CPU, Hippocampus' default 3d_fullres plans take about 6 s per iteration; features x0.25 with
batch 4 about 0.5 s.

With ``--spacing-factor F`` (> 1) the configurations are planned anew by nnU-Net's own ``ExperimentPlanner`` at
F times the spacing (patch size, pooling and stages follow from the coarser images, as for nnU-Net's 3d_lowres)
and get their own data identifier, so the data must be preprocessed for them with nnU-Net's command::

    nnssl_make_cpu_plans -d 18 -c 2d --spacing-factor 4 --batch-size 8
    nnUNetv2_preprocess -d 18 -plans_name nnUNetPlans_cpu -c 2d
    nnssl_preprocess_unlabeled -d 18 -p nnUNetPlans_cpu -c 2d
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Optional, Sequence

from nnssl.utils import UserInputError, atomic_write_json, dataset_name, require_env, run_command


def scale_plans(plans: dict, features_scale: float, batch_size: Optional[int] = None,
                new_plans_name: str = "nnUNetPlans_cpu", min_features: int = 4,
                configurations: Optional[Sequence[str]] = None, spacing_factor: float = 1.0,
                planner=None) -> dict:
    """Return a copy of ``plans`` whose configurations have ``features_scale`` times the features per stage.

    Configurations are written out fully resolved (no ``inherits_from``), so the variant does not depend on how
    the original expressed inheritance. Data identifiers stay the same: no re-preprocessing is needed.

    Args:
        plans: nnU-Net plans dict.
        features_scale: factor on ``features_per_stage`` (rounded, at least ``min_features``).
        batch_size: new batch size for every configuration, or None to keep the plans'.
        new_plans_name: the variant's ``plans_name`` (and file name).
        min_features: lower bound on the features of a stage.
        configurations: configurations to keep (default all).
        spacing_factor: > 1 re-plans each configuration at this factor times its spacing with ``planner``.
        planner: an nnU-Net ``ExperimentPlanner`` of the dataset (needed when ``spacing_factor != 1``).

    Raises:
        UserInputError: for a non-positive factor or batch size, or an unknown configuration.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if features_scale <= 0:
        raise UserInputError(f"--features-scale must be positive, got {features_scale}")
    if batch_size is not None and batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")
    pm = PlansManager(copy.deepcopy(plans))
    names = list(configurations) if configurations else pm.available_configurations
    out = copy.deepcopy(plans)
    out["plans_name"] = new_plans_name
    out["configurations"] = {}
    for c in names:
        if c not in pm.available_configurations:
            raise UserInputError(f"configuration {c!r} not in plans; available: {pm.available_configurations}")
        cfg = copy.deepcopy(pm.get_configuration(c).configuration)
        cfg.pop("inherits_from", None)
        if spacing_factor != 1.0:
            cfg = _replan(planner, cfg, spacing_factor, f"{new_plans_name}_{c}")
        kwargs = cfg["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = [max(min_features, int(round(f * features_scale)))
                                        for f in kwargs["features_per_stage"]]
        if batch_size is not None:
            cfg["batch_size"] = int(batch_size)
        out["configurations"][c] = cfg
    return out


def _replan(planner, cfg: dict, spacing_factor: float, data_identifier: str) -> dict:
    """nnU-Net's planning of one configuration at ``spacing_factor`` times its spacing (images shrink alike)."""
    import numpy as np
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    spacing = np.array(cfg["spacing"], dtype=float) * spacing_factor
    median_shape = np.maximum(1, np.round(np.array(cfg["median_image_size_in_voxels"]) / spacing_factor))
    n_voxels = float(np.prod(median_shape) * planner.dataset_json["numTraining"])
    new = planner.get_plans_for_configuration(spacing, median_shape, data_identifier, n_voxels, {})
    new["batch_dice"] = cfg.get("batch_dice", new.get("batch_dice", True))
    recursive_fix_for_json_export(new)  # numpy scalars -> Python, as nnU-Net does before saving plans
    return new


def make_cpu_plans(dataset: str | int, source_plans: str = "nnUNetPlans", target_plans: str = "nnUNetPlans_cpu",
                   features_scale: float = 0.25, batch_size: Optional[int] = None,
                   configurations: Optional[Sequence[str]] = None, force: bool = False,
                   spacing_factor: float = 1.0) -> str:
    """Write ``$nnUNet_preprocessed/DatasetXXX/<target_plans>.json`` from ``<source_plans>.json``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    name = dataset_name(dataset)
    base = os.path.join(require_env("nnUNet_preprocessed"), name)
    src = os.path.join(base, source_plans + ".json")
    dst = os.path.join(base, target_plans + ".json")
    if not os.path.isfile(src):
        raise UserInputError(f"no plans {src}: run nnUNetv2_plan_and_preprocess -d {name} first")
    if src == dst:
        raise UserInputError("the target plans name must differ from the source plans")
    if os.path.isfile(dst) and not force:
        raise UserInputError(f"{dst} exists; use --force to replace it")
    planner = None
    if spacing_factor != 1.0:
        if spacing_factor <= 0:
            raise UserInputError(f"--spacing-factor must be positive, got {spacing_factor}")
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

        require_env("nnUNet_raw")
        planner = ExperimentPlanner(name, plans_name=target_plans)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for the common CPU setting 0
    saved = os.environ.pop("nnUNet_n_proc_DA", None) if os.environ.get("nnUNet_n_proc_DA") == "0" else None
    try:
        plans = scale_plans(load_json(src), features_scale, batch_size, target_plans, configurations=configurations,
                            spacing_factor=spacing_factor, planner=planner)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    atomic_write_json(plans, dst)
    print(f"wrote {dst} (features x{features_scale}" + (f", batch size {batch_size}" if batch_size else "") +
          (f", spacing x{spacing_factor}" if spacing_factor != 1.0 else "") + f"); train with -p {target_plans}")
    if spacing_factor != 1.0:
        print(f"the coarser configurations need their own data: nnUNetv2_preprocess -d {name} -plans_name "
              f"{target_plans} -c {' '.join(configurations or [])}".rstrip())
    return dst


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="nnssl_make_cpu_plans",
                                     description="Write a CPU-scale plans variant (smaller network, same "
                                                 "preprocessed data) for use with nnUNetv2_train -p.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-p", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", default="nnUNetPlans_cpu", help="new plans identifier (default nnUNetPlans_cpu)")
    parser.add_argument("-c", nargs="+", default=None, help="configurations to keep (default all)")
    parser.add_argument("--features-scale", type=float, default=0.25, help="factor on features per stage (0.25)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: keep the plans')")
    parser.add_argument("--spacing-factor", type=float, default=1.0,
                        help="re-plan at this factor times the spacing (needs nnUNetv2_preprocess afterwards)")
    parser.add_argument("--force", action="store_true", help="replace an existing plans file")
    args = parser.parse_args(argv)
    run_command(lambda: make_cpu_plans(args.d, args.p, args.o, args.features_scale, args.batch_size, args.c,
                                       args.force, args.spacing_factor))


if __name__ == "__main__":
    main()
