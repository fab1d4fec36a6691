"""Head circumference (HC) of a 2D fetal-head segmentation, as in the HC18 challenge.

The HC18 challenge (van den Heuvel et al. 2018, PLoS ONE 13(8): e0200412) measures the head circumference as the
circumference of an ellipse fitted to the head segmentation. :func:`head_circumference_mm` does the same:

1. keep the largest 8-connected component of the mask (the challenge expects one ellipse, the head; smaller
   components are false positives) and fill its holes, so only its outer outline counts;
2. take that outline with sub-pixel accuracy (:func:`nnssl.ops.ellipse.boundary_points`), dropping the parts
   that run along the image border: there the head continues outside the field of view and the border is not
   the head's outline;
3. convert the points to millimetres with the pixel spacing (so anisotropic pixels are handled exactly: the
   ellipse is fitted in physical space), fit an ellipse and return its circumference (Ramanujan's second
   approximation, :func:`nnssl.ops.ellipse.ellipse_circumference`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nnssl.ops.ellipse import boundary_points, fit_ellipse


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected foreground component of a 2D mask, holes filled.

    Args:
        mask: 2D array, nonzero = foreground.

    Returns:
        Boolean array of the same shape (all False for an empty mask). Ties between equally large components go
        to the one with the lowest label (first in raster order).
    """
    from scipy import ndimage

    fg = np.asarray(mask) != 0
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        fg = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(fg)


def head_circumference_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """mask: 2D bool/int array (nonzero = head), spacing: (row_mm, col_mm) i.e. numpy axis order.
    Fits an ellipse to the mask's boundary and returns its circumference in mm; nan for an empty mask.

    Only the largest 8-connected component counts (holes filled), and outline points along the image border are
    ignored (see the module docstring). The ellipse is fitted to the outline in millimetres, so the result is
    correct for anisotropic pixels. For a rasterised ellipse the result is within about one pixel of
    circumference of the true value (the outline is taken half-way between inside and outside pixel centres).

    Args:
        mask: 2D array of shape ``(rows, cols)``, nonzero = head.
        spacing: pixel size in mm along ``(rows, cols)``; both > 0.

    Returns:
        The head circumference in mm. ``nan`` for an empty mask, and also when no ellipse can be fitted to the
        outline (a mask of a few pixels, or one whose visible outline is a straight line).

    Raises:
        ValueError: when ``mask`` is not 2D or ``spacing`` is not two positive numbers.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"head_circumference_mm needs a 2D mask, got shape {mask.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be two positive numbers (row_mm, col_mm), got {spacing.tolist()}")
    if not mask.any():
        return float("nan")
    points = boundary_points(largest_component(mask))
    inside = np.all((points > -0.5) & (points < np.array(mask.shape) - 0.5), axis=1)
    try:
        ellipse = fit_ellipse(points[inside] * spacing)
    except ValueError:
        return float("nan")
    return ellipse.circumference
