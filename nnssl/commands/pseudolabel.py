"""``nnssl_pseudolabel``: pseudo-label a dataset's unlabeled pool with any trained nnU-Net model (offline
self-training, step 1 of 2; step 2 is ``nnUNetv2_train ... -tr nnSSL_SelfTrainingTrainer``).

    nnssl_pseudolabel -d ID -c CONFIG -f FOLDS... -tr TRAINER [-p PLANS] [-chk CHECKPOINT] [--disable-tta]
                      [-np N] [--overwrite] [-device DEVICE]

The pool is every image of ``nnssl_preprocess_unlabeled`` for the configuration plus, where
``splits_final.json`` has them, the hidden-label cases (key ``unlabeled``) of the teacher's folds; a validation
case of those folds is never in it. Each case is predicted from its *preprocessed* data with nnU-Net's own
predictor (``nnUNetPredictor.predict_logits_from_preprocessed_data``: sliding window, Gaussian weighting,
mirroring unless ``--disable-tta``, several folds averaged as ``nnUNetv2_predict`` averages them) and stored at
the preprocessed resolution: the hard pseudo-label (argmax of the softmax, as nnU-Net exports) and the confidence
(max class probability). Layout, manifest and atomicity: :mod:`nnssl.data.pseudo_labels`. A case that fails is
reported by name after the others were written (exit code 2); rerunning writes only what is missing.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional, Sequence

from nnssl.data.layout import UNLABELED_MANIFEST, preprocessing_fingerprint, unlabeled_preprocessed_folder
from nnssl.data.pseudo_labels import PseudoLabelStore, epochs_seconds, store_tag, stores_folder
from nnssl.utils import UserInputError, dataset_name, load_json_or_none, require_env, run_command


def _fold(f: str):
    return f if f == "all" else int(f)


def pool_cases(preprocessed_base: str, data_identifier: str, folds: Sequence, splits: Optional[list]) -> Dict[str, str]:
    """``{case: "unlabeled" | "hidden_label"}``: every preprocessed unlabeled image of the configuration and the
    hidden-label cases of ``folds``, never a validation case of any of ``folds``."""
    cases: Dict[str, str] = {}
    manifest = load_json_or_none(os.path.join(unlabeled_preprocessed_folder(preprocessed_base, data_identifier),
                                              UNLABELED_MANIFEST))
    for c in sorted((manifest or {}).get("cases", {})):
        cases[c] = "unlabeled"
    val = set()
    for f in folds:
        if f == "all" or not splits or f >= len(splits):
            continue
        val |= set(splits[f].get("val", []))
        for c in splits[f].get("unlabeled", []):
            cases.setdefault(c, "hidden_label")
    return {c: s for c, s in sorted(cases.items()) if c not in val}


def _training_cases(preprocessed_base: str, data_identifier: str, fold, splits: Optional[list], dataset_class
                    ) -> List[str]:
    """The labeled cases nnU-Net's ``do_split`` gives the teacher's fold (``all``: every preprocessed case)."""
    if fold == "all":
        return sorted(dataset_class.get_identifiers(os.path.join(preprocessed_base, data_identifier)))
    if not splits or fold >= len(splits):
        raise UserInputError(f"fold {fold} is not in {preprocessed_base}/splits_final.json, so which cases the "
                             f"teacher trained on is unknown; pseudo-label with the split the teacher was trained on")
    return sorted(splits[fold]["train"])


def _checkpoint(model_folder: str, fold, checkpoint: str) -> dict:
    import torch

    path = os.path.join(model_folder, f"fold_{fold}", checkpoint)
    if not os.path.isfile(path):
        present = sorted(d for d in os.listdir(model_folder) if d.startswith("fold_")) if os.path.isdir(
            model_folder) else []
        with_ckpt = [d for d in present if os.path.isfile(os.path.join(model_folder, d, checkpoint))]
        raise UserInputError(f"teacher checkpoint {path} does not exist (folds with {checkpoint}: "
                             f"{', '.join(with_ckpt) or 'none'}); train that fold first or pass the folds/checkpoint "
                             f"(-f, -chk) that exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def pseudolabel(dataset, configuration: str, folds: Sequence, trainer: str, plans_identifier: str = "nnUNetPlans",
                checkpoint: str = "checkpoint_final.pth", use_mirroring: bool = True, num_processes: int = 1,
                overwrite: bool = False, device: Optional[str] = None, progress: bool = True) -> str:
    """Pseudo-label the pool (see the module docstring); returns the store's folder.

    Raises:
        UserInputError: naming what is wrong and the fix (missing teacher checkpoint or fold, a teacher of other
            plans or configuration, an empty pool, a store from other preprocessing, failed cases).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnssl.commands.trainer_path import ext_trainer_value
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))  # nnssl teachers
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folds = [_fold(str(f)) for f in folds]
    name = dataset_name(dataset)
    base = os.path.join(require_env("nnUNet_preprocessed"), name)
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UserInputError(f"no plans {plans_file}: run nnUNetv2_plan_and_preprocess -d {name} first")
    plans = load_json(plans_file)
    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise UserInputError(f"configuration {configuration!r} is not in {plans_file}; available: "
                             f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    fingerprint = preprocessing_fingerprint(plans, cm.configuration)
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    label_manager = pm.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise UserInputError(f"{name} is region-based; nnssl_pseudolabel stores hard labels of softmax models only")

    splits = load_json_or_none(os.path.join(base, "splits_final.json"))
    unlabeled_manifest = load_json_or_none(os.path.join(unlabeled_preprocessed_folder(base, cm.data_identifier),
                                                        UNLABELED_MANIFEST))
    if unlabeled_manifest and unlabeled_manifest.get("preprocessing_fingerprint") != fingerprint:
        raise UserInputError(f"the unlabeled images of {name} {configuration} were preprocessed with other plans "
                             f"({unlabeled_manifest.get('plans_name')}); run nnssl_preprocess_unlabeled -d {name} -c "
                             f"{configuration} -p {plans_identifier} --overwrite")
    expected = pool_cases(base, cm.data_identifier, folds, splits)
    if not expected:
        raise UserInputError(
            f"the unlabeled pool of {name} {configuration} is empty: no image of nnssl_preprocess_unlabeled in "
            f"{unlabeled_preprocessed_folder(base, cm.data_identifier)} and no hidden-label cases of fold(s) "
            f"{' '.join(map(str, folds))} in splits_final.json. Run nnssl_preprocess_unlabeled -d {name} -c "
            f"{configuration} -p {plans_identifier} and/or nnssl_make_split -d {name} --labeled N")

    # the teacher: its folder, checkpoints, plans and configuration
    model_folder = os.path.join(require_env("nnUNet_results"), name, f"{trainer}__{plans_identifier}__{configuration}")
    if not os.path.isdir(model_folder):
        raise UserInputError(f"no trained teacher {model_folder}: train it first (nnUNetv2_train {name} "
                             f"{configuration} FOLD -tr {trainer} -p {plans_identifier}) or check -tr/-p/-c")
    teacher_plans = load_json_or_none(os.path.join(model_folder, "plans.json")) or {}
    if configuration not in teacher_plans.get("configurations", {}) or preprocessing_fingerprint(
            teacher_plans, PlansManager(teacher_plans).get_configuration(configuration).configuration) != fingerprint:
        raise UserInputError(f"the teacher in {model_folder} was trained with other plans than {plans_file} now "
                             f"describes for {configuration} (other preprocessing); retrain the teacher, or "
                             f"re-preprocess with its plans")
    dataset_class = infer_dataset_class(os.path.join(base, cm.data_identifier))
    training_cases, training_seconds, earlier_rounds = {}, {}, {}
    for f in folds:
        ckpt = _checkpoint(model_folder, f, checkpoint)
        if ckpt.get("init_args", {}).get("configuration") != configuration:
            raise UserInputError(f"teacher fold {f} in {model_folder} was trained on configuration "
                                 f"{ckpt.get('init_args', {}).get('configuration')!r}, not {configuration!r}")
        training_cases[str(f)] = _training_cases(base, cm.data_identifier, f, splits, dataset_class)
        training_seconds[str(f)] = round(epochs_seconds(ckpt.get("logging", {})), 3)
        earlier = ((ckpt.get("nnssl") or {}).get("extra") or {}).get("pseudo_labels")  # a self-trained teacher
        if earlier:
            earlier_rounds[str(f)] = earlier["cost"]["seconds"]
        del ckpt

    tag = store_tag(trainer, plans_identifier, configuration, folds, checkpoint)
    store = PseudoLabelStore(os.path.join(stores_folder(base, cm.data_identifier), tag))
    teacher = {"trainer": trainer, "plans": plans_identifier, "configuration": configuration, "folds": folds,
               "checkpoint": checkpoint, "model_folder": os.path.abspath(model_folder), "mirroring": use_mirroring,
               "training_cases": training_cases, "training_seconds": training_seconds,
               "earlier_rounds_seconds": earlier_rounds}
    m = store.manifest
    if m is not None and not overwrite:
        if m.get("preprocessing_fingerprint") != fingerprint:
            raise UserInputError(f"{store.folder} holds pseudo-labels of other preprocessing (fingerprint "
                                 f"{m.get('preprocessing_fingerprint')} != {fingerprint}): rerun with --overwrite")
        if m["teacher"].get("mirroring") != use_mirroring or m["teacher"].get("training_seconds") != training_seconds:
            raise UserInputError(f"{store.folder} was made by another teacher run or other settings (mirroring, "
                                 f"retrained folds): rerun with --overwrite to replace it")
    if m is None or overwrite:
        if m is not None:
            import shutil
            shutil.rmtree(store.folder)
        store.start({"dataset_name": name, "data_identifier": cm.data_identifier, "configuration": configuration,
                     "preprocessing_fingerprint": fingerprint, "teacher": teacher, "expected_cases": expected})
    else:
        store.manifest["expected_cases"] = {**store.manifest.get("expected_cases", {}), **expected}
        store.manifest["teacher"] = teacher
    todo = [c for c in store.manifest["expected_cases"] if c not in store.manifest["cases"]]
    if len(todo) < len(store.manifest["expected_cases"]):
        print(f"{len(store.manifest['expected_cases']) - len(todo)} case(s) already pseudo-labeled in {store.folder}, "
              f"skipping them (--overwrite redoes them)")

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    errors = []
    if todo:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
        errors = _predict_cases(predictor, store, todo, base, cm.data_identifier, dataset_class, label_manager,
                                num_processes, progress)
    store.finish()
    print(f"{len(todo) - len(errors)} case(s) pseudo-labeled into {store.folder}"
          + (f", {len(errors)} failed" if errors else ""))
    if errors:
        raise UserInputError(f"{len(errors)} case(s) could not be pseudo-labeled (the others were written; the "
                             f"store stays incomplete until a rerun writes them):\n  " + "\n  ".join(errors))
    print(f"next: nnUNetv2_train {dataset} {configuration} FOLD -tr nnSSL_SelfTrainingTrainer -p {plans_identifier}")
    return store.folder


def _predict_cases(predictor, store: PseudoLabelStore, todo: List[str], base: str, data_identifier: str,
                   dataset_class, label_manager, num_processes: int, progress: bool) -> List[str]:
    import numpy as np
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    unlabeled = nnUNetDatasetBlosc2(unlabeled_preprocessed_folder(base, data_identifier),
                                    [c for c in todo if store.manifest["expected_cases"][c] == "unlabeled"])
    hidden = dataset_class(os.path.join(base, data_identifier),
                           [c for c in todo if store.manifest["expected_cases"][c] == "hidden_label"])
    errors: List[str] = []
    writer = ThreadPoolExecutor(max(1, num_processes))  # writing overlaps the next case's prediction
    pending = []  # (future, case), at most num_processes cases held in memory

    def collect(n_left: int) -> None:
        while len(pending) > n_left:
            future, case = pending.pop(0)
            try:
                future.result()
            except Exception as e:
                errors.append(f"case {case}: writing failed ({type(e).__name__}: {e})")

    started = time.monotonic()
    bar = tqdm(total=len(todo), desc="pseudo-labels", unit="case", disable=not progress)
    try:
        for case in todo:
            source = store.manifest["expected_cases"][case]
            try:
                data, _, _, _ = (unlabeled if source == "unlabeled" else hidden).load_case(case)
                data = torch.from_numpy(np.ascontiguousarray(np.asarray(data[:], dtype=np.float32)))
                with torch.no_grad():
                    logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
                    probabilities = label_manager.apply_inference_nonlin(logits)
                    hard = label_manager.convert_probabilities_to_segmentation(probabilities)
                    confidence = probabilities.max(0).values
                hard = hard.numpy() if torch.is_tensor(hard) else np.asarray(hard)
                if hard.shape != tuple(data.shape[1:]):
                    raise RuntimeError(f"prediction {hard.shape} != image {tuple(data.shape[1:])}")
                pending.append((writer.submit(store.write_case, case, hard, confidence.numpy(), source), case))
                collect(max(1, num_processes))
            except Exception as e:  # reported by name after the other cases were written
                errors.append(f"case {case}: {type(e).__name__}: {e}")
            bar.update(1)
        collect(0)
    finally:
        writer.shutdown(wait=True)
        bar.close()
        with store.lock:
            store.manifest["prediction_seconds"] = round(store.manifest.get("prediction_seconds", 0.0)
                                                         + time.monotonic() - started, 3)
            store.save()
    return errors


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_pseudolabel",
        description="Pseudo-label the unlabeled pool (nnssl_preprocess_unlabeled's images and the hidden-label "
                    "cases of the folds) with a trained nnU-Net model, at the preprocessed resolution, for "
                    "nnSSL_SelfTrainingTrainer.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", required=True, help="configuration of the teacher (and of the student)")
    parser.add_argument("-f", nargs="+", required=True, help="teacher folds (several: ensembled like nnUNetv2_predict)")
    parser.add_argument("-tr", required=True, help="the teacher's trainer (any nnU-Net or nnssl trainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    parser.add_argument("--disable-tta", "--disable_tta", action="store_true", dest="disable_tta",
                        help="no mirroring at test time (faster, slightly worse)")
    parser.add_argument("-np", type=int, default=1, help="threads writing cases (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace this teacher's stored pseudo-labels")
    parser.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run_command(lambda: pseudolabel(args.d, args.c, args.f, args.tr, args.p, args.chk, not args.disable_tta, args.np,
                                    args.overwrite, args.device, not args.no_progress))


if __name__ == "__main__":
    main()
