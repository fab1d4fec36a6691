"""A 2D network pretrained on natural images, applied to 3D patches slice by slice (M&N's 2D model).

Built with segmentation-models-pytorch (``pip install 'nnssl[mn]'``), whose encoders (timm, MiT/SegFormer, ResNet,
...) load their natural-image weights through the library itself. Where the machine has no internet, a local
weights file (attribute or ``NNSSL_MN_2D_WEIGHTS``) is loaded instead; with neither, a warning and random
initialisation.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from nnssl.ops.slices import chunked, pad_to_multiple, slices_to_volume, volume_to_slices

WEIGHTS_ENV = "NNSSL_MN_2D_WEIGHTS"


class SliceWise2DNetwork(nn.Module):
    """A 2D segmentation network run on every slice of ``(B, C, D, H, W)`` patches along ``D``.

    Inputs of 1 channel are repeated to the 3 that natural-image encoders expect (M&N's ``'repeat'``); other
    channel counts than 1 and 3 go through a learned 1x1 convolution initialised to the channel mean. Slices are
    zero-padded to multiples of ``pad_multiple`` (the encoder's output stride) and cropped back, and run in chunks
    of ``chunk_slices`` (with gradient checkpointing while training when ``checkpoint``) so that memory is bounded
    by a chunk, not by the number of slices.

    ``forward`` returns logits ``(B, K, D, H, W)`` for 5D inputs and ``(N, K, H, W)`` for 4D ones.
    """

    def __init__(self, net_2d: nn.Module, in_channels: int, pad_multiple: int = 32, chunk_slices: int = 64,
                 checkpoint: bool = True):
        super().__init__()
        self.net_2d = net_2d
        self.in_channels = in_channels
        self.pad_multiple = pad_multiple
        self.chunk_slices = chunk_slices
        self.checkpoint = checkpoint
        self.adapter = None
        if in_channels not in (1, 3):
            self.adapter = nn.Conv2d(in_channels, 3, 1, bias=False)
            nn.init.constant_(self.adapter.weight, 1.0 / in_channels)

    def forward_slices(self, s: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            s = self.adapter(s)
        elif self.in_channels == 1:
            s = s.expand(-1, 3, -1, -1)
        s, (h, w) = pad_to_multiple(s, self.pad_multiple)
        return self.net_2d(s)[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn: Callable = self.forward_slices
        if x.ndim == 4:
            return chunked(fn, x, self.chunk_slices, self.checkpoint and self.training)
        y = chunked(fn, volume_to_slices(x), self.chunk_slices, self.checkpoint and self.training)
        return slices_to_volume(y, x.shape[0])


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise RuntimeError("nnSSL_MNTrainer's 2D network needs segmentation-models-pytorch: "
                           "pip install 'nnssl[mn]'") from e
    return smp


def load_local_weights(model: nn.Module, path: str) -> str:
    """Load a local file into an smp model: a whole-model state dict, or the encoder's alone.

    Tensors whose name and shape match are loaded (a segmentation head for another number of classes is skipped);
    a file that matches none of the encoder's tensors is an error.

    Returns:
        a one-line description of what was loaded.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    enc_keys = model.encoder.state_dict()
    full_keys = model.state_dict()
    as_encoder = {k: v for k, v in state.items() if k in enc_keys and enc_keys[k].shape == v.shape}
    as_model = {k: v for k, v in state.items() if k in full_keys and full_keys[k].shape == v.shape}
    encoder_in_model = sum(k.startswith("encoder.") for k in as_model)
    if len(as_encoder) >= encoder_in_model and as_encoder:
        nn.Module.load_state_dict(model.encoder, as_encoder, strict=False)  # smp's MiT overrides it
        loaded, part = len(as_encoder), "encoder"
    elif encoder_in_model:
        model.load_state_dict(as_model, strict=False)
        loaded, part = len(as_model), "model"
    else:
        raise ValueError(f"{path} holds no tensor of this encoder ({len(state)} tensors, e.g. "
                         f"{list(state)[:3]}); give the weights of the encoder named in mn_2d_encoder")
    return f"local file {path}: {loaded} of {len(enc_keys) if part == 'encoder' else len(full_keys)} {part} tensors"


def _random_model(smp, architecture: str, kwargs: dict) -> nn.Module:
    """A randomly initialised smp model whose normalisation biases are not all zero.

    The libraries initialise every bias to zero. An all-zero slice (nnU-Net pads patches with 0 after z-scoring)
    then stays exactly zero through a transformer encoder such as MiT, and each LayerNorm's backward at a
    zero-variance input multiplies the gradient by ``1 / sqrt(eps)`` (1000 for MiT's 1e-6): after MiT-B2's dozens
    of LayerNorms the gradient overflows to NaN. Small random LayerNorm/GroupNorm biases (N(0, 0.02)) break the
    chain of zeros at the first normalisation. Pretrained weights have non-zero biases and are left alone.
    """
    model = smp.create_model(architecture, encoder_weights=None, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape) * 0.02)
    return model


def build_pretrained_2d_network(architecture: str, encoder: str, num_classes: int, in_channels: int,
                                encoder_weights: Optional[str] = "imagenet", weights_file: Optional[str] = None,
                                chunk_slices: int = 64, checkpoint: bool = True) -> Tuple[SliceWise2DNetwork, str]:
    """smp ``architecture`` with ``encoder`` and ``num_classes`` outputs, wrapped by :class:`SliceWise2DNetwork`.

    Weights, first that applies: ``weights_file`` (or ``$NNSSL_MN_2D_WEIGHTS``); the library's own
    ``encoder_weights`` (downloaded; needs internet or the library's cache); else random initialisation with a
    warning. Returns the network and a description of its weights (for the training log).
    """
    smp = _smp()
    weights_file = weights_file or os.environ.get(WEIGHTS_ENV) or None
    kwargs = dict(encoder_name=encoder, in_channels=3, classes=num_classes)
    if weights_file:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"2D weights file {weights_file} (mn_2d_weights_file / ${WEIGHTS_ENV}) not found")
        model = smp.create_model(architecture, encoder_weights=None, **kwargs)
        description = load_local_weights(model, weights_file)
    elif encoder_weights:
        try:
            model = smp.create_model(architecture, encoder_weights=encoder_weights, **kwargs)
            description = f"{encoder} '{encoder_weights}' weights from segmentation-models-pytorch"
        except Exception as e:  # no internet, no cache, unknown weights: train from scratch, loudly
            message = (f"could not load the {encoder} '{encoder_weights}' weights ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); the 2D network starts from RANDOM "
                       f"weights. Give a local weights file with ${WEIGHTS_ENV} or mn_2d_weights_file.")
            warnings.warn(message)
            model = _random_model(smp, architecture, kwargs)
            description = "random initialisation (WARNING: " + message + ")"
    else:
        model = _random_model(smp, architecture, kwargs)
        description = "random initialisation (mn_2d_encoder_weights = None)"
    stride = getattr(model.encoder, "output_stride", 32) or 32
    return SliceWise2DNetwork(model, in_channels, pad_multiple=int(stride), chunk_slices=chunk_slices,
                              checkpoint=checkpoint), description
