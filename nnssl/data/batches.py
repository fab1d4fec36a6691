"""Which labeled samples of nnU-Net's batch a semi-supervised step keeps.

nnU-Net's loader forces foreground in the *last* samples of each batch: sample ``j`` is forced when
``j >= round(B (1 - oversample_foreground_percent))`` (``nnUNetDataLoader._oversample_last_XX_percent``; with
B = 2 and the default 0.33, the second sample). A step that uses only ``n < B`` labeled samples (LRG sampling, a
method pairing labeled with unlabeled samples) must not simply keep the first ``n``: the first unlabeled sample
drawn would remove the guaranteed-foreground patch. These pure functions keep the forced share instead,
rounded up so that a batch that had a forced sample keeps one.
"""

from __future__ import annotations

import math
from typing import List


def forced_foreground_count(batch_size: int, oversample_percent: float, probabilistic: bool, n_kept: int) -> int:
    """Forced-foreground samples among ``n_kept`` of a batch of ``batch_size`` (``n_kept <= batch_size``).

    With ``n_kept = batch_size``: nnU-Net's count ``B - round(B (1 - p))``; otherwise that share of ``n_kept``,
    rounded up (``ceil(n_kept * count / B)``). With probabilistic oversampling no position is forced (each sample
    is forced with probability ``p``, so any subset keeps the share in expectation): 0.
    """
    if not 0 <= n_kept <= batch_size:
        raise ValueError(f"n_kept must lie in 0..{batch_size}, got {n_kept}")
    if probabilistic:
        return 0
    forced = batch_size - round(batch_size * (1 - oversample_percent))
    if n_kept == batch_size:
        return forced
    return min(forced, n_kept, math.ceil(n_kept * forced / batch_size))


def labeled_subset(batch_size: int, n_forced: int, n: int) -> List[int]:
    """Indices of ``n`` samples of a batch whose last ``n_forced`` samples are forced foreground, keeping the
    forced share (:func:`forced_foreground_count`'s rounding): the first non-forced ones, then the last forced
    ones; in batch order.

    >>> labeled_subset(2, 1, 1)
    [1]
    >>> labeled_subset(8, 3, 4)
    [0, 1, 6, 7]
    """
    if not (0 <= n <= batch_size and 0 <= n_forced <= batch_size):
        raise ValueError(f"need 0 <= n, n_forced <= batch_size = {batch_size}, got n = {n}, n_forced = {n_forced}")
    k = n_forced if n == batch_size else min(n_forced, n, math.ceil(n * n_forced / batch_size))
    return list(range(n - k)) + list(range(batch_size - k, batch_size))
