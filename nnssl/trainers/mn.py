"""M&N: co-training nnU-Net's 3D network with a 2D network pretrained on natural images."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from nnssl.losses.segmentation import soft_target_dice_kl, weighted_dice_ce
from nnssl.networks.pretrained_2d import build_pretrained_2d_network
from nnssl.trainers.base import nnSSLTrainer

STAGES = ("warmup", "train_2d", "train_3d")


@contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode inside the block, back to its previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class nnSSL_MNTrainer(nnSSLTrainer):
    """M&N (Yeung, Ramesh, Lyu, Namburete, Rajapakse; "Semi-Supervised 3D Medical Segmentation from 2D Natural
    Images Pretrained Model", MLMI 2025, arXiv 2509.15167; code pakheiyeung/M-N).

    Idea: a 3D network trained from scratch (nnU-Net's, the deployed model) and a 2D network pretrained on natural
    images (run slice by slice) teach each other with soft pseudo-masks on unlabeled patches, in alternating epochs,
    while learning-rate-guided (LRG) sampling lets unlabeled samples take a growing share of each batch as the
    learning rate decays.

    Schedule (per nnU-Net epoch):

    1. warm-up, epochs ``< warmup_epochs``: both networks learn from labeled patches only (LRG draws none);
    2. then alternating blocks of ``mn_switch_every_epochs`` epochs, the 2D network first: the learning network
       gets labeled patches (3D: nnU-Net's Dice + CE with deep supervision; 2D: Dice + CE per slice) and unlabeled
       patches with the other network's softmax as soft target (:func:`soft_target_dice_kl`: Dice + KL), the other
       network frozen in eval mode. Each term is weighted by its share of the batch,
       ``(n_l L_sup + n_u L_pseudo) / B``, as in the authors' code where both kinds sit in one batch and the losses
       average over it. Only the learning network's optimizer steps.
    3. LRG sampling (base attributes ``lrg_sampling = True``, ``lrg_rule = "lr"``, ``lrg_start_epoch`` = end of the
       warm-up): ``floor((1 - lr / initial_lr) * B)`` of the plans' batch size ``B`` are unlabeled, the rest
       labeled; ``lrg_rule = "linear"`` gives the released code's epoch-linear rule.

    The 2D network slices along the first spatial axis of the preprocessed patch, the axis nnU-Net's own ``2d``
    configuration slices along (the plans' ``transpose_forward`` puts the out-of-plane axis first). Inference:
    the 3D network alone, through the stock ``nnUNetv2_predict`` (``network_weights`` is nnU-Net's network); the
    2D network, its optimizer and the stage counters are in the checkpoint under ``nnssl``. The 2D network's
    validation pseudo-Dice (slice by slice on nnU-Net's validation patches) is logged beside the 3D network's
    (``val_dice_net_2d``).

    Attributes:
        mn_warmup_fraction: share of ``num_epochs`` in the labeled-only warm-up (0.125 = the code's 500 of 4000).
        mn_warmup_epochs: the warm-up in epochs; None = from ``mn_warmup_fraction``.
        mn_switch_every_epochs: epochs per block of the alternation (1, the code's ``freq_switch``).
        mn_2d_architecture: segmentation-models-pytorch architecture (``"Segformer"``, the paper's model).
        mn_2d_encoder: its encoder (``"mit_b2"``: SegFormer-B2's Mix Transformer, the paper's backbone).
        mn_2d_encoder_weights: the library's pretrained weights to load (``"imagenet"``); None = random.
        mn_2d_weights_file: local weights file (whole smp model or encoder state dict), used instead of the
            download; None = ``$NNSSL_MN_2D_WEIGHTS`` if set.
        mn_2d_lr: AdamW learning rate of the 2D network (1e-3, the code's), poly-decayed like nnU-Net's.
        mn_2d_weight_decay: AdamW weight decay (1e-2, PyTorch's default that the code uses).
        mn_slice_chunk: slices per 2D forward pass (64); bounds the 2D network's memory on a 3D patch.
        mn_slice_checkpoint: gradient checkpointing per chunk while the 2D network learns (True).
        and the base's ``unsup_weight`` (1.0: the code sums the terms unweighted), ``lrg_*``.

    Deviations from the paper / released code, and why:

    - The 3D network, its optimizer (SGD, Nesterov 0.99, poly from 1e-2), augmentation, patch and batch are
      nnU-Net's plans, not the code's 3D U-Net with AdamW 1e-4 and cosine restarts: nnssl compares methods on
      nnU-Net's footing. The 2D network's AdamW keeps the code's rate with nnU-Net's poly decay instead of the
      code's linear warm-up + cosine restarts.
    - Labeled loss: nnU-Net's Dice + CE (deep supervision for the 3D network) instead of Dice + KL against the
      one-hot mask (the same minimiser; KL against a one-hot target is CE). The KL against soft targets sums over
      classes and averages over voxels (``nn.KLDivLoss(reduction='mean')`` also divides by the class count).
    - The paper's LRG equation could not be read (only the abstract's description, "adjusts the proportion of
      labeled and unlabeled data in each training batch to align with the models' prediction accuracy and
      stability", was available); ``"lr"`` implements that description literally with the deployed network's
      learning rate. The released code's rule is ``lrg_rule = "linear"``.
    - 2D model: SegFormer-B2's encoder with ImageNet weights through segmentation-models-pytorch and its SegFormer
      decoder, fully fine-tuned; the paper fine-tunes HF's ADE20K SegFormer-B2 with LoRA adapters (the released
      code: peft, r = 64, alpha = 64, dropout 0.1 on the attention query/key/value and dense layers, layer norms
      and all biases trained). LoRA is not implemented yet: over a frozen randomly initialised encoder (all a
      machine without weights can have) it would only cripple the 2D network. Grey inputs are repeated to 3
      channels (as the code).
    - The code predicts pseudo-masks of all unlabeled volumes at stage transitions only to bias its patch
      sampling; nnU-Net samples unlabeled patches uniformly, so these are not computed.
    - Both networks' learning rates follow the shared epoch count (the code keeps an epoch counter per network).
    - Region-based training, ignore labels and 2D configurations raise a clear error.
    """

    HYPERPARAMETERS = nnSSLTrainer.HYPERPARAMETERS + (
        "mn_warmup_fraction", "mn_warmup_epochs", "mn_switch_every_epochs", "mn_2d_architecture", "mn_2d_encoder",
        "mn_2d_encoder_weights", "mn_2d_weights_file", "mn_2d_lr", "mn_2d_weight_decay", "mn_slice_chunk",
        "mn_slice_checkpoint")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_weight = 1.0
        self.unsup_rampup_shape = "none"  # LRG sampling replaces the ramp-up
        self.lrg_sampling = True
        self.lrg_rule = "lr"
        self.lrg_start_epoch: Optional[int] = None  # None = the end of the warm-up
        self.mn_warmup_fraction = 0.125
        self.mn_warmup_epochs: Optional[int] = None
        self.mn_switch_every_epochs = 1
        self.mn_2d_architecture = "Segformer"
        self.mn_2d_encoder = "mit_b2"
        self.mn_2d_encoder_weights: Optional[str] = "imagenet"
        self.mn_2d_weights_file: Optional[str] = None
        self.mn_2d_lr = 1e-3
        self.mn_2d_weight_decay = 1e-2
        self.mn_slice_chunk = 64
        self.mn_slice_checkpoint = True
        self.net_2d = None
        self.mn_2d_weights_description = None
        self.epochs_trained = {"2d": 0, "3d": 0}  # epochs in which each network learned (checkpointed)

    # ------------------------------------------------------------------ networks
    def build_ssl_modules(self) -> None:
        if len(self.configuration_manager.patch_size) != 3:
            raise RuntimeError(f"{type(self).__name__} co-trains a 3D network with a 2D network run slice by slice; "
                               f"configuration {self.configuration_name!r} is 2D: use 3d_fullres (or 3d_lowres)")
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(f"{type(self).__name__} needs plain class labels: region-based training and ignore "
                               f"labels are not supported (soft pseudo-masks are softmax distributions)")
        if self.mn_warmup_epochs is None:
            self.mn_warmup_epochs = int(round(self.mn_warmup_fraction * self.num_epochs))
        if self.lrg_start_epoch is None:
            self.lrg_start_epoch = self.mn_warmup_epochs
        net_2d, self.mn_2d_weights_description = build_pretrained_2d_network(
            self.mn_2d_architecture, self.mn_2d_encoder, self.label_manager.num_segmentation_heads,
            self.num_input_channels, self.mn_2d_encoder_weights, self.mn_2d_weights_file, self.mn_slice_chunk,
            self.mn_slice_checkpoint)
        self.net_2d = self.register_ssl_module("net_2d", net_2d)
        optimizer = torch.optim.AdamW(self.net_2d.parameters(), self.mn_2d_lr, weight_decay=self.mn_2d_weight_decay)
        self.register_ssl_optimizer("net_2d", optimizer, PolyLRScheduler(optimizer, self.mn_2d_lr, self.num_epochs))
        self.print_to_log_file(f"M&N 2D network: {self.mn_2d_architecture} / {self.mn_2d_encoder}, "
                               f"{sum(p.numel() for p in self.net_2d.parameters()) / 1e6:.1f} M parameters, "
                               f"weights: {self.mn_2d_weights_description}")

    # ------------------------------------------------------------------ schedule
    def stage(self, epoch: Optional[int] = None) -> str:
        """``"warmup"``, ``"train_2d"`` or ``"train_3d"`` for ``epoch`` (default: the current one)."""
        e = self.current_epoch if epoch is None else epoch
        if e < self.mn_warmup_epochs:
            return "warmup"
        block = (e - self.mn_warmup_epochs) // max(1, int(self.mn_switch_every_epochs))
        return "train_2d" if block % 2 == 0 else "train_3d"

    def optimizers_to_step(self) -> List[torch.optim.Optimizer]:
        stage = self.stage()
        if stage == "warmup":
            return [self.optimizer, self.ssl_optimizers["net_2d"]]
        return [self.ssl_optimizers["net_2d"]] if stage == "train_2d" else [self.optimizer]

    def validation_networks(self):
        return {"net_2d": self.net_2d}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.print_to_log_file(f"M&N stage: {self.stage()}")

    def on_train_epoch_end(self, train_outputs):
        stage = self.stage()
        for net in ("2d", "3d"):
            if stage in ("warmup", "train_" + net):
                self.epochs_trained[net] += 1
        super().on_train_epoch_end(train_outputs)

    def ssl_extra_state(self) -> dict:
        return {"warmup_epochs": self.mn_warmup_epochs, "lrg_start_epoch": self.lrg_start_epoch,
                "epochs_trained": dict(self.epochs_trained)}

    def load_ssl_extra_state(self, state: dict) -> None:
        if state:  # the stage boundaries of the run being resumed, whatever the budget now
            self.mn_warmup_epochs = int(state["warmup_epochs"])
            self.lrg_start_epoch = int(state["lrg_start_epoch"])
            self.epochs_trained = dict(state["epochs_trained"])

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def soft_prediction(self, network: nn.Module, data: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K, *patch)`` of ``network`` (eval mode, no gradient, highest resolution)."""
        with evaluating(network):
            out = network(data)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return torch.softmax(out.float(), 1)

    def labeled_2d_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + CE of the 2D network's slice-wise logits ``(B, K, *patch)`` against the labels."""
        return weighted_dice_ce(torch.log_softmax(logits.float(), 1), target)

    def compute_loss(self, data_l, target_l, data_u):
        n_l, n_u = data_l.shape[0], data_u.shape[0]
        b = n_l + n_u
        target_top = target_l[0] if isinstance(target_l, list) else target_l
        zero = torch.zeros((), device=self.device)
        stage = self.stage()
        weight = self.current_unsup_weight()
        if stage == "warmup":
            sup_3d = self.loss(self.network(data_l), target_l) if n_l else zero
            sup_2d = self.labeled_2d_loss(self.net_2d(data_l), target_top) if n_l else zero
            terms = {"sup_loss": sup_3d, "sup_2d_loss": sup_2d}
            return sup_3d + sup_2d, terms
        if stage == "train_3d":
            target_u = self.soft_prediction(self.net_2d, data_u) if n_u else None
            out_l, out_u = self.forward_student(data_l, data_u)
            sup = self.loss(out_l, target_l) if n_l else zero
            pseudo = self.ds_loss(lambda o: soft_target_dice_kl(o, target_u), out_u) if n_u else zero
            terms: Dict[str, torch.Tensor] = {"sup_loss": sup, "pseudo_3d_loss": pseudo}
        else:
            target_u = self.soft_prediction(self.network, data_u) if n_u else None
            out = self.net_2d(torch.cat((data_l, data_u)) if n_u else data_l)
            sup = self.labeled_2d_loss(out[:n_l], target_top) if n_l else zero
            pseudo = soft_target_dice_kl(out[n_l:], target_u) if n_u else zero
            terms = {"sup_2d_loss": sup, "pseudo_2d_loss": pseudo}
        total = (n_l * sup + n_u * weight * pseudo) / b
        return total, {**terms, "unsup_weight": weight}
