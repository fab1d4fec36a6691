"""Two segmentation networks as one module (what ``network_weights`` holds and ``nnUNetv2_predict`` loads).

The pair's ``forward`` combines the two networks' logits into logits (softmax inference applies); inside
:meth:`NetworkPair.both_outputs` it returns both networks' raw outputs instead (training). Combine rules take two
logits tensors ``(B, K, *spatial)`` and return logits of the same shape, in float32.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from nnssl.losses.evidential import expected_log_probs

_LOG_2 = math.log(2.0)


def mean_probabilities_of_logits(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``log(0.5 * (softmax(a) + softmax(b)))``: logits whose softmax is the mean of the two networks' softmax
    probabilities. Computed as a stable ``logaddexp`` of log-softmaxes, in float32."""
    return torch.logaddexp(torch.log_softmax(logits_a.float(), 1), torch.log_softmax(logits_b.float(), 1)) - _LOG_2


def evidential_mean(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``log(0.5 * (alpha_a / S_a + alpha_b / S_b))`` with ``alpha = softplus(logits) + 1``, ``S = sum_k alpha_k``:
    logits whose softmax is the mean of the two networks' expected Dirichlet class probabilities (MEDL's
    inference), in float32."""
    return torch.log(0.5 * (expected_log_probs(logits_a).exp() + expected_log_probs(logits_b).exp()))


class NetworkPair(nn.Module):
    """Two networks ``net_a`` and ``net_b`` applied to the same input, as one module.

    ``forward(x)`` returns ``combine(out_a, out_b)``: one logits tensor ``(B, K, *spatial)``, or, when the
    networks return deep-supervision lists, a list with ``combine`` applied per resolution (highest first).
    Inside ``with pair.both_outputs():`` it returns the raw outputs ``(out_a, out_b)`` instead.

    ``combine`` should be a module-level function (e.g. :func:`mean_probabilities_of_logits`,
    :func:`evidential_mean`) so that the pair pickles; it is not part of the state dict, whose keys are
    ``net_a.*`` and ``net_b.*``.
    """

    def __init__(self, net_a: nn.Module, net_b: nn.Module,
                 combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mean_probabilities_of_logits):
        super().__init__()
        if not callable(combine):
            raise TypeError(f"combine must be callable, got {type(combine).__name__}")
        self.net_a = net_a
        self.net_b = net_b
        self.combine = combine
        self._return_both = False

    @contextmanager
    def both_outputs(self) -> Iterator["NetworkPair"]:
        """Inside the block ``forward`` returns ``(out_a, out_b)``; the previous behaviour is restored after, also
        when the block raises. Works when the pair is called through DDP or ``torch.compile`` wrappers (the
        compiled graph guards on the switch)."""
        previous = self._return_both
        self._return_both = True
        try:
            yield self
        finally:
            self._return_both = previous

    def forward(self, x: torch.Tensor):
        out_a, out_b = self.net_a(x), self.net_b(x)
        if self._return_both:
            return out_a, out_b
        if isinstance(out_a, (list, tuple)):
            if not isinstance(out_b, (list, tuple)) or len(out_a) != len(out_b):
                raise ValueError("net_a and net_b must both return one tensor or lists of the same length "
                                 "(same deep supervision)")
            return [self.combine(a, b) for a, b in zip(out_a, out_b)]
        return self.combine(out_a, out_b)
