"""Hard pseudo-labels from a teacher's logits: argmax, optionally only the largest connected component per class
(BCP/ABD's post-processing), for 2D and 3D batches.

Conventions (pure functions): logits ``(B, K, *spatial)``, segmentations ``(B, 1, *spatial)`` int64 class indices.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from nnssl.ops.tensors import class_argmax


def largest_component_per_class(segmentation: np.ndarray, num_classes: int, connectivity: Optional[int] = None
                                ) -> np.ndarray:
    """Keep, for every foreground class, only its largest connected component; the rest becomes background 0.

    BCP/ABD post-process their teacher's pseudo-labels this way (``get_ACDC_2DLargestCC``). Ties go to the
    component scipy labels first.

    Args:
        segmentation: integer array ``(*spatial)`` of class indices.
        num_classes: number of classes including background.
        connectivity: 1 (faces) .. ndim (full, scikit-image's default that BCP uses); None = ndim.
    """
    ndim = segmentation.ndim
    structure = ndimage.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)
    out = np.zeros_like(segmentation)
    for c in range(1, num_classes):
        labels, n = ndimage.label(segmentation == c, structure)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        out[labels == int(np.argmax(sizes)) + 1] = c
    return out


def pseudo_labels(logits: torch.Tensor, largest_component: bool = True, connectivity: Optional[int] = None
                  ) -> torch.Tensor:
    """Hard pseudo-labels from a teacher's logits: argmax, optionally the largest component per class.

    Args:
        logits: ``(B, K, *spatial)`` softmax logits.
        largest_component: apply :func:`largest_component_per_class` to each sample (on the CPU).

    Returns:
        ``(B, 1, *spatial)`` int64 class indices on ``logits``' device.
    """
    seg = class_argmax(logits.detach(), keepdim=True)
    if not largest_component:
        return seg
    arr = seg.cpu().numpy()
    for i in range(arr.shape[0]):
        arr[i, 0] = largest_component_per_class(arr[i, 0], logits.shape[1], connectivity)
    return torch.from_numpy(arr).to(logits.device)
