"""Stored pseudo-labels of the unlabeled pool (offline self-training): layout, manifest, checks, compute cost.

``nnssl_pseudolabel`` (:mod:`nnssl.commands.pseudolabel`) writes, and ``nnSSL_SelfTrainingTrainer``
(:mod:`nnssl.trainers.self_training`) reads, one *store* per teacher beside the unlabeled data:

    $nnUNet_preprocessed/DatasetXXX/unlabeled/<data_identifier>/pseudo_labels/<tag>/
        nnssl_pseudo_labels.json        the manifest (below)
        <case>_pl.npy                   hard pseudo-label, int16 (C-order, the preprocessed image's spatial shape)
        <case>_conf.npy                 confidence = max class probability of the teacher, float16

at the preprocessed resolution (nothing is resampled). ``<tag>`` is
``<teacher trainer>__<plans>__<configuration>__fold_<f>[_<f>...]`` (plus ``__<checkpoint name>`` for another
checkpoint than ``checkpoint_final.pth``).

Manifest (``nnssl_pseudo_labels.json``)::

    format               1
    dataset_name, data_identifier, configuration
    preprocessing_fingerprint   of the plans the data was preprocessed with (nnssl.data.layout)
    teacher              {trainer, plans, configuration, folds, checkpoint, model_folder, mirroring,
                          training_cases: {fold: [labeled cases it trained on]},
                          training_seconds: {fold: summed epoch durations of its checkpoint log},
                          earlier_rounds_seconds: {fold: the cost of the pseudo-labels a self-trained teacher
                                                   learned from (its checkpoint's), all earlier rounds}}
    created, completed   ISO dates (completed is null until every case is written)
    complete             true once every expected case is written
    expected_cases       {case: "unlabeled" | "hidden_label"}
    cases                {case: {"source": ..., "shape": [...]}}   only cases whose two files are fully written
    prediction_seconds   wall seconds of the prediction pass(es) that wrote the cases (summed over resumed runs)

A case is valid only once it is listed under ``cases`` (its files are written to temporary names and renamed
first), and a store is used only when ``complete``: an interrupted run never leaves a store that looks done, and
the next run writes only what is missing.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnssl.data.layout import (PSEUDO_LABEL_FOLDER, PSEUDO_LABEL_MANIFEST, preprocessing_fingerprint,
                               unlabeled_preprocessed_folder)
from nnssl.utils import atomic_write_json, load_json_or_none

FORMAT = 1
# the confidence that reaches the augmentation is quantised to 1 / CONFIDENCE_LEVELS (see confidence_levels)
CONFIDENCE_LEVELS = 20


# ---------------------------------------------------------------------------------------------- pure maths
def confidence_levels(confidence: np.ndarray, levels: int = CONFIDENCE_LEVELS) -> np.ndarray:
    """Confidence in [0, 1] as integer levels ``round(confidence * levels)`` (int16).

    nnU-Net's spatial augmentation resamples segmentation channels label by label (a majority vote of the
    neighbours per level), so the confidence travels through it as a small label map: 21 levels keep it cheap.
    """
    return np.clip(np.rint(np.asarray(confidence, dtype=np.float32) * levels), 0, levels).astype(np.int16)


def confidence_weight(levels, threshold: float, weighted: bool = True, num_levels: int = CONFIDENCE_LEVELS):
    """Per-voxel weight of the pseudo-labeled term from quantised confidence levels (tensor or array).

    ``w = c * [c >= threshold]`` with ``c = levels / num_levels`` (``weighted``), or ``[c >= threshold]``;
    padded voxels (level 0 after nnU-Net's ``RemoveLabelTansform``) weigh 0.
    """
    c = levels / float(num_levels)
    keep = c >= threshold - 1e-6
    return c * keep if weighted else keep * 1.0


# ---------------------------------------------------------------------------------------------- layout
def store_tag(trainer: str, plans: str, configuration: str, folds: Sequence, checkpoint: str) -> str:
    tag = f"{trainer}__{plans}__{configuration}__fold_{'_'.join(str(f) for f in folds)}"
    if checkpoint != "checkpoint_final.pth":
        tag += "__" + os.path.splitext(checkpoint)[0]
    return tag


def stores_folder(preprocessed_base: str, data_identifier: str) -> str:
    """``unlabeled/<data_identifier>/pseudo_labels/``: every store of one preprocessing."""
    return os.path.join(unlabeled_preprocessed_folder(preprocessed_base, data_identifier), PSEUDO_LABEL_FOLDER)


def case_files(folder: str, case: str) -> Tuple[str, str]:
    return os.path.join(folder, case + "_pl.npy"), os.path.join(folder, case + "_conf.npy")


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class PseudoLabelStore:
    """One teacher's pseudo-labels: a folder and its manifest (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest_path = os.path.join(folder, PSEUDO_LABEL_MANIFEST)
        self.manifest: Optional[dict] = load_json_or_none(self.manifest_path)
        self.lock = threading.Lock()  # writer threads list their cases one at a time

    @property
    def tag(self) -> str:
        return os.path.basename(self.folder)

    @property
    def complete(self) -> bool:
        return bool(self.manifest and self.manifest.get("complete"))

    def start(self, manifest: dict) -> None:
        """Begin a new store with ``manifest`` (no cases yet)."""
        os.makedirs(self.folder, exist_ok=True)
        self.manifest = {**manifest, "format": FORMAT, "created": now(), "completed": None, "complete": False,
                         "cases": {}, "prediction_seconds": 0.0}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.manifest, self.manifest_path)

    def write_case(self, case: str, pseudo_label: np.ndarray, confidence: np.ndarray, source: str) -> None:
        """Write one case's two files atomically (temporary names, fsync, rename), then list it in the manifest."""
        if pseudo_label.shape != confidence.shape:
            raise ValueError(f"case {case}: pseudo-label {pseudo_label.shape} and confidence {confidence.shape} "
                             f"differ in shape")
        for path, array in zip(case_files(self.folder, case),
                               (pseudo_label.astype(np.int16), confidence.astype(np.float16))):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        with self.lock:
            self.manifest["cases"][case] = {"source": source, "shape": [int(s) for s in pseudo_label.shape]}
            self.save()

    def finish(self) -> None:
        self.manifest["complete"] = set(self.manifest["cases"]) >= set(self.manifest["expected_cases"])
        self.manifest["completed"] = now() if self.manifest["complete"] else None
        self.save()

    def load_case(self, case: str, mmap: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(pseudo-label int16, confidence float16) of a listed case."""
        if case not in (self.manifest or {}).get("cases", {}):
            raise KeyError(f"case {case} has no pseudo-label in {self.folder}")
        pl, conf = case_files(self.folder, case)
        mode = "r" if mmap else None
        return np.load(pl, mmap_mode=mode), np.load(conf, mmap_mode=mode)


def list_stores(preprocessed_base: str, data_identifier: str) -> List[PseudoLabelStore]:
    folder = stores_folder(preprocessed_base, data_identifier)
    if not os.path.isdir(folder):
        return []
    stores = [PseudoLabelStore(os.path.join(folder, d)) for d in sorted(os.listdir(folder))]
    return [s for s in stores if s.manifest is not None]


# ---------------------------------------------------------------------------------------------- checks
def teacher_training_cases(manifest: dict) -> List[str]:
    """Every labeled case any of the teacher's folds trained on."""
    return sorted({c for cases in manifest["teacher"]["training_cases"].values() for c in cases})


def leak_problem(manifest: dict, fold: Union[int, str], val_cases: Sequence[str],
                 hidden_cases: Sequence[str]) -> Optional[str]:
    """Why ``manifest``'s pseudo-labels must not train ``fold`` (its teacher saw labels of this fold's validation
    or hidden-label cases), or None."""
    trained = set(teacher_training_cases(manifest))
    for what, cases in (("validation", val_cases), ("hidden-label (unlabeled)", hidden_cases)):
        seen = sorted(trained & set(cases))
        if seen:
            return (f"its teacher ({manifest['teacher']['trainer']}, fold(s) {manifest['teacher']['folds']}) was "
                    f"trained on the labels of {len(seen)} {what} case(s) of fold {fold} ({', '.join(seen[:5])})")
    return None


def nnssl_pseudolabel_command(dataset: str, configuration: str, fold, plans: str,
                              trainer: str = "<TEACHER_TRAINER>") -> str:
    return f"nnssl_pseudolabel -d {dataset} -c {configuration} -f {fold} -tr {trainer} -p {plans}"


def select_store(preprocessed_base: str, plans: dict, configuration: dict, configuration_name: str,
                 fold: Union[int, str], pool_cases: Sequence[str], val_cases: Sequence[str],
                 hidden_cases: Sequence[str], wanted: Optional[str] = None) -> PseudoLabelStore:
    """The store a self-training run of ``fold`` uses, after every check; an error naming the fix otherwise.

    Candidates are the complete stores of this preprocessing (same data identifier and fingerprint) whose
    teacher never saw labels of this fold's validation or hidden-label cases and which cover the whole pool.
    ``wanted`` (a tag or a folder) picks one; else the newest candidate (``completed``) is used.

    Raises:
        RuntimeError: no store, an incomplete one, other preprocessing, a teacher that saw this fold's
            validation labels, or missing cases; the message names the store and the command to run.
    """
    dataset = os.path.basename(preprocessed_base)
    data_identifier = configuration["data_identifier"]
    fingerprint = preprocessing_fingerprint(plans, configuration)
    plans_name = plans.get("plans_name")
    command = nnssl_pseudolabel_command(dataset, configuration_name, fold, plans_name)
    stores = list_stores(preprocessed_base, data_identifier)
    if wanted:
        folder = wanted if os.path.isdir(wanted) else os.path.join(stores_folder(preprocessed_base, data_identifier),
                                                                   wanted)
        store = PseudoLabelStore(folder)
        if store.manifest is None:
            raise RuntimeError(f"no pseudo-labels {wanted!r} (looked in {folder}); stores there: "
                               f"{', '.join(s.tag for s in stores) or 'none'}. Run {command}")
        stores = [store]
    if not stores:
        raise RuntimeError(
            f"no pseudo-labels for {dataset} {configuration_name} (plans {plans_name}) in "
            f"{stores_folder(preprocessed_base, data_identifier)}: train a teacher (e.g. nnUNetv2_train "
            f"{dataset} {configuration_name} {fold} -tr nnUNetTrainer -p {plans_name}), then run {command}")
    problems = []
    good = []
    for s in stores:
        m = s.manifest
        if m.get("preprocessing_fingerprint") != fingerprint:
            problems.append(f"{s.tag}: made from other preprocessing (fingerprint {m.get('preprocessing_fingerprint')}"
                            f" != {fingerprint} of {plans_name} {configuration_name}); rerun nnssl_pseudolabel with "
                            f"--overwrite after preprocessing with these plans")
            continue
        if not s.complete:
            problems.append(f"{s.tag}: incomplete ({len(m.get('cases', {}))} of {len(m.get('expected_cases', {}))} "
                            f"cases written; an interrupted run?); rerun the same nnssl_pseudolabel command "
                            f"(-tr {m['teacher']['trainer']} -f {' '.join(map(str, m['teacher']['folds']))}) to "
                            f"complete it")
            continue
        leak = leak_problem(m, fold, val_cases, hidden_cases)
        if leak:
            problems.append(f"{s.tag}: {leak}; pseudo-label with a teacher trained on fold {fold} only: "
                            + nnssl_pseudolabel_command(dataset, configuration_name, fold, plans_name,
                                                        m["teacher"]["trainer"]))
            continue
        missing = sorted(set(pool_cases) - set(m["cases"]))
        if missing:
            problems.append(f"{s.tag}: no pseudo-labels for {len(missing)} case(s) of fold {fold}'s unlabeled pool "
                            f"({', '.join(missing[:5])}); run {command}")
            continue
        good.append(s)
    if not good:
        raise RuntimeError(f"no usable pseudo-labels for fold {fold} of {dataset} {configuration_name}:\n  "
                           + "\n  ".join(problems))
    return max(good, key=lambda s: s.manifest.get("completed") or "")


# ---------------------------------------------------------------------------------------------- compute
def epochs_seconds(log: dict) -> float:
    """The summed durations of a checkpoint log's epochs (as ``benchmarks/run.py`` counts a run's training)."""
    return float(sum(e - s for s, e in zip(log.get("epoch_start_timestamps", []),
                                           log.get("epoch_end_timestamps", []))))


def teacher_cost(manifest: dict) -> Dict[str, float]:
    """The compute a self-training row owes beyond its own training: the teacher's training (every fold of an
    ensemble), the prediction pass over the pool, and for a self-trained teacher (round 2 on) the cost of the
    rounds before it, in seconds.

    Args:
        manifest: a store's manifest, or the :func:`identity` a student's checkpoint keeps.

    Returns:
        ``{"seconds": total, "teacher_training_seconds": ..., "prediction_seconds": ...,
        "earlier_rounds_seconds": ..., "teacher_folds": n}``.
    """
    training = float(sum(manifest["teacher"].get("training_seconds", {}).values()))
    earlier = float(sum(manifest["teacher"].get("earlier_rounds_seconds", {}).values()))
    prediction = float(manifest.get("prediction_seconds", 0.0))
    return {"seconds": training + prediction + earlier, "teacher_training_seconds": training,
            "prediction_seconds": prediction, "earlier_rounds_seconds": earlier,
            "teacher_folds": len(manifest["teacher"]["folds"])}


def identity(manifest: dict, folder: str) -> dict:
    """What a self-trained model records about its pseudo-labels (checkpoint, debug.json): the store, its
    teacher and its cost; :func:`teacher_cost` reads this back as well (it holds ``teacher`` and
    ``prediction_seconds``)."""
    return {"folder": folder, "tag": os.path.basename(folder),
            "teacher": {k: v for k, v in manifest["teacher"].items() if k != "training_cases"},
            "preprocessing_fingerprint": manifest["preprocessing_fingerprint"],
            "created": manifest.get("created"), "completed": manifest.get("completed"),
            "num_cases": len(manifest.get("cases", {})),
            "prediction_seconds": manifest.get("prediction_seconds", 0.0),
            "cost": teacher_cost(manifest)}


class PseudoLabeledPool:
    """An :class:`nnssl.data.unlabeled.UnlabeledPool` whose cases come with their stored pseudo-labels.

    ``load_case`` returns the image as the pool does and, as the segmentation, two channels (int16): the
    pseudo-label (-1 where nnU-Net's preprocessed segmentation is -1, i.e. outside the non-zero crop mask, exactly
    as nnU-Net's own labeled data) and the confidence as levels (:func:`confidence_levels`). nnU-Net's loader
    crops and augments both with the image; its ``RemoveLabelTansform`` turns -1 (also the padding) into 0, i.e.
    background and confidence 0. The real labels of hidden-label cases are read only for that -1 mask.
    """

    provides_pseudo_labels = True

    def __init__(self, pool, store: PseudoLabelStore):
        self.pool = pool
        self.store = store
        self.identifiers = list(pool.identifiers)

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        data, seg, _, properties = self.pool.load_case(identifier)
        pl, conf = self.store.load_case(identifier, mmap=True)
        outside = np.asarray(seg[0]) < 0
        if outside.shape != pl.shape:
            raise RuntimeError(f"case {identifier}: pseudo-label shape {pl.shape} != preprocessed image "
                               f"{outside.shape} ({self.store.folder} is stale: rerun nnssl_pseudolabel --overwrite)")
        target = np.stack([np.where(outside, -1, pl).astype(np.int16), confidence_levels(conf)])
        return data, target, None, properties

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)
