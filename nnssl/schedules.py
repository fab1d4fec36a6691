"""Ramp-up schedules for the weights of unlabeled loss terms.

All functions are pure: a position ``t`` and a length ``length`` (in the same unit, e.g. training
iterations or epochs) go in, a float in [0, 1] comes out. ``length <= 0`` means "no ramp" and returns 1.
Also the schedule of learning-rate-guided (LRG) sampling and the per-step batch split it implies; the split is
pure except that, given a ``numpy.random.Generator``, it advances it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

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


def lrg_batch_split(batch_size: int, unlabeled_share: float, max_unlabeled: Optional[int] = None,
                    rng: Optional[np.random.Generator] = None) -> Tuple[int, int]:
    """(labeled, unlabeled) samples of one training step's batch under LRG sampling.

    With ``rng`` (the faithful rule): each of the ``batch_size`` samples is unlabeled with probability
    ``unlabeled_share``, independently, drawn anew for every step: ``n_u ~ Binomial(batch_size, share)``, so
    ``E[n_u] = share * batch_size`` and the realised share follows the schedule in expectation at any batch size.
    A step may be all-labeled or all-unlabeled (with B = 2 and share 0.5: a quarter of the steps each).

    Without ``rng`` (deterministic fallback): ``n_u = floor(share * batch_size)``, the rule of M&N's released code
    (pakheiyeung/M-N ``train.py``, per batch: ``num_pseudo = floor(share * 5)``). With its batches of 5 volumes the
    floor lags the schedule by less than one sample; with nnU-Net's batch size 2 it draws no unlabeled sample until
    the share reaches 0.5 (54 % of training under the poly schedule with the ``"lr"`` rule) and never more than one
    before the share is 1, so the realised share lags far behind the schedule. The binomial draw keeps the
    schedule's intent (the share of unlabeled samples seen during training) at B = 2: the share becomes an
    expectation over steps instead of a count within one batch.

    In both cases ``max_unlabeled`` (the unlabeled loader's batch size) caps the unlabeled count and labeled samples
    fill the rest, so the total is always ``batch_size`` (memory does not change). A cap below ``batch_size``
    lowers ``E[n_u]`` below ``share * batch_size`` where the draw exceeds it.

    Args:
        batch_size: samples per step (nnU-Net's plans' batch size), >= 1.
        unlabeled_share: the scheduled share in [0, 1] (:func:`lrg_unlabeled_share`).
        max_unlabeled: at most this many unlabeled samples (>= 0); None: no cap beyond ``batch_size``.
        rng: a ``numpy.random.Generator`` for the per-step draw; None: the deterministic floor.

    Returns:
        ``(n_labeled, n_unlabeled)``, two ints summing to ``batch_size``.

    Raises:
        ValueError: for ``batch_size < 1``, a share outside [0, 1] or a negative ``max_unlabeled``.
        TypeError: for an ``rng`` that is not a ``numpy.random.Generator``.
    """
    if batch_size < 1 or not 0.0 <= unlabeled_share <= 1.0:
        raise ValueError(f"need batch_size >= 1 and a share in [0, 1], got {batch_size}, {unlabeled_share}")
    if max_unlabeled is not None and max_unlabeled < 0:
        raise ValueError(f"max_unlabeled must be >= 0 or None, got {max_unlabeled}")
    if rng is None:
        n_u = int(math.floor(unlabeled_share * batch_size + 1e-9))
    elif isinstance(rng, np.random.Generator):
        n_u = int(rng.binomial(batch_size, unlabeled_share))
    else:
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
    if max_unlabeled is not None:
        n_u = min(n_u, int(max_unlabeled))
    return batch_size - n_u, n_u
