"""The benchmark's datasets: how each release becomes an nnU-Net raw dataset, its fixed test list, its splits.

``DATASETS`` maps ``run.py --dataset`` to an adapter. Every adapter works in a
:class:`nnssl.workflow.Workspace` (the benchmark's own nnU-Net folders) and knows

- ``convert``: the release in ``../shared/data`` (``NNSSL_SHARED_DATA``) as a raw dataset (Hippocampus with
  ``nnUNetv2_convert_MSD_dataset``, HC18 with :func:`nnssl.dataset_conversion.hc18.convert_hc18`); ``quick`` a
  subset of it;
- ``test_cases``: the committed, seeded test list ``benchmarks/splits/<dataset>_test.txt`` (drawn once:
  Hippocampus 40 cases, HC18 20 % of the mothers), which no training or model selection sees;
- ``make_splits``: ``splits_final.json`` of the other cases (``N_FOLDS`` folds, the labeled share of each fold's
  training cases, HC18 grouped by mother), followed by the same folds with every training label visible (folds
  ``UPPER_FOLD_OFFSET`` + k: the upper bound).

ACDC is different: the literature's split is fixed (``splits_ssl4mis.json``: 70 training patients, 10 validation
patients, the labeled patients of its "3 cases" and "7 cases" settings) and its 20 test patients are not in
shared/. Its folds 0..4 are all the same split (a seed is a training seed, ``$nnssl_seed``), the validation
patients are nnU-Net's validation cases and the reported set, and ``--test-folder`` adds a held-out test set for
whoever has it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from nnssl.utils import UserInputError, atomic_write_json, load_json_or_none  # noqa: E402
from nnssl.workflow import Workspace  # noqa: E402

SHARED_DATA = os.environ.get("NNSSL_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
N_FOLDS = 5
UPPER_FOLD_OFFSET = N_FOLDS
TEST_SEED = 20261127  # the committed test lists' draw
SPLIT_SEED = 12345


@dataclass(frozen=True, kw_only=True)
class BenchmarkDataset:
    """A dataset of the benchmark; subclasses convert its release and draw its test cases."""

    key: str  # run.py's --dataset
    id: int
    name: str  # nnU-Net's DatasetXXX_Name
    source: str  # the release's folder in SHARED_DATA
    configuration: str
    spacing_factor: float  # of the CPU plans (nnssl_make_cpu_plans --spacing-factor)
    batch_size: int  # of the CPU plans
    group_regex: Optional[str] = None  # cases of one subject stay on one side of every split
    head_circumference = False  # evaluated with nnssl_evaluate --hc (HC18)
    fixed_split = False  # True: the literature's split; the validation cases are the reported set (ACDC)

    def setting_name(self, labeled: str) -> str:
        """The results file's suffix for ``--labeled``: ``10pct`` for 10 %, ``8cases`` for 8."""
        return labeled.replace("%", "pct") if labeled.endswith("%") else f"{labeled}cases"

    def check_labeled(self, labeled: str) -> None:
        """A clear error for a ``--labeled`` this dataset has no setting for (before anything is written)."""
        from nnssl.preprocessing.splits import parse_amount

        parse_amount(labeled, "--labeled")

    @property
    def dimensionality(self) -> str:
        """"2d" or "3d": which nnssl trainers apply (:func:`nnssl.trainers.registry.trainer_names`)."""
        return "2d" if self.configuration == "2d" else "3d"

    def source_folder(self) -> str:
        src = os.path.join(SHARED_DATA, self.source)
        if not os.path.isdir(src):
            raise UserInputError(f"{src} is missing: the {self.key} benchmark needs the real {self.source} release "
                                 f"there (or NNSSL_SHARED_DATA set to the folder that has it)")
        return src

    def convert(self, ws: Workspace, quick: bool) -> None:
        """Write ``<nnUNet_raw>/<name>`` from the release (``quick``: a subset)."""
        raise NotImplementedError

    def draw_test_cases(self, cases: Sequence[str], rng: np.random.RandomState, quick: bool) -> List[str]:
        """The held-out test cases among the labeled ``cases`` (``quick``: a small list)."""
        raise NotImplementedError

    def test_cases(self, ws: Workspace, quick: bool) -> List[str]:
        """The committed test list, made (and committed by the user) on the first full run; ``quick``: drawn from
        the subset, not written."""
        cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(ws.raw, self.name, "labelsTr")))
        path = os.path.join(HERE, "splits", f"{self.key}_test.txt")
        if not quick and os.path.isfile(path):
            listed = [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]
            missing = sorted(set(listed) - set(cases))
            if missing:
                raise UserInputError(f"{path} names cases that are not in {self.name}: {missing[:5]}; convert the "
                                     f"whole release again (delete {os.path.join(ws.raw, self.name)})")
            return listed
        test = self.draw_test_cases(cases, np.random.RandomState(TEST_SEED), quick)
        if not quick:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"# {self.key} benchmark test cases (seed {TEST_SEED}); never used for training or "
                        f"model selection\n" + "\n".join(test) + "\n")
        return test

    def reported_cases(self, ws: Workspace, quick: bool) -> List[str]:
        """The cases whose figures the results report: the held-out test list."""
        return self.test_cases(ws, quick)

    def make_splits(self, ws: Workspace, labeled: str, test_cases: Sequence[str], quick: bool = False) -> None:
        """``splits_final.json``: the semi-supervised folds, then the same folds with all training labels; kept
        while its recorded spec (``splits_final.json.benchmark.json``) is the same."""
        from nnssl.preprocessing.splits import labeled_case_ids, make_semi_supervised_splits

        spec = {"labeled": labeled, "folds": N_FOLDS, "seed": SPLIT_SEED, "exclude": list(test_cases),
                "group_regex": self.group_regex}
        out = os.path.join(ws.preprocessed, self.name, "splits_final.json")
        marker = out + ".benchmark.json"
        if load_json_or_none(marker) == spec and os.path.isfile(out):
            return
        with ws.environ():  # labeled_case_ids finds the dataset through nnU-Net's folder variables
            cases = labeled_case_ids(self.name)
        splits = make_semi_supervised_splits(cases, labeled, None, N_FOLDS, SPLIT_SEED, test_cases,
                                             self.group_regex)
        upper = [{"train": sorted(f["train"] + f["unlabeled"]), "val": f["val"], "unlabeled": []} for f in splits]
        atomic_write_json(splits + upper, out)
        atomic_write_json(spec, marker)
        print(f"[benchmark] split: fold 0 has {len(splits[0]['train'])} labeled, {len(splits[0]['unlabeled'])} "
              f"hidden-label, {len(splits[0]['val'])} validation cases; {len(test_cases)} test cases", flush=True)


