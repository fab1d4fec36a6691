"""The unlabeled image pool of a training run and the loader that draws patches from it.

The pool joins two kinds of preprocessed images, both made with the dataset's plans:

- training cases of the fold whose labels are hidden (``splits_final.json`` fold key ``unlabeled``), read from
  nnU-Net's labeled preprocessed folder;
- images preprocessed by ``nnssl_preprocess_unlabeled``, read from ``unlabeled/<data_identifier>/``.

The loader is nnU-Net's own ``nnUNetDataLoader`` (same cropping, same augmentation pipeline) without foreground
oversampling, and its batches carry ``data`` and ``keys`` only: the segmentation that nnU-Net's loader crops
alongside (real labels for hidden training cases, the non-zero mask otherwise) is dropped inside the loader, so
no label can reach any loss.
"""

from __future__ import annotations

from typing import Dict, Sequence

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class UnlabeledPool:
    """Several nnU-Net datasets (``nnUNetBaseDataset`` instances) addressed by one list of identifiers.

    Args:
        datasets: nnU-Net dataset objects, each restricted to the identifiers that belong to the pool.

    Raises:
        ValueError: if two datasets share an identifier (the pool could not tell them apart).
    """

    def __init__(self, datasets: Sequence):
        self._owner: Dict[str, object] = {}
        for ds in datasets:
            for identifier in ds.identifiers:
                if identifier in self._owner:
                    raise ValueError(f"unlabeled case {identifier} exists twice (in {ds.source_folder} and in "
                                     f"{self._owner[identifier].source_folder}); rename one of them")
                self._owner[identifier] = ds
        self.identifiers = sorted(self._owner)

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self._owner[identifier].load_case(identifier)
        properties.setdefault("class_locations", {})
        return data, seg, None, properties

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


class UnlabeledDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` over an :class:`UnlabeledPool`: random crops, batches of ``{'data', 'keys'}`` only.

    Args:
        pool: the unlabeled pool.
        batch_size: patches per batch.
        patch_size: crop size before spatial augmentation (nnU-Net's enlarged initial patch size).
        final_patch_size: patch size after augmentation.
        label_manager: the dataset's label manager (only used by nnU-Net's cropping code).
        transforms: the augmentation pipeline (nnU-Net's training transforms without deep-supervision targets).
    """

    def __init__(self, pool: UnlabeledPool, batch_size: int, patch_size, final_patch_size, label_manager,
                 transforms=None):
        super().__init__(pool, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        # no class-location lookups for an ignore label: unlabeled images have no annotated voxels
        self.has_ignore = False

    def generate_train_batch(self) -> dict:
        batch = super().generate_train_batch()
        return {"data": batch["data"], "keys": batch["keys"]}
