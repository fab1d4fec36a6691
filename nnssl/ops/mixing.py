"""Copy-paste mixing (BCP) and a strong intensity view, for 2D and 3D batches (pseudo-labels:
:mod:`nnssl.ops.pseudo_labels`).

Conventions (pure functions): images are ``(B, C, *spatial)``, segmentations ``(B, 1, *spatial)`` class indices,
box masks ``(1, 1, *spatial)`` or ``(B, 1, *spatial)`` floats that are 1 inside the box and 0 outside (note: BCP's
code calls ``M`` the complement, 1 outside its zero box). ``spatial`` has 2 or 3 axes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def box_mask(spatial_shape: Sequence[int], box_fraction: float = 2.0 / 3.0,
             generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """One box of side ``int(box_fraction * size)`` on every axis at a uniformly random position (BCP).

    BCP: ``int(2/3 * size)`` per axis (ACDC 170 x 170 in 256 x 256, LA 74 x 74 x 53 in 112 x 112 x 80), one box
    shared by the whole batch.

    Returns:
        ``(1, 1, *spatial_shape)`` float32 mask, 1 inside the box.
    """
    if not 0.0 < box_fraction <= 1.0:
        raise ValueError(f"box_fraction must lie in (0, 1], got {box_fraction}")
    mask = torch.zeros((1, 1, *spatial_shape), dtype=torch.float32, device=device)
    index = [slice(None), slice(None)]
    for size in spatial_shape:
        side = max(1, int(box_fraction * size))
        start = int(torch.randint(0, size - side + 1, (1,), generator=generator).item())
        index.append(slice(start, start + side))
    mask[tuple(index)] = 1.0
    return mask


def copy_paste(source: torch.Tensor, destination: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``source`` inside the mask, ``destination`` outside: ``source * mask + destination * (1 - mask)``.

    Works for images (float) and segmentations (integer; the result keeps ``destination``'s dtype). ``mask`` is
    0/1 and broadcasts against both.
    """
    if source.shape != destination.shape:
        raise ValueError(f"source {tuple(source.shape)} and destination {tuple(destination.shape)} differ")
    m = mask.to(torch.bool)
    return torch.where(m, source, destination)


def swap_boxes(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exchange the masked region of ``a`` and ``b``: an involution (swapping twice gives ``a, b`` back)."""
    return copy_paste(b, a, mask), copy_paste(a, b, mask)


def bcp_mix(x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, y_u: torch.Tensor, mask: torch.Tensor,
            n_in: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional copy-paste between labeled and unlabeled samples (BCP), pair by pair.

    Pair ``i`` is ``(x_l[i], x_u[i])``. The first ``n_in`` pairs ("inward", BCP's ``X_in``) paste the labeled
    sample's box into the unlabeled sample; the others ("outward", ``X_out``) paste the unlabeled sample's box
    into the labeled one. Targets are mixed the same way from ``y_l`` (ground truth) and ``y_u`` (pseudo-labels).
    BCP draws its inward and outward pairs from two halves of the batch; ``n_in = ceil(B / 2)`` by default does
    the same.

    Args:
        x_l, x_u: ``(B, C, *spatial)`` labeled and unlabeled images.
        y_l, y_u: ``(B, 1, *spatial)`` ground truth of ``x_l`` and pseudo-labels of ``x_u``.
        mask: ``(1 or B, 1, *spatial)`` box mask, 1 inside the box.
        n_in: number of inward pairs (0..B).

    Returns:
        ``(images, targets, labeled_region)``: ``(B, C, *spatial)``, ``(B, 1, *spatial)`` and a
        ``(B, 1, *spatial)`` float map that is 1 where the target is ground truth.
    """
    n = x_l.shape[0]
    if x_u.shape != x_l.shape or y_l.shape[0] != n or y_u.shape != y_l.shape:
        raise ValueError(f"bcp_mix needs pairs of equal shapes, got x_l {tuple(x_l.shape)}, x_u {tuple(x_u.shape)}, "
                         f"y_l {tuple(y_l.shape)}, y_u {tuple(y_u.shape)}")
    n_in = (n + 1) // 2 if n_in is None else n_in
    if not 0 <= n_in <= n:
        raise ValueError(f"n_in must lie in [0, {n}], got {n_in}")
    inward = torch.zeros((n,) + (1,) * (x_l.ndim - 1), dtype=torch.bool, device=x_l.device)
    inward[:n_in] = True
    box = mask.to(torch.bool).expand(n, 1, *x_l.shape[2:])
    # inward: labeled inside the box; outward: labeled outside the box
    labeled_region = torch.where(inward, box, ~box)
    images = torch.where(labeled_region, x_l, x_u)
    targets = torch.where(labeled_region, y_l, y_u)
    return images, targets, labeled_region.float()


def strong_intensity_view(x: torch.Tensor, contrast_range: Tuple[float, float] = (0.75, 1.25),
                          noise_std: float = 0.1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A strongly perturbed copy of ``x`` with the same geometry (so the same targets hold).

    Per sample and channel: contrast ``(x - mean) * c + mean`` with ``c ~ U(contrast_range)``, then additive
    Gaussian noise of std ``noise_std`` (nnU-Net's images are z-scored, so the unit is the image's std).
    """
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    device = generator.device if generator is not None else x.device  # draw on the GPU when x is there
    lo, hi = contrast_range
    c = (lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)).to(x.device, x.dtype)
    mean = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    noise = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
    return (x - mean) * c + mean + noise_std * noise
