"""Segmentation losses: voxel-weighted Dice + CE, the copy-paste mix loss, cross pseudo-supervision, soft targets.

Conventions (pure functions, 2D and 3D): ``log_probs`` are ``(B, K, *spatial)`` log class probabilities
(``torch.log_softmax(logits, 1)`` for softmax networks), ``logits`` raw network outputs of that shape; targets are
class indices ``(B, *spatial)`` or ``(B, 1, *spatial)``; voxel weights are ``(B, 1, *spatial)`` and are detached.
Everything is computed in float32 (safe under fp16 autocast). The Dice is nnU-Net's: soft, over the foreground
classes ``k >= 1``, summed over the batch ("batch Dice"), without squares in the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnssl.ops.tensors import class_argmax

_EPS = 1e-8


def _prepare(log_probs: torch.Tensor, target: torch.Tensor, voxel_weight):
    log_probs = log_probs.float()
    if target.ndim == log_probs.ndim:
        target = target[:, 0]
    if target.shape != log_probs.shape[:1] + log_probs.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match log_probs {tuple(log_probs.shape)}")
    w = torch.ones_like(log_probs[:, :1]) if voxel_weight is None else voxel_weight.detach().float()
    return log_probs, target.long(), w


def soft_dice_loss(log_probs: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor = None,
                   smooth: float = 1e-5, include_background: bool = False) -> torch.Tensor:
    """``1 - mean_k (2 sum w p_k y_k + s) / (sum w (p_k + y_k) + s)`` over the foreground classes ``k >= 1``
    (every class ``k >= 0`` with ``include_background``, as SSL4MIS' and ABD's ``DiceLoss``).

    Voxels of weight 0 do not count at all (a masked Dice); a class absent from target and prediction in the
    weighted region scores Dice 1 (loss 0) thanks to ``smooth``.

    Returns:
        scalar float32 loss in [0, 1].
    """
    log_probs, target, w = _prepare(log_probs, target, voxel_weight)
    first = 0 if include_background else 1
    p = log_probs.exp()[:, first:]
    y = F.one_hot(target, log_probs.shape[1]).movedim(-1, 1).float()[:, first:]
    axes = [0] + list(range(2, p.ndim))
    intersection = (w * p * y).sum(axes)
    denominator = (w * (p + y)).sum(axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()


def weighted_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor,
                           voxel_weight: torch.Tensor = None) -> torch.Tensor:
    """``sum(w * -log p_y) / sum(w)``: the cross-entropy averaged over the weighted region (0 if it is empty)."""
    log_probs, target, w = _prepare(log_probs, target, voxel_weight)
    return -(log_probs.gather(1, target[:, None]) * w).sum() / w.sum().clamp_min(_EPS)


def weighted_dice_ce(log_probs: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor = None,
                     smooth: float = 1e-5) -> torch.Tensor:
    """Voxel-weighted cross-entropy plus soft Dice loss (foreground classes, batch Dice), each in [0, ...).

    ``CE = sum(w * -log p_y) / sum(w)``; ``Dice loss = 1 - mean_k (2 sum w p_k y_k + s) / (sum w (p_k + y_k) + s)``
    over the foreground classes k >= 1. With ``w = 1`` it is the usual Dice + CE.

    Args:
        log_probs: ``(B, K, *spatial)`` log class probabilities.
        target: class indices ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        voxel_weight: optional ``(B, 1, *spatial)`` weights (detached inside).

    Returns:
        scalar float32 loss.
    """
    return (weighted_cross_entropy(log_probs, target, voxel_weight)
            + soft_dice_loss(log_probs, target, voxel_weight, smooth))


def mix_loss(logits: torch.Tensor, target: torch.Tensor, labeled_region: torch.Tensor, labeled_weight: float = 1.0,
             pseudo_weight: float = 0.5) -> torch.Tensor:
    """BCP's loss on copy-paste mixed images: Dice + CE on each region, the two regions weighted separately.

    ``labeled_weight * DiceCE|_{labeled region} + pseudo_weight * DiceCE|_{pseudo-labeled region}``, where each
    DiceCE is :func:`weighted_dice_ce` restricted to its region (BCP ``mix_loss``: labeled voxels weight 1,
    pseudo-labeled voxels ``u_weight = 0.5``).

    Args:
        logits: ``(B, K, *spatial)`` raw outputs for the mixed images.
        target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` mixed target (ground truth in the labeled region,
            pseudo-labels elsewhere).
        labeled_region: ``(B, 1, *spatial)``, 1 where ``target`` is ground truth, 0 where it is a pseudo-label.
        labeled_weight, pseudo_weight: the two regions' weights.

    Returns:
        scalar float32 loss.
    """
    log_probs = torch.log_softmax(logits.float(), 1)
    region = labeled_region.detach().float()
    total = torch.zeros((), device=logits.device)
    if labeled_weight:
        total = total + labeled_weight * weighted_dice_ce(log_probs, target, region)
    if pseudo_weight:
        total = total + pseudo_weight * weighted_dice_ce(log_probs, target, 1.0 - region)
    return total


def cps_dice_loss(logits: torch.Tensor, other_logits: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """Cross pseudo-supervision term of ``logits``' network: soft Dice against the other network's argmax.

    ``soft_dice_loss(log_softmax(logits), argmax(other_logits), include_background=...)``; the other network is
    detached, so the gradient reaches ``logits``' network only (use it twice, with the roles swapped, for both
    directions). ABD uses Dice only for its cross pseudo-supervision, averaged over all classes including the
    background (``include_background = True``).
    """
    if logits.shape != other_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and other logits {tuple(other_logits.shape)} differ")
    pseudo = class_argmax(other_logits.detach())
    return soft_dice_loss(torch.log_softmax(logits.float(), 1), pseudo, include_background=include_background)


def soft_target_dice_kl(logits: torch.Tensor, target_probs: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Dice + KL of a network against another network's soft prediction (M&N's pseudo-mask loss).

    ``Dice = 1 - mean_k (2 sum p_k t_k + s) / (sum (p_k + t_k) + s)`` over the foreground classes ``k >= 1``
    (batch Dice, as :func:`soft_dice_loss` with soft targets) and ``KL = mean_voxels sum_k t_k (log t_k - log p_k)``
    with ``p = softmax(logits)``. KL is 0 at ``p = t`` (the soft Dice is lowest there only for one-hot ``t``);
    gradients reach ``logits`` only.

    Args:
        logits: ``(B, K, *spatial)`` raw outputs of the learning network.
        target_probs: ``(B, K, *spatial)`` class probabilities of the teaching network (detached inside).

    Returns:
        scalar float32 loss.
    """
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target probabilities {tuple(target_probs.shape)} differ")
    log_p = torch.log_softmax(logits.float(), 1)
    t = target_probs.detach().float()
    p = log_p.exp()[:, 1:]
    axes = [0] + list(range(2, log_p.ndim))
    dice = (2.0 * (p * t[:, 1:]).sum(axes) + smooth) / ((p + t[:, 1:]).sum(axes) + smooth)
    kl = (t * (torch.log(t.clamp_min(_EPS)) - log_p)).sum(1).mean()
    return (1.0 - dice.mean()) + kl
