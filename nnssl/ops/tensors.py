"""Small tensor helpers shared by losses and trainers."""

from __future__ import annotations

import torch


def class_argmax(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the largest value along the class axis (dim 1) of ``(B, K, *spatial)``, as ``x.argmax(1)``.

    Computed as ``x.max(1).indices``: same result (ties go to the first maximal class on the CPU), but on the CPU
    ``argmax`` over dim 1 of a channel-first tensor is about 20-35x slower in torch 2.14 (60 ms vs 1.7 ms for
    ``(8, 2, 160, 224)``; 77 ms vs 3.4 ms for ``(4, 3, 40, 56, 40)``), which was a tenth of a MEDL step on CPU.

    Returns:
        int64 ``(B, *spatial)``, or ``(B, 1, *spatial)`` with ``keepdim``.
    """
    return x.max(1, keepdim=keepdim).indices
