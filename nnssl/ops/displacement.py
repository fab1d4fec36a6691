"""Confidence-aware displacement (CAD's Largest Low-Confidence Region Replacement), 2D and 3D.

Conventions (pure functions): confidence maps are ``max_k softmax(logits)_k``, ``(*spatial)`` for one sample or
``(B, *spatial)`` for a batch, values in [1/K, 1]; images are ``(B, C, *spatial)``. A box is a :class:`Box`
(start and size per spatial axis, in voxels).

The replacement for sample ``i`` of view 1: find the largest connected component of ``conf_1[i] < threshold``,
take its bounding box, shrink it (around the component's least confident voxel, inside the bounding box) until it
holds at most ``max_fraction`` of the patch's voxels, and overwrite it with the box of the same size of view 2
(the same sample, the other student's input) whose mean confidence ``conf_2[i]`` is highest. View 2 is displaced
the same way with the roles swapped, from the original (not yet displaced) view 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: ``start`` and ``size`` per spatial axis (voxels)."""

    start: Tuple[int, ...]
    size: Tuple[int, ...]

    @property
    def slices(self) -> Tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))

    @property
    def volume(self) -> int:
        return int(np.prod(self.size))


def _fit_size(size: Sequence[int], max_voxels: int) -> Tuple[int, ...]:
    """Shrink ``size`` (uniformly, then the longest side one by one) until its volume is <= ``max_voxels``."""
    size = [int(s) for s in size]
    if int(np.prod(size)) <= max_voxels:
        return tuple(size)
    f = (max_voxels / float(np.prod(size))) ** (1.0 / len(size))
    size = [max(1, int(math.floor(s * f))) for s in size]
    while int(np.prod(size)) > max_voxels:
        k = int(np.argmax(size))
        size[k] -= 1
    return tuple(size)