@dataclass(frozen=True, kw_only=True)
class MSDDataset(BenchmarkDataset):
    """A Medical Segmentation Decathlon task; test cases drawn uniformly."""

    test_count: int
    quick_cases: int = 30
    quick_test_count: int = 6

    def convert(self, ws: Workspace, quick: bool) -> None:
        src = self.source_folder()
        if quick:
            src = self._subset(src, os.path.join(ws.root, self.source))
        ws.run(["nnUNetv2_convert_MSD_dataset", "-i", src, "-overwrite_id", self.id, "-np", 2], "convert")

    def _subset(self, src: str, sub: str) -> str:
        """A copy of the release with its first ``quick_cases`` training cases (links to the files)."""
        shutil.rmtree(sub, ignore_errors=True)
        dj = json.load(open(os.path.join(src, "dataset.json")))
        dj["training"] = dj["training"][:self.quick_cases]
        dj["numTraining"] = self.quick_cases
        for d in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(sub, d))
        for case in dj["training"]:
            for key, d in (("image", "imagesTr"), ("label", "labelsTr")):
                name = os.path.basename(case[key])
                os.symlink(os.path.join(src, d, name), os.path.join(sub, d, name))
        with open(os.path.join(sub, "dataset.json"), "w") as f:
            json.dump(dj, f)
        return sub

    def draw_test_cases(self, cases: Sequence[str], rng: np.random.RandomState, quick: bool) -> List[str]:
        return sorted(rng.choice(cases, self.quick_test_count if quick else self.test_count, replace=False))


@dataclass(frozen=True, kw_only=True)
class HC18Dataset(BenchmarkDataset):
    """The HC18 fetal head circumference challenge (2D); test cases are all cases of a share of the mothers."""

    test_mother_fraction: float
    head_circumference = True

    def convert(self, ws: Workspace, quick: bool) -> None:
        from nnssl.dataset_conversion.hc18 import convert_hc18

        src = self.source_folder()
        files = sorted(f for f in os.listdir(os.path.join(src, "training_set")) if not f.endswith("_Annotation.png"))
        tests = sorted(os.listdir(os.path.join(src, "test_set")))
        print("[benchmark] converting HC18", flush=True)
        with ws.environ():  # convert_hc18 writes to $nnUNet_raw
            convert_hc18(src, self.id, training_files=files[:60] if quick else None,
                         test_files=tests[:10] if quick else None, num_processes=2, progress=False)

    def draw_test_cases(self, cases: Sequence[str], rng: np.random.RandomState, quick: bool) -> List[str]:
        from nnssl.dataset_conversion.hc18 import mother_id

        mothers = sorted({mother_id(c) for c in cases})
        chosen = set(rng.choice(mothers, int(round(self.test_mother_fraction * len(mothers))), replace=False))
        return sorted(c for c in cases if mother_id(c) in chosen)


