"""Running a 2D network on 3D patches slice by slice (M&N): reshapes, padding and chunking, as pure functions.

Conventions: volumes are ``(B, C, D, H, W)`` with ``D`` the first spatial axis, the one nnU-Net's ``2d``
configuration slices along (its plans' ``transpose_forward`` puts the out-of-plane, lowest-resolution axis
first); slices are ``(B * D, C, H, W)``, ordered sample-major (all slices of sample 0 first).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F


def volume_to_slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B * D, C, H, W)``; slice ``b * D + d`` is ``x[b, :, d]``."""
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    return x.movedim(2, 1).reshape(b * d, c, h, w)


def slices_to_volume(y: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`volume_to_slices`: ``(B * D, K, H, W)`` -> ``(B, K, D, H, W)``."""
    if y.ndim != 4 or y.shape[0] % batch:
        raise ValueError(f"cannot restack {tuple(y.shape)} slices into {batch} volumes")
    n, k, h, w = y.shape
    return y.reshape(batch, n // batch, k, h, w).movedim(1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad the last two axes of ``(N, C, H, W)`` at their end up to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` to crop back to (``y[..., :H, :W]``).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int,
            checkpoint: bool = False) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of at most ``chunk`` along dim 0, concatenated: bounds peak memory.

    Without gradients only one chunk's activations exist at a time. With gradients and ``checkpoint=True``, each
    chunk is recomputed in the backward pass (``torch.utils.checkpoint``), so the stored activations are one
    chunk's plus the outputs, instead of every slice's.
    """
    if chunk <= 0 or x.shape[0] <= chunk:
        return fn(x)
    parts = []
    for piece in torch.split(x, chunk):
        if checkpoint and torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(fn, piece, use_reentrant=False))
        else:
            parts.append(fn(piece))
    return torch.cat(parts)
