"""``nnssl_preprocess_unlabeled``: preprocess unlabeled images with a dataset's own nnU-Net plans.

Unlabeled images follow nnU-Net's channel naming (``case_0000.nii.gz``, ``case_0001.nii.gz``, ... with the
dataset's ``file_ending``) and live by default in ``$nnUNet_raw/DatasetXXX_Name/imagesUnlabeled``. They are
preprocessed exactly like nnU-Net's training images (same preprocessor class, normalisation, resampling and
transpose, from the plans) into ``$nnUNet_preprocessed/DatasetXXX_Name/unlabeled/<data_identifier>/``, a folder
nnU-Net's own cross-validation never sees.

That folder holds a manifest, ``nnssl_unlabeled.json``: the cases that were written completely, the plans they
were made with and a fingerprint of the preprocessing-relevant part of those plans. A case is valid only once it
is listed there, so an interrupted run never leaves a case that a trainer would mistake for good data; the next
run redoes it. Cases already listed are skipped unless ``--overwrite`` is given.

Each image is checked before it is written (:func:`nnssl.preprocessing.verify.inspect_file`: read to its end,
finite voxels, positive spacing, the dataset's dimensionality, channels on one grid). A case that fails is
neither written nor listed; the failures are reported together at the end, after every good case was written
(exit code 2), and a constant image is written with a warning. ``nnssl_verify_dataset`` runs the same checks on
the whole dataset, and also finds unlabeled images that are copies of validation or test images.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from nnssl.data.layout import (UNLABELED_MANIFEST, UNLABELED_RAW_FOLDER, preprocessing_fingerprint,
                               unlabeled_preprocessed_folder)
from nnssl.preprocessing.verify import ERROR, WARNING, check_same_grid, inspect_file, list_cases
from nnssl.utils import (UserInputError, atomic_write_json, dataset_name, load_json_or_none, require_env,
                         run_command)

MANIFEST_FLUSH_SECONDS = 1.0


class CaseError(Exception):
    """A problem with one unlabeled case (the message names the case)."""


def discover_cases(folder: str, file_ending: str, num_channels: int) -> Dict[str, List[str]]:
    """Map each case id to its channel files, checking nnU-Net's naming for every file first.

    Args:
        folder: folder with ``<case>_<XXXX><file_ending>`` files.
        file_ending: the dataset's file ending, e.g. ``.nii.gz``.
        num_channels: number of input channels in dataset.json (``channel_names``).

    Returns:
        ``{case_id: [file of channel 0, file of channel 1, ...]}`` sorted by case id.

    Raises:
        UserInputError: listing every problem found (missing folder, no images, wrong file ending, names without
            the 4-digit channel suffix, missing or unexpected channels).
    """
    if not os.path.isdir(folder):
        raise UserInputError(f"unlabeled image folder {folder} does not exist (put unlabeled images there with "
                             f"nnU-Net's naming case_0000{file_ending}, or give another folder with -i)")
    cases, problems = list_cases(folder, file_ending, num_channels)
    if not cases and not problems:
        raise UserInputError(f"unlabeled image folder {folder} contains no images ending in {file_ending}")
    if problems:
        raise UserInputError(f"{len(problems)} problem(s) in {folder}:\n  " +
                             "\n  ".join(f"{os.path.relpath(p.file, folder)}: {p.message}" for p in problems))
    return cases


def check_case(reader_writer, case: str, files: Sequence[str], expected_dim: Optional[int] = None) -> List[str]:
    """Read each channel of a case completely and check it (:func:`nnssl.preprocessing.verify.inspect_file`) and
    that all channels share one voxel grid.

    Returns:
        Warnings (``"case <case>: <file>: <problem>"``), e.g. a constant image.

    Raises:
        CaseError: naming every error found (a truncated or unreadable file, NaN or Inf voxels, a spacing that is
            not positive, another dimensionality than the dataset's, channels on different grids).
    """
    reports = [inspect_file(f, reader_writer, expected_dim) for f in files]
    problems = [p for r in reports for p in r.problems] + check_same_grid(reports)
    text = {severity: [f"{os.path.basename(p.file)}: {p.message}" for p in problems if p.severity == severity]
            for severity in (ERROR, WARNING)}
    if text[ERROR]:
        raise CaseError(f"case {case}: " + "; ".join(text[ERROR]))
    return [f"case {case}: {t}" for t in text[WARNING]]


def _dataset_dimensionality(preprocessed_base: str, reader_writer, file_ending: str) -> Optional[int]:
    """Dimensionality of the dataset's labeled images (from one of nnU-Net's ``gt_segmentations``), or None."""
    gt = os.path.join(preprocessed_base, "gt_segmentations")
    labels = sorted(f for f in os.listdir(gt) if f.endswith(file_ending)) if os.path.isdir(gt) else []
    return inspect_file(os.path.join(gt, labels[0]), reader_writer, is_label=True).dim if labels else None


def preprocess_case(case: str, files: List[str], output_folder: str, plans: dict, configuration: str,
                    dataset_json: dict, expected_dim: Optional[int] = None) -> Tuple[dict, List[str]]:
    """Check one unlabeled case (:func:`check_case`), preprocess it with nnU-Net's preprocessor of the
    configuration and save it (Blosc2); nothing is written for a case that fails its checks.

    The properties get an empty ``class_locations`` (nnU-Net's loader looks the key up for every crop).

    Returns:
        A manifest entry for the case, and the checks' warnings.

    Raises:
        CaseError: when the case fails its checks or preprocessing fails.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    warnings_found = check_case(pm.image_reader_writer_class(), case, files, expected_dim)
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        data, seg, properties = preprocessor.run_case(files, None, pm, cm, dataset_json)
    except Exception as e:
        raise CaseError(f"case {case}: cannot be read or preprocessed ({type(e).__name__}: {e})") from None
    properties["class_locations"] = {}
    data = data.astype("float32", copy=False)
    seg = seg.astype("int16", copy=False)  # the non-zero mask made by crop_to_nonzero (-1 outside, 0 inside)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    for leftover in (case + ".b2nd", case + "_seg.b2nd", case + ".pkl"):  # from an interrupted run
        if os.path.isfile(os.path.join(output_folder, leftover)):
            os.remove(os.path.join(output_folder, leftover))
    nnUNetDatasetBlosc2.save_case(data, seg, properties, os.path.join(output_folder, case), chunks=chunks,
                                  blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return ({"source_files": [os.path.abspath(f) for f in files], "shape": [int(i) for i in data.shape[1:]]},
            warnings_found)


def _preprocess_case_worker(args) -> tuple:
    case = args[0]
    try:
        return (case, *preprocess_case(*args), None)
    except CaseError as e:
        return case, None, [], str(e)


def _labeled_case_ids(preprocessed_base: str, dataset_json: dict) -> set:
    gt = os.path.join(preprocessed_base, "gt_segmentations")
    ending = dataset_json["file_ending"]
    if not os.path.isdir(gt):
        return set()
    return {f[:-len(ending)] for f in os.listdir(gt) if f.endswith(ending)}


def preprocess_unlabeled(dataset: str | int, configurations: Optional[Sequence[str]] = None,
                         input_folder: Optional[str] = None, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Preprocess a folder of unlabeled images for one or several configurations of a dataset's plans.

    Args:
        dataset: dataset id or name.
        configurations: plans configurations; default: those whose labeled data has been preprocessed.
        input_folder: default ``$nnUNet_raw/DatasetXXX_Name/imagesUnlabeled``.
        plans_identifier: plans file name without ``.json``.
        num_processes: worker processes (1 = in this process).
        overwrite: redo cases already done, and replace data made with other plans.
        progress: show a progress bar.

    Returns:
        ``{data_identifier: {"folder": ..., "done": n, "skipped": n, "failed": n}}``.

    Raises:
        UserInputError: for anything the user has to fix; bad cases are reported together at the end, after
            every good case has been written and recorded.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed_root = require_env("nnUNet_preprocessed")
    name = dataset_name(dataset)
    base = os.path.join(preprocessed_root, name)
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UserInputError(f"no plans {plans_file}: run nnUNetv2_plan_and_preprocess -d {name} first "
                             f"(nnssl uses the dataset's own plans for unlabeled images)")
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    pm = PlansManager(plans)
    available = pm.available_configurations
    if configurations is None:
        configurations = [c for c in available
                          if os.path.isdir(os.path.join(base, pm.get_configuration(c).data_identifier))]
        if not configurations:
            raise UserInputError(f"no configuration of {plans_identifier} has been preprocessed for {name}: run "
                                 f"nnUNetv2_plan_and_preprocess -d {name} -c <configuration> first, or pass -c")
    for c in configurations:
        if c not in available:
            raise UserInputError(f"configuration {c!r} is not in {plans_file}; available: {', '.join(available)}")

    if input_folder is None:
        input_folder = os.path.join(require_env("nnUNet_raw"), name, UNLABELED_RAW_FOLDER)
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    cases = discover_cases(input_folder, dataset_json["file_ending"], num_channels)
    clashes = sorted(set(cases) & _labeled_case_ids(base, dataset_json))
    if clashes:
        raise UserInputError(f"{len(clashes)} unlabeled case name(s) are also labeled training cases of {name} "
                             f"({', '.join(clashes[:5])}{', ...' if len(clashes) > 5 else ''}); rename them")

    expected_dim = _dataset_dimensionality(base, pm.image_reader_writer_class(), dataset_json["file_ending"])
    results = {}
    seen_identifiers = set()
    all_errors: List[str] = []
    for configuration in configurations:
        cm = pm.get_configuration(configuration)
        if cm.data_identifier in seen_identifiers:
            continue  # e.g. a CPU-scale configuration inheriting 3d_fullres: same preprocessed data
        seen_identifiers.add(cm.data_identifier)
        out = unlabeled_preprocessed_folder(base, cm.data_identifier)
        fingerprint = preprocessing_fingerprint(plans, cm.configuration)
        manifest = load_json_or_none(os.path.join(out, UNLABELED_MANIFEST))
        if manifest is not None and manifest.get("preprocessing_fingerprint") != fingerprint:
            if not overwrite:
                raise UserInputError(
                    f"{out} was preprocessed with other plans ({manifest.get('plans_name')}, fingerprint "
                    f"{manifest.get('preprocessing_fingerprint')} != {fingerprint}): rerun with --overwrite")
            manifest = None
        if manifest is None or overwrite:
            if os.path.isdir(out):
                shutil.rmtree(out)
            manifest = {"dataset_name": name, "plans_name": plans_identifier, "configuration": configuration,
                        "data_identifier": cm.data_identifier, "preprocessing_fingerprint": fingerprint,
                        "source_folder": os.path.abspath(input_folder), "cases": {}}
        os.makedirs(out, exist_ok=True)
        manifest_path = os.path.join(out, UNLABELED_MANIFEST)
        todo = [c for c in cases if c not in manifest["cases"]]
        skipped = len(cases) - len(todo)
        if skipped:
            print(f"{configuration}: {skipped} case(s) already preprocessed in {out}, skipping them "
                  f"(--overwrite redoes them)")
        jobs = [(c, cases[c], out, plans, configuration, dataset_json, expected_dim) for c in todo]
        errors = _run_jobs(jobs, num_processes, manifest, manifest_path, progress, desc=configuration)
        atomic_write_json(manifest, manifest_path)
        results[cm.data_identifier] = {"folder": out, "done": len(todo) - len(errors), "skipped": skipped,
                                       "failed": len(errors)}
        all_errors += [e for e in errors if e not in all_errors]  # a bad case fails in every configuration
        print(f"{configuration}: {len(todo) - len(errors)} case(s) preprocessed into {out}"
              + (f", {len(errors)} failed" if errors else ""))
    if all_errors:
        raise UserInputError(f"{len(all_errors)} unlabeled case(s) could not be preprocessed (the others were "
                             f"written):\n  " + "\n  ".join(all_errors))
    return results


def _run_jobs(jobs: list, num_processes: int, manifest: dict, manifest_path: str, progress: bool,
              desc: str) -> List[str]:
    from tqdm import tqdm

    errors: List[str] = []
    warnings_found: List[str] = []
    last_flush = time.monotonic()
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs, unit="case")

    def record(case, entry, case_warnings, error):
        nonlocal last_flush
        warnings_found.extend(case_warnings)
        if error is not None:
            errors.append(error)
        else:
            manifest["cases"][case] = entry
        bar.update(1)
        if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
            atomic_write_json(manifest, manifest_path)
            last_flush = time.monotonic()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                record(*_preprocess_case_worker(job))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_processes, len(jobs))) as pool:
                for result in pool.imap_unordered(_preprocess_case_worker, jobs):
                    record(*result)
    bar.close()
    for w in warnings_found:
        print(f"warning: {w}")
    return errors


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_preprocess_unlabeled",
        description="Preprocess unlabeled images with the dataset's own nnU-Net plans, into "
                    "$nnUNet_preprocessed/DatasetXXX/unlabeled/<data_identifier>/ (never part of nnU-Net's "
                    "cross-validation). Run nnUNetv2_plan_and_preprocess first.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", nargs="+", default=None,
                        help="configurations (default: every configuration whose labeled data is preprocessed)")
    parser.add_argument("-i", default=None,
                        help=f"folder of unlabeled images (default: $nnUNet_raw/DatasetXXX/{UNLABELED_RAW_FOLDER})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run_command(lambda: preprocess_unlabeled(args.d, args.c, args.i, args.p, args.np, args.overwrite,
                                             not args.no_progress))


if __name__ == "__main__":
    main()
