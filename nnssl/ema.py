"""Exponential moving average of a network's parameters and buffers (the Mean Teacher update)."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_with_warmup(step: int, decay: float) -> float:
    """Decay used at optimizer step ``step`` (0-based): ``min(1 - 1 / (step + 1), decay)``.

    The warm-up makes the teacher an exact running mean of the first student weights instead of being
    dominated by its random initialisation (Tarvainen & Valpola 2017; SSL4MIS ``update_ema_variables``).
    """
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: ``teacher <- decay * teacher + (1 - decay) * student`` over parameters AND buffers.

    Floating-point buffers (e.g. BatchNorm running statistics) are averaged like parameters; integer buffers
    (e.g. ``num_batches_tracked``) are copied from the student. ``decay = 0`` copies the student, ``decay = 1``
    freezes the teacher. Both modules must have the same architecture (state-dict keys and shapes).

    Raises:
        ValueError: if the two modules' parameters or buffers do not correspond.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError("teacher and student do not have the same parameters/buffers")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch between teacher {tuple(t.shape)} and student {tuple(s.shape)}")
    if t_params:
        torch._foreach_lerp_(t_params, [s.detach() for s in s_params], 1.0 - decay)
    for t, s in zip(t_bufs, s_bufs):
        if t.dtype.is_floating_point:
            t.lerp_(s.detach(), 1.0 - decay)
        else:
            t.copy_(s)
