"""Consistency losses between two predictions of the same unlabeled input.

Shapes: logits are ``(B, C, *spatial)`` with 2 or 3 spatial dimensions; C is the number of classes (softmax) and
the loss is a scalar. Computations run in float32 whatever the input dtype (safe under fp16 autocast).
"""

from __future__ import annotations

import torch


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(student_logits.shape)}")


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the softmax probabilities (Mean Teacher's consistency).

    ``mean((softmax(s) - softmax(t))^2)`` over batch, classes and voxels, as SSL4MIS ``softmax_mse_loss``
    followed by ``torch.mean``. The teacher is detached inside: gradients reach the student only.

    Args:
        student_logits: ``(B, C, *spatial)`` logits of the student.
        teacher_logits: ``(B, C, *spatial)`` logits of the teacher, same shape.

    Returns:
        Scalar float32 tensor; 0 when both softmaxes agree.

    Raises:
        ValueError: on mismatched or non-image shapes.
    """
    _check_pair(student_logits, teacher_logits)
    p_s = torch.softmax(student_logits.float(), dim=1)
    p_t = torch.softmax(teacher_logits.detach().float(), dim=1)
    return torch.mean((p_s - p_t) ** 2)
