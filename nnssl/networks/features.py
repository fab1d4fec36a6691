"""Intermediate features of nnU-Net's U-Nets (the bottleneck and the last decoder stage), by forward hooks.

Works for the plans' networks of dynamic-network-architectures (``PlainConvUNet``, ``ResidualEncoderUNet``, and
any network with ``encoder.stages`` and ``decoder.stages``), also when called through ``torch.compile`` and/or
DDP wrappers. The hooks exist only inside the capture block; nothing is added to the module's parameters or
buffers: its state dict, checkpoints, what ``nnUNetv2_predict`` loads, and its outputs are unchanged.

Features (``B`` batch, ``patch`` the input's spatial shape, ``strides`` the plans' per-stage strides):

- ``"bottleneck"``: output of ``encoder.stages[-1]``, ``(B, features_per_stage[-1], *patch / prod(strides))``
  (the product over stages, per axis);
- ``"decoder"``: output of ``decoder.stages[-1]``, the highest-resolution decoder stage before its segmentation
  head (a 1x1 convolution to logits), ``(B, features_per_stage[0], *patch)`` (nnU-Net's first stride is 1).

Both are activations (after norm and nonlinearity), not logits or probabilities, in the forward pass's dtype
(fp16 under autocast), and they carry gradients.

Usage::

    with capture_features(network, ("bottleneck", "decoder")) as feats:
        logits = network(x)
    feats["bottleneck"], feats["decoder"]

    logits, feats = forward_with_features(network, x)

``torch.compile``: a compiled graph ignores hooks added after it was traced (torch does not guard on hooks, and a
graph traced for one instance serves every instance of the class). A capture on a compiled network therefore runs
inside ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6): that forward pass, and any other compiled code
run inside the block, runs eagerly; compiled calls outside the block are unaffected.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, Sequence, Tuple, Union

import torch
from torch import nn

from nnssl.networks.modules import unwrap_network

FEATURES = ("bottleneck", "decoder")


class CapturedFeatures(dict):
    """``{name: tensor}`` of one capture; a missing name raises a ``KeyError`` that says why."""

    def __init__(self, network_name: str):
        super().__init__()
        self.network_name = network_name

    def __missing__(self, name):
        raise KeyError(f"feature {name!r} of {self.network_name} was not captured: request it in the capture and "
                       f"call, inside the block, the module passed to capture_features (the compiled/DDP wrapper "
                       f"itself if that is what runs)")


class _Recorder:
    """Forward hook that writes its module's output into ``store[name]``."""

    def __init__(self, name: str, store: Dict[str, torch.Tensor]):
        self.name = name
        self.store = store

    def __call__(self, module, args, output):
        self.store[self.name] = output


def feature_modules(network: nn.Module) -> Dict[str, nn.Module]:
    """``{"bottleneck": encoder.stages[-1], "decoder": decoder.stages[-1]}`` of the (unwrapped) network.

    Raises:
        TypeError: the network has no non-empty ``encoder.stages`` and ``decoder.stages``.
    """
    net, _ = unwrap_network(network)
    encoder_stages = getattr(getattr(net, "encoder", None), "stages", None)
    decoder_stages = getattr(getattr(net, "decoder", None), "stages", None)
    if not all(isinstance(s, (nn.ModuleList, nn.Sequential)) and len(s) > 0
               for s in (encoder_stages, decoder_stages)):
        raise TypeError(f"{type(net).__name__} has no encoder.stages and decoder.stages: feature capture needs a "
                        f"U-Net of dynamic-network-architectures (PlainConvUNet, ResidualEncoderUNet); for a "
                        f"pair of networks capture each of them (pair.net_a, pair.net_b)")
    return {"bottleneck": encoder_stages[-1], "decoder": decoder_stages[-1]}


def _check_names(names: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in FEATURES]
    if unknown or not names:
        raise ValueError(f"feature names must be among {FEATURES}, got {names}")
    return names


def _eager_if(compiled: bool):
    if not compiled:
        return nullcontext()
    if not hasattr(torch.compiler, "set_stance"):
        raise RuntimeError(f"capturing features of a torch.compile'd network needs torch >= 2.6 (torch "
                           f"{torch.__version__} here); pass and call the uncompiled module, or set "
                           f"nnUNet_compile=f")
    return torch.compiler.set_stance("force_eager")


@contextmanager
def capture_features(network: nn.Module, names: Union[str, Sequence[str]] = FEATURES
                     ) -> Iterator[CapturedFeatures]:
    """Record the named features of every forward pass of ``network`` run inside the block (the last one wins).

    Args:
        network: the module that will be called (plain, compiled and/or DDP-wrapped).
        names: among ``"bottleneck"``, ``"decoder"`` (see the module docstring for shapes).

    Yields:
        a :class:`CapturedFeatures` dict, filled by the forward pass and still valid after the block. The hooks
        are removed after the block, also when it raises.

    Raises:
        TypeError: the network has no U-Net stages; ValueError: unknown names.
    """
    names = _check_names(names)
    net, compiled = unwrap_network(network)
    modules = feature_modules(net)
    feats = CapturedFeatures(type(net).__name__)
    handles = [modules[n].register_forward_hook(_Recorder(n, feats)) for n in names]
    try:
        with _eager_if(compiled):
            yield feats
    finally:
        for h in handles:
            h.remove()


def forward_with_features(network: nn.Module, x: torch.Tensor, names: Union[str, Sequence[str]] = FEATURES
                          ) -> Tuple[object, CapturedFeatures]:
    """``(network(x), features)``: the network's usual output (logits, or a deep-supervision list of logits,
    highest resolution first) and the named features of that forward pass (:func:`capture_features`)."""
    with capture_features(network, names) as feats:
        out = network(x)
    return out, feats
