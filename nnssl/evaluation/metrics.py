"""Overlap and surface-distance metrics of two binary masks (pure numpy/scipy; works in 2D and 3D).

Conventions
-----------
* Masks are boolean arrays of equal shape, in numpy axis order; ``spacing`` is the voxel size in mm along the
  same axes (nnU-Net's ``properties['spacing']`` order). ``spacing=None`` means 1 along every axis.
* **Surface voxels** of a mask are ``mask XOR binary_erosion(mask)`` with the face-connected structuring element
  (``scipy.ndimage.generate_binary_structure(ndim, 1)``: 4-neighbourhood in 2D, 6-neighbourhood in 3D) and
  ``border_value=0``, so mask voxels on the image border are surface voxels. This is medpy's default
  (``connectivity=1``).
* **Surface distances** from A to B: for every surface voxel of A, the Euclidean distance (in mm, with
  ``spacing``) from its centre to the centre of the nearest surface voxel of B, computed exactly with
  ``scipy.ndimage.distance_transform_edt(~surface_B, sampling=spacing)``. Both distance transforms run on the
  bounding box of ``A | B`` padded by one voxel (clipped to the image), which gives exactly the same numbers as
  on the whole image (every surface voxel lies in the box, and the erosion sees the same neighbours) at a
  fraction of the cost for large volumes.
* **HD95** is medpy's ``hd95``: the 95th percentile (``numpy.percentile``, linear interpolation) of the
  *pooled* distances of both directions, ``percentile(concatenate(d(A->B), d(B->A)), 95)``. (It is not the
  maximum of the two directed 95th percentiles, which some other toolkits report.)
* **ASD** is medpy's ``assd`` (average symmetric surface distance) as medpy long defined it,
  ``mean((asd(A, B), asd(B, A)))``: the mean of the two directed mean distances,
  ``(mean(d(A->B)) + mean(d(B->A))) / 2``. It differs from the mean of the pooled distances when the two
  surfaces have different numbers of voxels. (A recent medpy source passes the two distance arrays, rather
  than their means, to ``numpy.mean``; the directed-means definition is the one used here.)
* Every distance is reported twice: in mm (``spacing`` as given) and in voxels (spacing 1 along every axis,
  what the semi-supervised literature reports when it calls medpy without ``voxelspacing``).

Empty-mask rule
---------------
Stated once in :data:`EMPTY_RULE` and implemented once in :func:`empty_mask_metrics`; every function here
follows it:

* reference and prediction both empty: Dice, IoU, HD95 and ASD are all ``nan`` (the structure is absent and
  correctly not predicted; the case is excluded from that class's means and counted separately, as nnU-Net does
  for Dice);
* exactly one of them empty (a missed or a hallucinated structure): Dice = IoU = 0, and HD95 = ASD = the
  penalty :func:`max_distance`, the diagonal of the image's voxel-centre grid, ``sqrt(sum(((n_i - 1) *
  spacing_i) ** 2))``: the largest distance two voxels of that image can have (in mm with the spacing, in voxels
  without), so the penalty is never smaller than any distance a non-empty prediction could get.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

EMPTY_RULE = (
    "Both reference and prediction empty: dice, iou, hd95 and asd are NaN (excluded from the means, counted in "
    "n_empty_both). Exactly one of them empty: dice = iou = 0 and hd95 = asd = the image diagonal "
    "sqrt(sum(((shape_i - 1) * spacing_i)**2)), i.e. the largest distance between two voxels of that image "
    "(in mm for the *_mm metrics, with spacing 1 for the *_vox metrics)."
)

DISTANCE_DEFINITIONS = {
    "surface": "surface voxels = mask XOR binary_erosion(mask), face connectivity (medpy connectivity=1), "
               "voxels on the image border count as surface",
    "hd95": "medpy hd95: 95th percentile (numpy linear interpolation) of the pooled distances of both "
            "directions, percentile(concat(d(ref->pred), d(pred->ref)), 95)",
    "asd": "medpy assd: mean of the two directed mean surface distances, "
           "(mean(d(ref->pred)) + mean(d(pred->ref))) / 2",
    "units": "*_mm: millimetres using the image spacing; *_vox: voxels (spacing 1 along every axis)",
}


def _validated_spacing(spacing: Optional[Sequence[float]], ndim: int) -> np.ndarray:
    """``spacing`` as a float64 array of length ``ndim`` (ones for ``None``); raises ValueError when invalid."""
    if spacing is None:
        return np.ones(ndim)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (ndim,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per axis), got {spacing.tolist()}")
    return spacing


def _validated_masks(ref: np.ndarray, pred: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {ref.shape} vs {pred.shape}")
    if ref.ndim < 1:
        raise ValueError("masks must have at least one axis")
    return ref, pred


def max_distance(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> float:
    """The empty-mask penalty: the largest distance between two voxel centres of an image.

    Args:
        shape: image shape, numpy axis order.
        spacing: voxel size in mm per axis (same order); ``None`` for voxel units.

    Returns:
        ``sqrt(sum(((shape_i - 1) * spacing_i) ** 2))``, in mm (or voxels when ``spacing`` is ``None``).
    """
    spacing = _validated_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum(((np.asarray(shape, dtype=np.float64) - 1) * spacing) ** 2)))


def empty_mask_metrics(ref_empty: bool, pred_empty: bool, shape: Sequence[int],
                       spacing: Optional[Sequence[float]] = None) -> Optional[Dict[str, float]]:
    """The empty-mask rule (see the module docstring and :data:`EMPTY_RULE`), in one place.

    Args:
        ref_empty: whether the reference mask has no foreground voxel.
        pred_empty: whether the prediction mask has no foreground voxel.
        shape: image shape, numpy axis order (for the penalty distance).
        spacing: voxel size in mm per axis; ``None`` for voxel units.

    Returns:
        ``None`` when both masks are non-empty (the metrics are then computed normally). Otherwise a dict with
        keys ``dice``, ``iou``, ``hd95``, ``asd``: all ``nan`` when both are empty; ``dice = iou = 0`` and
        ``hd95 = asd = max_distance(shape, spacing)`` when exactly one is empty.
    """
    if not ref_empty and not pred_empty:
        return None
    if ref_empty and pred_empty:
        return {"dice": float("nan"), "iou": float("nan"), "hd95": float("nan"), "asd": float("nan")}
    penalty = max_distance(shape, spacing)
    return {"dice": 0.0, "iou": 0.0, "hd95": penalty, "asd": penalty}


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient ``2 |R & P| / (|R| + |P|)`` of two boolean masks.

    Args:
        ref: reference mask, any shape.
        pred: predicted mask, same shape.

    Returns:
        Dice in [0, 1]; ``nan`` when both are empty, 0 when exactly one is (:func:`empty_mask_metrics`).
    """
    ref, pred = _validated_masks(ref, pred)
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    rule = empty_mask_metrics(n_ref == 0, n_pred == 0, ref.shape)
    if rule is not None:
        return rule["dice"]
    return 2.0 * int(np.count_nonzero(ref & pred)) / (n_ref + n_pred)


