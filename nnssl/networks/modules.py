"""Small helpers around ``nn.Module``: the plain module behind training wrappers, and a temporary eval mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

from torch import nn


def unwrap_network(module: nn.Module) -> Tuple[nn.Module, bool]:
    """The plain module behind ``DistributedDataParallel`` and/or ``torch.compile`` wrappers (in any order, any
    depth), and whether a ``torch.compile`` wrapper (``OptimizedModule``) was among them."""
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = False
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, OptimizedModule):
            module, compiled = module._orig_mod, True
        else:
            return module, compiled


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (dropout off, norms on running statistics), back to its previous
    mode after, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