def largest_low_confidence_box(confidence: np.ndarray, threshold: float, max_voxels: int,
                               connectivity: Optional[int] = None) -> Optional[Box]:
    """The box that LLCR replaces in one sample, or None (no voxel below the threshold, or ``max_voxels < 1``).

    Args:
        confidence: ``(*spatial)`` confidence map (2D or 3D).
        threshold: voxels with ``confidence < threshold`` are low-confidence.
        max_voxels: largest allowed box volume (Dynamic Threshold Escalation's maximum replacement size).
        connectivity: 1 (faces) .. ndim (full); None = ndim (8-connectivity in 2D, 26 in 3D).

    Returns:
        The bounding box of the largest low-confidence component if it holds at most ``max_voxels`` voxels; else a
        box of at most ``max_voxels`` voxels inside that bounding box, centred (as far as the bounding box allows)
        on the component's least confident voxel.
    """
    if max_voxels < 1:
        return None
    confidence = np.asarray(confidence)
    ndim = confidence.ndim
    structure = ndimage.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)
    labels, n = ndimage.label(confidence < threshold, structure)
    if n == 0:
        return None
    k = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    bbox = ndimage.find_objects(labels, max_label=k)[k - 1]
    lo = [s.start for s in bbox]
    hi = [s.stop for s in bbox]
    size = _fit_size([b - a for a, b in zip(lo, hi)], max_voxels)
    if size == tuple(b - a for a, b in zip(lo, hi)):
        return Box(tuple(lo), size)
    worst = np.unravel_index(int(np.argmin(np.where(labels == k, confidence, np.inf))), confidence.shape)
    start = tuple(int(min(max(c - s // 2, a), b - s)) for c, s, a, b in zip(worst, size, lo, hi))
    return Box(start, size)


def most_confident_box(confidence: torch.Tensor, size: Sequence[int]) -> Box:
    """The box of ``size`` with the highest mean confidence (first one on ties).

    Args:
        confidence: ``(*spatial)`` tensor (2D or 3D).
        size: box size per axis, each at most the map's size.
    """
    ndim = confidence.ndim
    if len(size) != ndim or any(s < 1 or s > n for s, n in zip(size, confidence.shape)):
        raise ValueError(f"box size {tuple(size)} does not fit a map of shape {tuple(confidence.shape)}")
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    means = pool(confidence.float()[None, None], kernel_size=tuple(size), stride=1)[0, 0]
    start = np.unravel_index(int(torch.argmax(means).item()), tuple(means.shape))
    return Box(tuple(int(s) for s in start), tuple(int(s) for s in size))


def search_stride(spatial_shape: Sequence[int], search_max_voxels: int) -> int:
    """Per-axis pooling factor that brings a map of ``spatial_shape`` to at most ~``search_max_voxels`` voxels."""
    numel = int(np.prod(spatial_shape))
    if search_max_voxels <= 0 or numel <= search_max_voxels:
        return 1
    return int(math.ceil((numel / search_max_voxels) ** (1.0 / len(spatial_shape))))


def llcr_boxes(conf_target: torch.Tensor, conf_source: torch.Tensor, threshold: float, max_fraction: float,
               search_max_voxels: int = 32768, connectivity: Optional[int] = None
               ) -> List[Optional[Tuple[Box, Box]]]:
    """Per sample: (box to overwrite in the target view, box to copy from the source view), or None.

    The search runs on the confidence maps average-pooled by :func:`search_stride` (so that its cost stays
    bounded on large patches) and the boxes are mapped back to voxels; the replaced box never holds more than
    ``floor(max_fraction * patch voxels)`` voxels.

    Args:
        conf_target: ``(B, *spatial)`` confidence of the view whose low-confidence region is replaced.
        conf_source: ``(B, *spatial)`` confidence of the view that gives the high-confidence region.
        threshold: confidence threshold (low-confidence: below it).
        max_fraction: maximum replaced share of the patch's voxels, in [0, 1].
    """
    if conf_target.shape != conf_source.shape:
        raise ValueError(f"confidence maps differ: {tuple(conf_target.shape)} vs {tuple(conf_source.shape)}")
    spatial = tuple(conf_target.shape[1:])
    ndim = len(spatial)
    max_voxels = int(math.floor(max_fraction * float(np.prod(spatial))))
    stride = search_stride(spatial, search_max_voxels)
    if stride > 1:
        pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
        coarse_t = pool(conf_target.float()[:, None], stride, stride, ceil_mode=True)[:, 0]
        coarse_s = pool(conf_source.float()[:, None], stride, stride, ceil_mode=True)[:, 0]
    else:
        coarse_t, coarse_s = conf_target.float(), conf_source.float()
    coarse_t_np = coarse_t.detach().cpu().numpy()
    coarse_s = coarse_s.detach().cpu()
    coarse_max = max_voxels // stride ** ndim if stride > 1 else max_voxels
    out: List[Optional[Tuple[Box, Box]]] = []
    for i in range(coarse_t_np.shape[0]):
        target = largest_low_confidence_box(coarse_t_np[i], threshold, coarse_max, connectivity)
        if target is None:
            out.append(None)
            continue
        source = most_confident_box(coarse_s[i], target.size)
        # back to voxels: the same size for both boxes, inside the patch, within the maximum volume
        size = tuple(min(n * stride, d - a * stride, d - b * stride)
                     for n, a, b, d in zip(target.size, target.start, source.start, spatial))
        size = _fit_size(size, max_voxels)
        out.append((Box(tuple(a * stride for a in target.start), size),
                    Box(tuple(b * stride for b in source.start), size)))
    return out


def displace(target_images: torch.Tensor, source_images: torch.Tensor,
             boxes: Sequence[Optional[Tuple[Box, Box]]]) -> torch.Tensor:
    """A copy of ``target_images`` where, per sample, box ``boxes[i][0]`` holds ``source_images[i]``'s box
    ``boxes[i][1]`` (all channels); samples with ``None`` are unchanged."""
    out = target_images.clone()
    for i, pair in enumerate(boxes):
        if pair is None:
            continue
        dst, src = pair
        out[(i, slice(None)) + dst.slices] = source_images[(i, slice(None)) + src.slices]
    return out


def llcr_displace(x_1: torch.Tensor, x_2: torch.Tensor, conf_1: torch.Tensor, conf_2: torch.Tensor,
                  threshold: float, max_fraction: float, search_max_voxels: int = 32768,
                  connectivity: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Bidirectional Largest Low-Confidence Region Replacement between two views of the same samples.

    Args:
        x_1, x_2: ``(B, C, *spatial)`` the two students' inputs.
        conf_1, conf_2: ``(B, *spatial)`` their confidence maps (``max softmax``), detached.
        threshold, max_fraction: the current Dynamic Threshold Escalation values.

    Returns:
        ``(x_1', x_2', replaced)``: the displaced views (new tensors) and the mean share of voxels replaced per
        sample and view.
    """
    boxes_1 = llcr_boxes(conf_1, conf_2, threshold, max_fraction, search_max_voxels, connectivity)
    boxes_2 = llcr_boxes(conf_2, conf_1, threshold, max_fraction, search_max_voxels, connectivity)
    numel = float(np.prod(x_1.shape[2:]))
    replaced = [0.0 if b is None else b[0].volume / numel for b in boxes_1 + boxes_2]
    return (displace(x_1, x_2, boxes_1), displace(x_2, x_1, boxes_2),
            float(np.mean(replaced)) if replaced else 0.0)
