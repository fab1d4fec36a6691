"""The unlabeled image pool of a training run and the loader that draws patches from it.

The pool joins two kinds of preprocessed images, both made with the dataset's plans:

- training cases of the fold whose labels are hidden (``splits_final.json`` fold key ``unlabeled``), read from
  nnU-Net's labeled preprocessed folder;
- images preprocessed by ``nnssl_preprocess_unlabeled``, read from ``unlabeled/<data_identifier>/``.

The loader is nnU-Net's own ``nnUNetDataLoader`` (same cropping, same augmentation pipeline) without foreground
oversampling, and its batches carry ``data``, ``keys`` and ``meta`` only: the segmentation that nnU-Net's loader
crops alongside (real labels for hidden training cases, the non-zero mask otherwise) is dropped inside the loader,
so no label can reach any loss. A pool of stored pseudo-labels (:class:`nnssl.data.pseudo_labels.PseudoLabeledPool`)
replaces that segmentation by the pseudo-label and its confidence, which the batch then carries as ``target``.
Which images make the pool of a run is :mod:`nnssl.data.pool`; the folder layout
is :mod:`nnssl.data.layout`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

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
    """``nnUNetDataLoader`` over an :class:`UnlabeledPool`: random crops, batches of ``{'data', 'keys', 'meta'}``.

    ``meta`` is the per-sample metadata channel, one dict per sample in batch order, with

    - ``case``: the identifier;
    - ``crop_start``: the crop's start per spatial axis of the preprocessed image (before augmentation; may be
      negative where nnU-Net pads), ``image_shape``: the preprocessed image's spatial shape;
    - for 2D configurations (nnU-Net crops one slice of the 3D preprocessed array): ``slice_index`` and
      ``slice_count``, the slice's position in its scan and the scan's number of slices (None in 3D);
    - ``pseudo_label``, ``confidence``: None, unless the pool provides stored pseudo-labels
      (``provides_pseudo_labels``, :class:`nnssl.data.pseudo_labels.PseudoLabeledPool`): then the sample's
      pseudo-label ``(*patch)`` int16 and confidence levels ``(*patch)`` int16 *after* augmentation (views of
      the batch's ``target``), and the batch also has ``target`` ``(B, 2, *patch)``: the pool's two segmentation
      channels augmented with the image by nnU-Net's transforms.

    Metadata describes the crop, not the spatial augmentation applied to it afterwards (except the pseudo-label
    tensors, which are augmented with the image).

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
        self._crops: List[tuple] = []

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        bbox_lbs, bbox_ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        self._crops.append((tuple(int(v) for v in data_shape), [int(v) for v in bbox_lbs]))
        return bbox_lbs, bbox_ubs

    def generate_train_batch(self) -> dict:
        self._crops = []
        batch = super().generate_train_batch()
        meta = []
        pseudo = getattr(self._data, "provides_pseudo_labels", False)
        for j, (key, (shape, start)) in enumerate(zip(batch["keys"], self._crops)):
            two_d = self.patch_size_was_2d
            meta.append({"case": key, "crop_start": start, "image_shape": shape,
                         "slice_index": start[0] if two_d else None, "slice_count": shape[0] if two_d else None,
                         "pseudo_label": batch["target"][j, 0] if pseudo else None,
                         "confidence": batch["target"][j, 1] if pseudo else None})
        out = {"data": batch["data"], "keys": batch["keys"], "meta": meta}
        if pseudo:
            out["target"] = batch["target"]
        return out
