"""Running a 2D network on 3D patches slice by slice (M&N): reshapes, padding and chunking.

Conventions: volumes are ``(B, C, D, H, W)`` with ``D`` the first spatial axis, the one nnU-Net's ``2d``
configuration slices along (its plans' ``transpose_forward`` puts the out-of-plane, lowest-resolution axis
first); slices are ``(B * D, C, H, W)``, ordered sample-major (all slices of sample 0 first).

Chunks may be gradient-checkpointed; the recomputation in the backward pass then leaves BatchNorm running
statistics as a plain (uncheckpointed) step leaves them (:func:`running_stats_restored`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


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


def _norm_layers_tracking(module: nn.Module) -> List[_NormBase]:
    """The normalisation layers of ``module`` that update running statistics in a forward now (BatchNorm and
    InstanceNorm with ``track_running_stats``, in train mode; subclasses such as timm's ``BatchNormAct2d``
    included)."""
    return [m for m in module.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]


@contextlib.contextmanager
def running_stats_restored(module: nn.Module) -> Iterator[None]:
    """Run a block in train mode as usual, then put back the running statistics ``module``'s normalisation layers
    had before it: ``running_mean``, ``running_var`` (``(C,)`` each) and ``num_batches_tracked`` (scalar).

    Inside the block nothing changes: the layers normalise with the batch's statistics and update their buffers in
    place, so the autograd graph (which saves the running buffers of ``F.batch_norm``) is the one of a plain
    forward, as non-reentrant checkpointing requires; the buffers are restored on exit, also when the block raises
    (checkpoint stops a recomputation early with an exception). In train mode the backward of batch norm does not
    read the running buffers, so restoring them changes no gradient.
    """
    saved = [(buf, buf.detach().clone()) for m in _norm_layers_tracking(module)
             for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _owning_module(fn: Callable) -> Optional[nn.Module]:
    """``fn`` itself when it is a module, the module of a bound method (``net.forward_slices``), else None."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int,
            checkpoint: bool = False, module: Optional[nn.Module] = None) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of at most ``chunk`` along dim 0, concatenated: bounds peak memory.

    Without gradients only one chunk's activations exist at a time. With gradients and ``checkpoint=True``, each
    chunk is recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant), so the stored activations
    are one chunk's plus the outputs, instead of every slice's.

    The recomputation runs ``fn`` in train mode a second time; left alone, every BatchNorm layer would update its
    running statistics twice per chunk (and count the chunk twice in ``num_batches_tracked``). It therefore runs
    under :func:`running_stats_restored`: the same batch statistics (so the same outputs and gradients as a plain
    step), and the running statistics as the original forward left them. ``torch.utils.checkpoint`` itself replays
    the RNG state (dropout masks).

    Args:
        fn: maps a chunk ``(n, ...)`` to ``(n, ...)``, e.g. a 2D network on ``(n, C, H, W)`` slices.
        x: ``(N, ...)``; split along dim 0.
        chunk: at most this many rows per call; ``<= 0`` or ``>= N``: one call on all of ``x``.
        checkpoint: recompute each chunk in the backward pass (only while gradients are enabled).
        module: the module whose normalisation layers ``fn`` runs; default ``fn`` itself when it is a module, or
            the module of a bound method such as ``net.forward_slices``.

    Returns:
        ``(N, ...)``: the chunks' outputs concatenated along dim 0.

    Raises:
        ValueError: when a chunk would be checkpointed and no module is given or can be found from ``fn``.
    """
    if chunk <= 0 or x.shape[0] <= chunk:
        return fn(x)
    checkpointing = checkpoint and torch.is_grad_enabled()
    owner = module if module is not None else _owning_module(fn)
    if checkpointing and owner is None:
        raise ValueError("checkpointed chunks need the module that fn runs (module=...), so that its BatchNorm "
                         "layers do not update their running statistics again in the recomputation")

    def contexts():  # (original forward, recomputation in backward)
        return contextlib.nullcontext(), running_stats_restored(owner)

    parts = []
    for piece in torch.split(x, chunk):
        if checkpointing:
            parts.append(torch.utils.checkpoint.checkpoint(fn, piece, use_reentrant=False, context_fn=contexts))
        else:
            parts.append(fn(piece))
    return torch.cat(parts)
