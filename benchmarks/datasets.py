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

    def make_splits(self, ws: Workspace, labeled: str, test_cases: Sequence[str]) -> None:
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


DATASETS = {
    "hippocampus": MSDDataset(key="hippocampus", id=4, name="Dataset004_Hippocampus", source="Task04_Hippocampus",
                              configuration="3d_fullres", spacing_factor=1.0, batch_size=4, test_count=40),
    "hc18": HC18Dataset(key="hc18", id=18, name="Dataset018_HC18", source="HC18", configuration="2d",
                        spacing_factor=4.0, batch_size=8, group_regex=r"hc18_(\d+)_", test_mother_fraction=0.2),
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
