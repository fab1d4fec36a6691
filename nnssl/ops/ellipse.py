"""Ellipse geometry on 2D arrays: fitting, rasterising, circumference and mask boundaries.

All functions are pure (no I/O, no global state). Coordinates follow numpy's axis order: a point is
``(axis0, axis1)``, i.e. ``(row, col)`` for pixel indices or ``(row_mm, col_mm)`` once multiplied by the pixel
spacing. Pixel ``(i, j)`` has its centre at ``(i, j)``.

An ellipse is described by :class:`Ellipse`: its centre, its two semi-axes ``a`` and ``b`` and the angle of the
``a`` axis, measured from axis 0 towards axis 1. With these conventions a point of the ellipse is::

    p(t) = centre + a * cos(t) * (cos(angle), sin(angle)) + b * sin(t) * (-sin(angle), cos(angle))

which is both scikit-image's ``EllipseModel`` parametrisation (with ``x`` = axis 0) and the one of
``skimage.draw.ellipse(r, c, r_radius=a, c_radius=b, rotation=angle)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in the plane, in numpy axis order.

    Attributes:
        center: ``(axis0, axis1)`` coordinates of the centre (pixels or mm, as the points it was fitted to).
        semi_axes: ``(a, b)``, the semi-axis lengths (same unit as ``center``), both > 0; ``a`` lies along
            ``angle``, ``b`` perpendicular to it. ``a`` is not necessarily the longer one.
        angle: direction of the ``a`` semi-axis in radians, from axis 0 towards axis 1.
    """

    center: Tuple[float, float]
    semi_axes: Tuple[float, float]
    angle: float

    @property
    def circumference(self) -> float:
        """Perimeter of the ellipse, see :func:`ellipse_circumference`."""
        return ellipse_circumference(*self.semi_axes)


def fit_ellipse(points: np.ndarray) -> Ellipse:
    """Fit an ellipse to 2D points by direct least squares (scikit-image's ``EllipseModel``).

    ``EllipseModel`` implements Halir & Flusser's numerically stable direct least-squares fit of a conic
    constrained to be an ellipse. It needs no starting point and is not iterative.

    Args:
        points: array of shape ``(N, 2)``, ``N >= 5``, in numpy axis order (pixels or mm: the ellipse comes back
            in the same unit).

    Returns:
        The fitted :class:`Ellipse`.

    Raises:
        ValueError: when ``points`` is not ``(N, 2)``, has fewer than 5 points, contains non-finite values, or
            the fit fails (e.g. all points on a line or identical) or gives a degenerate ellipse.
    """
    from skimage.measure import EllipseModel

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"ellipse fit needs points of shape (N, 2), got shape {points.shape}")
    if len(points) < 5:
        raise ValueError(f"ellipse fit needs at least 5 points, got {len(points)}")
    if not np.all(np.isfinite(points)):
        raise ValueError("ellipse fit got non-finite point coordinates")
    if hasattr(EllipseModel, "from_estimate"):  # scikit-image >= 0.26
        model = EllipseModel.from_estimate(points)
        ok = bool(model)
        params = (*model.center, *model.axis_lengths, model.theta) if ok else None
    else:  # older scikit-image
        model = EllipseModel()
        ok = model.estimate(points)
        params = tuple(model.params) if ok else None
    if not ok:
        raise ValueError(f"ellipse fit failed on {len(points)} points (collinear, identical or not "
                         f"elliptic)")
    c0, c1, a, b, angle = (float(v) for v in params)
    if not all(np.isfinite([c0, c1, a, b, angle])) or a <= 0 or b <= 0:
        raise ValueError(f"ellipse fit on {len(points)} points gave a degenerate ellipse "
                         f"(semi-axes {a:.4g}, {b:.4g})")
    return Ellipse(center=(c0, c1), semi_axes=(a, b), angle=angle)


def ellipse_circumference(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes ``a`` and ``b`` (Ramanujan's second approximation).

    ``C = pi * (a + b) * (1 + 3h / (10 + sqrt(4 - 3h)))`` with ``h = ((a - b) / (a + b))**2``. It is exact for a
    circle (``h = 0`` gives ``2 * pi * r``); its relative error grows with eccentricity but stays below about
    1e-9 for ``b / a >= 0.5`` (fetal heads are far rounder) and below 4e-4 even for a degenerate ellipse.

    Args:
        a: first semi-axis length (any unit), >= 0.
        b: second semi-axis length (same unit), >= 0.

    Returns:
        The circumference, in the unit of ``a`` and ``b``.

    Raises:
        ValueError: for a negative semi-axis.
    """
    if a < 0 or b < 0:
        raise ValueError(f"semi-axes must be >= 0, got {a}, {b}")
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def rasterize_ellipse(ellipse: Ellipse, shape: Tuple[int, int]) -> np.ndarray:
    """Draw a filled ellipse (``skimage.draw.ellipse``) into a boolean array.

    A pixel is set when its centre lies strictly inside the ellipse; the parts outside the array are clipped.

    Args:
        ellipse: the ellipse in pixel coordinates (numpy axis order).
        shape: ``(rows, cols)`` of the output.

    Returns:
        Boolean array of shape ``shape``, True inside the ellipse.
    """
    from skimage.draw import ellipse as draw_ellipse

    out = np.zeros(tuple(int(s) for s in shape[:2]), dtype=bool)
    a, b = ellipse.semi_axes
    rr, cc = draw_ellipse(ellipse.center[0], ellipse.center[1], a, b, shape=out.shape, rotation=ellipse.angle)
    out[rr, cc] = True
    return out


def boundary_points(mask: np.ndarray) -> np.ndarray:
    """Sub-pixel boundary of a 2D binary mask, from ``skimage.measure.find_contours`` at level 0.5.

    The mask is padded with one background pixel on every side so that every contour is closed; the contour
    runs half-way between foreground and background pixel centres, i.e. on the outline of the mask seen as a
    union of unit squares, smoothed at corners. It is therefore unbiased for a rasterised shape, unlike the
    centres of the outermost foreground pixels (which lie on average half a pixel inside). Foreground is taken
    as 8-connected (``fully_connected="high"``), as in :func:`scipy.ndimage.label` with a full structure.
    Points where the mask touches the array border lie on that border (coordinate ``-0.5`` or ``size - 0.5``).
    Holes give inner contours, which are included.

    Args:
        mask: 2D array, nonzero = foreground.

    Returns:
        Float array of shape ``(N, 2)`` in pixel coordinates (numpy axis order), without the closing duplicate
        of each contour; ``(0, 2)`` for an empty mask.

    Raises:
        ValueError: when ``mask`` is not 2D.
    """
    from skimage.measure import find_contours

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"boundary_points needs a 2D mask, got shape {mask.shape}")
    padded = np.pad(mask != 0, 1).astype(np.float32)
    contours = [c[:-1] if len(c) > 1 and np.array_equal(c[0], c[-1]) else c
                for c in find_contours(padded, 0.5, fully_connected="high")]
    if not contours:
        return np.zeros((0, 2))
    return np.concatenate(contours) - 1.0