@dataclass(frozen=True, kw_only=True)
class ACDCDataset(BenchmarkDataset):
    """ACDC with the semi-supervised literature's fixed split (``splits_ssl4mis.json``); see the module docstring."""

    fixed_split = True
    quick_unlabeled: int = 4  # --quick: the labeled patients, this many unlabeled and 2 validation patients

    def split_file(self) -> dict:
        path = os.path.join(self.source_folder(), "splits_ssl4mis.json")
        if not os.path.isfile(path):
            raise UserInputError(f"{path} is missing: the ACDC benchmark needs the literature's split file")
        return json.load(open(path))

    def settings(self) -> List[str]:
        return sorted(self.split_file()["labeled_patients"], key=int)

    def check_labeled(self, labeled: str) -> None:
        if labeled not in self.settings():
            raise UserInputError(f"ACDC has no setting --labeled {labeled!r}: its settings are the literature's "
                                 f"{' and '.join(self.settings())} labeled patients (e.g. --labeled 7)")

    def patients(self, quick: bool, labeled: Optional[str] = None) -> tuple:
        """(labeled, unlabeled, validation) patients; ``quick``: a small subset (3-case labeled patients)."""
        split = self.split_file()
        lab = split["labeled_patients"][labeled or "3"]
        unl = [p for p in split["train_patients"] if p not in lab]
        val = list(split["val_patients"])
        if quick:
            unl, val = unl[:self.quick_unlabeled], val[:2]
        return lab, unl, val

    def convert(self, ws: Workspace, quick: bool) -> None:
        """``Dataset027_ACDC`` with links to the release's files (every patient, or the quick subset)."""
        src = self.source_folder()
        split = self.split_file()
        if quick:
            lab, unl, val = self.patients(True)
            keep = set(split["labeled_patients"]["7"]) | set(unl) | set(val)
        else:
            keep = set(split["train_patients"]) | set(split["val_patients"])
        out = os.path.join(ws.raw, self.name)
        tmp = out + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for d in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(tmp, d))
        n = 0
        for f in sorted(os.listdir(os.path.join(src, "labelsTr"))):
            if not f.endswith(".nii.gz") or f.split("_")[0] not in keep:
                continue
            case = f[:-len(".nii.gz")]
            os.symlink(os.path.join(src, "labelsTr", f), os.path.join(tmp, "labelsTr", f))
            os.symlink(os.path.join(src, "imagesTr", case + "_0000.nii.gz"),
                       os.path.join(tmp, "imagesTr", case + "_0000.nii.gz"))
            n += 1
        dj = json.load(open(os.path.join(src, "dataset.json")))
        dj.update(numTraining=n, file_ending=".nii.gz")
        with open(os.path.join(tmp, "dataset.json"), "w") as fh:
            json.dump(dj, fh, indent=2)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        print(f"[benchmark] ACDC: {n} frames of {len(keep)} patients linked into {out}", flush=True)

    def test_cases(self, ws: Workspace, quick: bool) -> List[str]:
        """No test cases in shared/ (the literature's 20 test patients are held out): see ``--test-folder``."""
        return []

    def reported_cases(self, ws: Workspace, quick: bool) -> List[str]:
        """The validation patients' frames: nnU-Net's validation cases and the reported set."""
        val = set(self.patients(quick)[2])
        return sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(ws.raw, self.name, "labelsTr"))
                      if f.split("_")[0] in val)

    def make_splits(self, ws: Workspace, labeled: str, test_cases: Sequence[str], quick: bool = False) -> None:
        """Folds 0..N_FOLDS-1: the literature's split (all the same; fold k is trained with seed k); folds
        UPPER_FOLD_OFFSET + k: every training patient labeled."""
        from nnssl.preprocessing.splits import labeled_case_ids, make_semi_supervised_splits

        self.check_labeled(labeled)
        lab, unl, val = self.patients(quick, labeled)
        spec = {"acdc_labeled_patients": lab, "val_patients": val, "unlabeled_patients": unl, "folds": N_FOLDS,
                "group_regex": self.group_regex}
        out = os.path.join(ws.preprocessed, self.name, "splits_final.json")
        marker = out + ".benchmark.json"
        if load_json_or_none(marker) == spec and os.path.isfile(out):
            return
        with ws.environ():
            cases = labeled_case_ids(self.name)
        present = {c.split("_")[0] for c in cases}
        exclude = sorted(c for c in cases if c.split("_")[0] not in set(lab) | set(unl) | set(val))
        missing = sorted((set(lab) | set(unl) | set(val)) - present)
        if missing:
            raise UserInputError(f"{self.name} lacks patients of the split: {missing[:5]}; convert again (delete "
                                 f"{os.path.join(ws.raw, self.name)} and the preprocessed folder)")
        splits = make_semi_supervised_splits(cases, None, None, N_FOLDS, SPLIT_SEED, exclude, self.group_regex,
                                             labeled_cases=lab, val_cases=val)
        upper = [{"train": sorted(f["train"] + f["unlabeled"]), "val": f["val"], "unlabeled": []} for f in splits]
        atomic_write_json(splits + upper, out)
        atomic_write_json(spec, marker)
        print(f"[benchmark] split: {len(splits[0]['train'])} labeled frames ({len(lab)} patients), "
              f"{len(splits[0]['unlabeled'])} hidden-label, {len(splits[0]['val'])} validation frames", flush=True)


