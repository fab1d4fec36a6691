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


LRG_RULES = ("lr", "linear")


def lrg_unlabeled_share(rule: str, *, lr: float, max_lr: float, epoch: int, start_epoch: int,
                        num_epochs: int) -> float:
    """Share of unlabeled samples in a batch under learning-rate-guided (LRG) sampling (M&N, Yeung et al. 2025).

    Zero before ``start_epoch`` (e.g. a labeled-only warm-up stage), then

    - ``"lr"``: ``1 - lr / max_lr``: the batch holds few unlabeled samples while the learning rate is high and
      the models still move fast (poor, unstable pseudo-labels), and more as the rate decays and they settle.
      Under nnU-Net's poly schedule ``lr = max_lr (1 - epoch / num_epochs)^0.9`` this is
      ``1 - (1 - epoch / num_epochs)^0.9``: 0 at epoch 0, 0.5 near 54 % of training, 1 only at ``lr = 0``.
    - ``"linear"``: ``(epoch - start_epoch) / (num_epochs - start_epoch)``, the rule of the authors' released code
      (pakheiyeung/M-N ``train.py``), which ignores the learning rate.

    Args:
        rule: one of :data:`LRG_RULES`.
        lr: learning rate of the current epoch (the deployed network's optimizer).
        max_lr: the schedule's maximum (nnU-Net's ``initial_lr``), > 0.
        epoch: current epoch (0-based); start_epoch: first epoch with unlabeled samples; num_epochs: all epochs.

    Returns:
        a share in [0, 1].
    """
    if rule not in LRG_RULES:
        raise ValueError(f"unknown LRG rule {rule!r}; expected one of {LRG_RULES}")
    if epoch < start_epoch:
        return 0.0
    if rule == "lr":
        if max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        share = 1.0 - lr / max_lr
    else:
        share = (epoch - start_epoch) / max(num_epochs - start_epoch, 1)
    return float(min(max(share, 0.0), 1.0))


def lrg_batch_split(batch_size: int, unlabeled_share: float, max_unlabeled: int = None) -> tuple:
    """(labeled, unlabeled) samples of a batch of ``batch_size`` with ``floor(share * batch_size)`` unlabeled ones.

    The total is always ``batch_size`` (so memory does not change); ``max_unlabeled`` (the unlabeled loader's
    batch size) caps the unlabeled count and labeled samples fill the rest. Flooring, as the authors' code does,
    keeps at least one labeled sample until the share reaches 1.
    """
    if batch_size < 1 or not 0.0 <= unlabeled_share <= 1.0:
        raise ValueError(f"need batch_size >= 1 and a share in [0, 1], got {batch_size}, {unlabeled_share}")
    n_u = int(math.floor(unlabeled_share * batch_size + 1e-9))
    if max_unlabeled is not None:
        n_u = min(n_u, int(max_unlabeled))
    return batch_size - n_u, n_u