def iou(ref: np.ndarray, pred: np.ndarray) -> float:
    """Intersection over union (Jaccard index) ``|R & P| / |R | P|`` of two boolean masks.

    Args:
        ref: reference mask, any shape.
        pred: predicted mask, same shape.

    Returns:
        IoU in [0, 1]; ``nan`` when both are empty, 0 when exactly one is (:func:`empty_mask_metrics`).
    """
    ref, pred = _validated_masks(ref, pred)
    rule = empty_mask_metrics(not ref.any(), not pred.any(), ref.shape)
    if rule is not None:
        return rule["iou"]
    return int(np.count_nonzero(ref & pred)) / int(np.count_nonzero(ref | pred))


def _padded_bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask`` grown by one voxel per side (clipped to the image)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a mask: ``mask XOR binary_erosion(mask)``, face connectivity, ``border_value=0``.

    Args:
        mask: boolean array, any number of axes.

    Returns:
        Boolean array of the same shape; voxels of ``mask`` with at least one face neighbour outside the mask
        (or outside the image).
    """
    from scipy.ndimage import binary_erosion, generate_binary_structure

    mask = np.asarray(mask, dtype=bool)
    return mask ^ binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)


def surface_distances(mask_a: np.ndarray, mask_b: np.ndarray, spacing: Optional[Sequence[float]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty masks, via exact Euclidean distance transforms.

    Args:
        mask_a: boolean array of shape ``S`` (2D or 3D, any number of axes works).
        mask_b: boolean array of shape ``S``.
        spacing: voxel size in mm along the axes of ``S``; ``None`` for voxel units.

    Returns:
        ``(d_ab, d_ba)``: float64 arrays of shape ``(n_surface_a,)`` and ``(n_surface_b,)``, the distance from
        every surface voxel of A to the nearest surface voxel of B, and vice versa (mm, or voxels).

    Raises:
        ValueError: when a mask is empty (distances are undefined; see :func:`empty_mask_metrics`), when the
            shapes differ, or when ``spacing`` is invalid.
    """
    mask_a, mask_b = _validated_masks(mask_a, mask_b)
    sampling = _validated_spacing(spacing, mask_a.ndim)
    if not mask_a.any() or not mask_b.any():
        raise ValueError("surface distances are undefined for an empty mask")
    return _directed_distances(*_cropped_surfaces(mask_a, mask_b), sampling)


