"""A small synthetic 3D dataset in nnU-Net's raw format, for the demo and the tests.

Each image holds one elongated ellipsoid, randomly placed, sized and oriented, in noise with a smooth bias
field; its two halves along the long axis are labels 1 ("anterior") and 2 ("posterior"), loosely like the
hippocampus of MSD Task04. The halves differ only slightly in intensity, so telling them apart takes shape and
context, not a threshold. Written with SimpleITK as ``.nii.gz`` with 1 mm spacing.
"""

from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np


def synthetic_case(rng: np.random.RandomState, shape: Tuple[int, int, int] = (32, 32, 32)
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """One ``(image float32, label uint8)`` pair of ``shape``."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    centre = np.array([rng.uniform(0.35, 0.65) * s for s in shape], dtype=np.float32)
    radii = np.array([rng.uniform(0.25, 0.35), rng.uniform(0.12, 0.18), rng.uniform(0.12, 0.18)]) * min(shape)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # random orientation
    local = (grid - centre) @ q.astype(np.float32)
    inside = ((local / radii.astype(np.float32)) ** 2).sum(-1) <= 1.0
    label = np.zeros(shape, np.uint8)
    label[inside & (local[..., 0] < 0)] = 1
    label[inside & (local[..., 0] >= 0)] = 2
    bias = sum(rng.uniform(-0.3, 0.3) * (grid[..., d] / shape[d] - 0.5) for d in range(3))
    image = 1.0 + bias + 1.0 * (label == 1) + 1.25 * (label == 2) + rng.normal(0, 0.45, shape)
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, path, useCompression=True)


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "nnsslSynthetic",
                           n_labeled: int = 40, n_unlabeled: int = 20, n_test: int = 10,
                           shape: Tuple[int, int, int] = (32, 32, 32), seed: int = 0) -> str:
    """Write ``Dataset{id}_{name}`` with imagesTr/labelsTr, imagesUnlabeled and imagesTs/labelsTs.

    Returns:
        The dataset folder.
    """
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n_labeled):
        image, label = synthetic_case(rng, shape)
        _write(image, os.path.join(folder, "imagesTr", f"synth_{i:03d}_0000.nii.gz"))
        _write(label, os.path.join(folder, "labelsTr", f"synth_{i:03d}.nii.gz"))
    for i in range(n_unlabeled):
        image, _ = synthetic_case(rng, shape)
        _write(image, os.path.join(folder, "imagesUnlabeled", f"synthu_{i:03d}_0000.nii.gz"))
    for i in range(n_test):
        image, label = synthetic_case(rng, shape)
        _write(image, os.path.join(folder, "imagesTs", f"synthtest_{i:03d}_0000.nii.gz"))
        _write(label, os.path.join(folder, "labelsTs", f"synthtest_{i:03d}.nii.gz"))
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
                    "numTraining": n_labeled, "file_ending": ".nii.gz", "name": name,
                    "description": "nnssl synthetic demo data (two-part ellipsoids in noise)"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
