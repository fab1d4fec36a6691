"""Ramp-up schedules for the weights of unlabeled loss terms.

All functions are pure: a position ``t`` and a length ``length`` (in the same unit, e.g. training
iterations or epochs) go in, a float in [0, 1] comes out. ``length <= 0`` means "no ramp" and returns 1.
"""

from __future__ import annotations

import math

RAMP_SHAPES = ("sigmoid", "linear", "cosine", "none")


def sigmoid_rampup(t: float, length: float) -> float:
    """Sigmoid-shaped ramp of Laine & Aila (2017), as used by Mean Teacher and SSL4MIS.

    ``exp(-5 (1 - clip(t / length, 0, 1))^2)``: 0.0067 at ``t = 0``, 1 at ``t >= length``.

    Args:
        t: current position (iterations or epochs).
        length: ramp length in the same unit as ``t``.

    Returns:
        The ramp value in (0, 1].
    """
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(t, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(t: float, length: float) -> float:
    """Linear ramp from 0 at ``t = 0`` to 1 at ``t >= length``."""
    if length <= 0:
        return 1.0
    return float(min(max(t, 0.0), length) / length)


def cosine_rampup(t: float, length: float) -> float:
    """Half-cosine ramp ``0.5 (1 - cos(pi t / length))``: 0 at ``t = 0``, 1 at ``t >= length``."""
    if length <= 0:
        return 1.0
    return float(0.5 * (1.0 - math.cos(math.pi * min(max(t, 0.0), length) / length)))


def rampup(shape: str, t: float, length: float) -> float:
    """Dispatch to one of :data:`RAMP_SHAPES` by name (``"none"`` is constant 1).

    Raises:
        ValueError: for an unknown shape.
    """
    if shape == "sigmoid":
        return sigmoid_rampup(t, length)
    if shape == "linear":
        return linear_rampup(t, length)
    if shape == "cosine":
        return cosine_rampup(t, length)
    if shape == "none":
        return 1.0
    raise ValueError(f"unknown ramp shape {shape!r}; expected one of {RAMP_SHAPES}")


def escalate(start: float, end: float, t: float, length: float, shape: str = "linear") -> float:
    """A value that moves from ``start`` at ``t = 0`` to ``end`` at ``t >= length`` along a ramp of ``shape``.

    ``start + (end - start) * rampup(shape, t, length)`` (CAD's Dynamic Threshold Escalation: the confidence
    threshold and the maximum replacement size rise over training). With ``"sigmoid"`` the value at ``t = 0`` is
    ``start + 0.0067 (end - start)``.
    """
    return float(start + (end - start) * rampup(shape, t, length))