def _cropped_surfaces(mask_a: np.ndarray, mask_b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Surfaces of two non-empty masks, cropped to the padded bounding box of their union."""
    box = _padded_bounding_box(mask_a | mask_b)
    return surface(mask_a[box]), surface(mask_b[box])


def _directed_distances(surface_a: np.ndarray, surface_b: np.ndarray, sampling: np.ndarray
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """``(d_ab, d_ba)`` of two non-empty surfaces of the same shape, with exact distance transforms."""
    from scipy.ndimage import distance_transform_edt

    d_ab = distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    d_ba = distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return d_ab, d_ba


def _hd95(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def _asd(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    return float((d_ab.mean() + d_ba.mean()) / 2.0)


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile Hausdorff distance, medpy's definition (pooled distances of both directions).

    Args:
        ref: reference mask of shape ``S``.
        pred: predicted mask of shape ``S``.
        spacing: voxel size in mm along the axes of ``S``; ``None`` for voxel units.

    Returns:
        HD95 in mm (voxels without ``spacing``); ``nan`` when both masks are empty, :func:`max_distance` when
        exactly one is (:func:`empty_mask_metrics`).
    """
    ref, pred = _validated_masks(ref, pred)
    rule = empty_mask_metrics(not ref.any(), not pred.any(), ref.shape, spacing)
    if rule is not None:
        return rule["hd95"]
    return _hd95(*surface_distances(ref, pred, spacing))


def asd(ref: np.ndarray, pred: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Average symmetric surface distance, medpy's ``assd``: the mean of the two directed mean distances.

    Args:
        ref: reference mask of shape ``S``.
        pred: predicted mask of shape ``S``.
        spacing: voxel size in mm along the axes of ``S``; ``None`` for voxel units.

    Returns:
        ASD in mm (voxels without ``spacing``); ``nan`` when both masks are empty, :func:`max_distance` when
        exactly one is (:func:`empty_mask_metrics`).
    """
    ref, pred = _validated_masks(ref, pred)
    rule = empty_mask_metrics(not ref.any(), not pred.any(), ref.shape, spacing)
    if rule is not None:
        return rule["asd"]
    return _asd(*surface_distances(ref, pred, spacing))


def binary_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Optional[Sequence[float]] = None
                   ) -> Dict[str, float]:
    """All metrics of one reference/prediction mask pair, following the empty-mask rule.

    Args:
        ref: reference mask of shape ``S`` (2D or 3D).
        pred: predicted mask of shape ``S``.
        spacing: voxel size in mm along the axes of ``S``; ``None`` means 1 mm.

    Returns:
        Dict with ``dice``, ``iou`` (in [0, 1]), ``hd95_mm``, ``asd_mm`` (mm), ``hd95_vox``, ``asd_vox``
        (voxels), ``n_ref_voxels``, ``n_pred_voxels`` (int) and ``ref_empty``, ``pred_empty`` (bool).
    """
    ref, pred = _validated_masks(ref, pred)
    spacing = _validated_spacing(spacing, ref.ndim)
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    out = {"n_ref_voxels": n_ref, "n_pred_voxels": n_pred, "ref_empty": n_ref == 0, "pred_empty": n_pred == 0}
    rule_mm = empty_mask_metrics(n_ref == 0, n_pred == 0, ref.shape, spacing)
    if rule_mm is not None:
        rule_vox = empty_mask_metrics(n_ref == 0, n_pred == 0, ref.shape)
        out.update(dice=rule_mm["dice"], iou=rule_mm["iou"], hd95_mm=rule_mm["hd95"], asd_mm=rule_mm["asd"],
                   hd95_vox=rule_vox["hd95"], asd_vox=rule_vox["asd"])
        return out
    n_both = int(np.count_nonzero(ref & pred))
    surfaces = _cropped_surfaces(ref, pred)
    d_mm = _directed_distances(*surfaces, spacing)
    d_vox = _directed_distances(*surfaces, np.ones(ref.ndim))
    out.update(dice=2.0 * n_both / (n_ref + n_pred), iou=n_both / (n_ref + n_pred - n_both),
               hd95_mm=_hd95(*d_mm), asd_mm=_asd(*d_mm), hd95_vox=_hd95(*d_vox), asd_vox=_asd(*d_vox))
    return out