DATASETS = {
    "hippocampus": MSDDataset(key="hippocampus", id=4, name="Dataset004_Hippocampus", source="Task04_Hippocampus",
                              configuration="3d_fullres", spacing_factor=1.0, batch_size=4, test_count=40),
    "hc18": HC18Dataset(key="hc18", id=18, name="Dataset018_HC18", source="HC18", configuration="2d",
                        spacing_factor=4.0, batch_size=8, group_regex=r"hc18_(\d+)_", test_mother_fraction=0.2),
    "acdc": ACDCDataset(key="acdc", id=27, name="Dataset027_ACDC", source="ACDC", configuration="2d",
                        spacing_factor=2.0, batch_size=8, group_regex=r"(patient\d+)_"),
}


def copy_test_set(ws: Workspace, ds: BenchmarkDataset, cases: Sequence[str], folder: str) -> None:
    """The test cases' images and labels in ``folder``/images and ``folder``/labels (made again when the list
    changed), for ``nnUNetv2_predict`` and ``nnssl_evaluate``."""
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    if os.path.isdir(labels) and len(os.listdir(labels)) == len(cases):
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(images)
    os.makedirs(labels)
    raw = os.path.join(ws.raw, ds.name)
    for c in cases:
        shutil.copy(os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz"), images)
        shutil.copy(os.path.join(raw, "labelsTr", f"{c}.nii.gz"), labels)


def check_test_folder(folder: str, dataset_json: dict) -> tuple:
    """``(images, labels)`` folders of a ``--test-folder`` (``imagesTr``-style images ``CASE_XXXX<ending>`` and
    ``labelsTr``), after checking that every case has all its channels and its label, and that every label holds
    only the dataset's label values; a clear :class:`UserInputError` otherwise."""
    import SimpleITK as sitk

    ending = dataset_json["file_ending"]
    images, labels = os.path.join(folder, "imagesTr"), os.path.join(folder, "labelsTr")
    for d in (images, labels):
        if not os.path.isdir(d):
            raise UserInputError(f"--test-folder {folder}: {os.path.basename(d)}/ is missing (the folder needs "
                                 f"imagesTr/CASE_0000{ending} images and labelsTr/CASE{ending} labels)")
    channels = [f"_{int(c):04d}" for c in dataset_json.get("channel_names", dataset_json.get("modality", {}))]
    label_cases = sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending))
    image_files = {f for f in os.listdir(images) if f.endswith(ending)}
    image_cases = sorted({f[:-len(ending) - 5] for f in image_files})
    if not label_cases:
        raise UserInputError(f"--test-folder {folder}: labelsTr/ has no *{ending} file")
    no_label = sorted(set(image_cases) - set(label_cases))
    no_image = sorted(c for c in label_cases if any(c + ch + ending not in image_files for ch in channels))
    if no_label or no_image:
        raise UserInputError(f"--test-folder {folder}: "
                             + (f"images without a label in labelsTr/: {no_label[:5]}; " if no_label else "")
                             + (f"labels without all their image channels ({', '.join(channels)}) in imagesTr/: "
                                f"{no_image[:5]}; " if no_image else "")
                             + "every case needs both")
    allowed = {int(v) for v in dataset_json["labels"].values() if not isinstance(v, (list, tuple))}
    for c in label_cases:
        values = {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels, c + ending))))}
        if not values <= allowed:
            raise UserInputError(f"--test-folder {folder}: label {c}{ending} has values {sorted(values - allowed)} "
                                 f"that the dataset does not have (its labels are {sorted(allowed)})")
    return images, labels
