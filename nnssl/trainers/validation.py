"""Validation of a method's other networks (teachers, second students, 2D networks) beside the deployed one.

Each network of ``validation_networks()`` runs nnU-Net's own ``validation_step`` on the same validation batches
as ``self.network`` (the module swapped in, the targets copied because nnU-Net edits them in place); its
pseudo-Dice (hard Dice over the epoch's validation patches, mean over foreground classes) is logged per epoch as
``val_dice_<name>`` and drawn beside nnU-Net's in progress.png, so which network to deploy can be decided on
validation data.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from nnssl.trainers.progress import VAL_DICE, VAL_DICE_PREFIX


class _AsDeepSupervisionOutputs(nn.Module):
    """Presents a network to nnU-Net's ``validation_step`` as one with deep supervision: a single output tensor
    (e.g. M&N's 2D network) becomes a one-element list, of which nnU-Net uses the first element anyway."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        out = self.module(x)
        return out if isinstance(out, (list, tuple)) else [out]


class OtherNetworksValidation:
    """Mixin for an ``nnUNetTrainer`` subclass: validates :meth:`validation_networks` beside ``self.network``
    while ``self.validate_other_networks`` is True."""

    def validation_networks(self) -> Dict[str, nn.Module]:
        """Name -> module taking ``self.network``'s input and returning logits at the patch's resolution (one
        tensor, or a list with the highest resolution first). Default: none."""
        return {}

    def _validated_networks(self) -> Dict[str, nn.Module]:
        return self.validation_networks() if self.validate_other_networks else {}

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        for module in self._validated_networks().values():
            module.eval()

    def validation_step(self, batch: dict) -> dict:
        extra = self._validated_networks()
        if not extra:
            return super().validation_step(batch)
        target = batch["target"]
        results = {}
        network = self.network
        try:
            for name, module in extra.items():
                self.network = _AsDeepSupervisionOutputs(module) if self.enable_deep_supervision else module
                copied = [t.clone() for t in target] if isinstance(target, list) else target.clone()
                results[name] = super().validation_step({**batch, "target": copied})
        finally:
            self.network = network
        out = super().validation_step(batch)
        for name, r in results.items():
            for key in ("tp_hard", "fp_hard", "fn_hard"):
                out[f"{name}_{key}"] = r[key]
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        parts = []
        for name in self._validated_networks():
            counts = []
            for key in ("tp_hard", "fp_hard", "fn_hard"):
                total = np.sum([o[f"{name}_{key}"] for o in val_outputs], 0)
                if self.is_ddp:
                    gathered = [None] * dist.get_world_size()
                    dist.all_gather_object(gathered, total)
                    total = np.sum(gathered, 0)
                counts.append(total)
            with np.errstate(divide="ignore", invalid="ignore"):
                dice = float(np.nanmean([2 * tp / (2 * tp + fp + fn) for tp, fp, fn in zip(*counts)]))
            key = VAL_DICE_PREFIX + name
            self.logger.local_logger.register(key, self.current_epoch, VAL_DICE)
            self.logger.log(key, dice, self.current_epoch)
            parts.append(f"{name} {np.round(dice, 4)}")
        if parts:
            self.print_to_log_file("pseudo dice of the other networks: " + ", ".join(parts))
