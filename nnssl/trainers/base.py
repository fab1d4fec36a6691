"""``nnSSLTrainer``: the one base of every nnssl trainer.

It is an ``nnUNetTrainer`` (same constructor signature, plans, augmentation, validation, checkpoints and final
validation) that also owns, once, everything semi-supervised methods share:

- the unlabeled pool and loader (:mod:`nnssl.data.unlabeled`): same augmentation as the labeled loader,
  nnU-Net's background workers, shut down with the others; no label ever leaves it;
- batch composition: ``batch_composition()`` returns the (labeled, unlabeled) sample counts of the next step,
  from the plans' batch size and :attr:`unlabeled_batch_size` by default; with :attr:`lrg_sampling` on, the
  plans' batch is split between labeled and unlabeled samples by learning-rate-guided sampling
  (:func:`nnssl.schedules.lrg_unlabeled_share`), fixed per epoch and logged; a method may change the
  proportion per step;
- the ramp-up of the unlabeled weight (:attr:`unsup_weight`, :attr:`unsup_rampup_epochs`,
  :attr:`unsup_rampup_shape`), evaluated per iteration;
- extra networks and optimizers (``register_ssl_module`` / ``register_ssl_optimizer``), e.g. an EMA teacher
  made with ``make_ema_copy``: moved to the device, switched with deep supervision, and checkpointed; every
  registered optimizer is stepped with ``self.optimizer`` (clipping, grad scaler) and its scheduler per epoch;
- checkpoints with all extra state under the key ``"nnssl"``, so ``--c`` resumes teachers, extra networks,
  their optimizers and the step counter, while ``network_weights`` stays what ``nnUNetv2_predict`` loads;
- per-epoch logging of every term a method returns (nnU-Net's logger, and a panel in progress.png);
- the deep-supervision policy: unlabeled terms use the highest-resolution output unless
  :attr:`ssl_deep_supervision` is True, then every output with nnU-Net's deep-supervision weights (``ds_loss``);
- the CPU and CUDA paths of nnU-Net's ``train_step`` (autocast and GradScaler on CUDA only; ``torch.compile``
  where nnU-Net compiles, teachers included).

A method overrides named seams: ``build_ssl_modules`` (extra networks), ``unsupervised_loss`` (its unlabeled
term), ``after_optimizer_step`` (EMA and the like), ``on_ssl_train_start`` (state that depends on the final
student weights), ``batch_composition``, ``optimizers_to_step`` (e.g. alternating co-training),
``ssl_extra_state``/``load_ssl_extra_state`` (a method's own counters in the checkpoint), ``validation_networks``
(extra networks whose validation pseudo-Dice is logged beside the deployed one's), and ``compute_loss`` when it
needs more than one student forward pass.
Hyperparameters are attributes set in ``__init__``; list them in ``HYPERPARAMETERS`` to have them logged.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnssl.data.unlabeled import UnlabeledDataLoader, UnlabeledPool
from nnssl.schedules import LRG_RULES, lrg_batch_split, lrg_unlabeled_share, rampup
from nnssl.trainers.progress import VAL_DICE_PREFIX, SSLLocalLogger
from nnssl.utils import UNLABELED_MANIFEST, preprocessing_fingerprint, unlabeled_preprocessed_folder


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DDP and/or ``torch.compile`` wrappers."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


class _AsDeepSupervisionOutputs(nn.Module):
    """Presents a network to nnU-Net's ``validation_step`` as one with deep supervision: a single output tensor
    (e.g. M&N's 2D network) becomes a one-element list, of which nnU-Net uses the first element anyway."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        out = self.module(x)
        return out if isinstance(out, (list, tuple)) else [out]


def _parameters(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class nnSSLTrainer(nnUNetTrainer):
    """Base trainer of nnssl (not meant to be trained itself: it has no unlabeled term).

    Attributes (hyperparameters shared by all methods):
        unlabeled_batch_size: unlabeled patches per step; None = the plans' batch size (the literature's
            two-stream batches hold as many unlabeled as labeled samples).
        unsup_weight: maximum weight of the unlabeled term.
        unsup_rampup_epochs: length of the weight's ramp-up in epochs; None = ``unsup_rampup_fraction`` of the
            whole training (``num_epochs``), so that the ramp follows any run length.
        unsup_rampup_fraction: share of ``num_epochs`` the ramp spans when ``unsup_rampup_epochs`` is None (1.0:
            the whole training, the literature's choice: SSL4MIS ramps over its whole iteration budget).
        unsup_rampup_shape: ``"sigmoid"`` (exp(-5(1-t)^2)), ``"linear"``, ``"cosine"`` or ``"none"``.
        ssl_deep_supervision: apply unlabeled terms to every deep-supervision output (nnU-Net's weights)
            instead of the highest-resolution one only.
        unlabeled_num_workers: background workers of the unlabeled loader; None = as many as nnU-Net uses for
            the labeled loader (``nnUNet_n_proc_DA``).
        lrg_sampling: learning-rate-guided sampling (M&N): each epoch, the plans' batch size is split into
            ``floor(share * B)`` unlabeled and the rest labeled samples (total unchanged), ``share`` following
            :attr:`lrg_rule`; off (False) = labeled and unlabeled streams of fixed sizes.
        lrg_rule: ``"lr"`` (share = 1 - lr / initial_lr of the main optimizer, the paper's description) or
            ``"linear"`` (share rising linearly in epochs from :attr:`lrg_start_epoch` to the end, the authors'
            released code).
        lrg_start_epoch: epochs before this one draw labeled samples only.
        validate_other_networks: also validate the method's other networks (``validation_networks``: teachers,
            second students) on nnU-Net's validation patches each epoch and log their pseudo-Dice as
            ``val_dice_<name>`` (True; one extra forward pass per network and validation batch).
    """

    HYPERPARAMETERS: Tuple[str, ...] = ("unlabeled_batch_size", "unsup_weight", "unsup_rampup_epochs",
                                        "unsup_rampup_fraction", "unsup_rampup_shape", "ssl_deep_supervision",
                                        "lrg_sampling", "lrg_rule", "lrg_start_epoch", "validate_other_networks")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_batch_size: Optional[int] = None
        self.unsup_weight = 1.0
        self.unsup_rampup_epochs: Optional[float] = None
        self.unsup_rampup_fraction = 1.0
        self.unsup_rampup_shape = "sigmoid"
        self.ssl_deep_supervision = False
        self.unlabeled_num_workers: Optional[int] = None
        self.lrg_sampling = False
        self.lrg_rule = "lr"
        self.lrg_start_epoch = 0
        self.lrg_unlabeled_share_now = 0.0  # this epoch's LRG share (set in on_train_epoch_start)
        self.validate_other_networks = True

        self.global_step = 0  # optimizer steps taken; checkpointed
        self.ssl_modules: Dict[str, nn.Module] = {}
        self.ssl_optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.ssl_lr_schedulers: Dict[str, object] = {}
        self.dataloader_unlabeled = None
        self.unlabeled_pool: Optional[UnlabeledPool] = None
        self._ssl_state_loaded = False
        ssl_logger = SSLLocalLogger(self.logger.local_logger.verbose)
        ssl_logger.my_fantastic_logging = self.logger.local_logger.my_fantastic_logging
        self.logger.local_logger = ssl_logger

    # ------------------------------------------------------------------ seams for methods
    def build_ssl_modules(self) -> None:
        """Build extra networks (teachers, second students) and register them. Called by ``initialize``."""

    def on_ssl_train_start(self, resumed: bool) -> None:
        """Called when training starts, after ``-pretrained_weights`` were loaded into the student.

        Args:
            resumed: True when the extra state came from a checkpoint (``--c``); then leave it as it is.
        """

    def unsupervised_loss(self, data_u: torch.Tensor, student_out_u) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The method's unlabeled term (before the ramp-up weight) and extra values to log.

        Args:
            data_u: ``(n_u, C, *patch)`` augmented unlabeled patches on the device.
            student_out_u: the student's outputs for them (a list under deep supervision, highest resolution
                first); use :meth:`ds_loss` to apply the deep-supervision policy.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no unlabeled term; train a method trainer "
                                  f"such as nnSSL_MeanTeacherTrainer")

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (``self.global_step`` is the index of that step), e.g. EMA."""

    def batch_composition(self) -> Tuple[int, int]:
        """(labeled, unlabeled) samples of the next step; at most the loaders' batch sizes.

        Default: both loaders' full batches, or with :attr:`lrg_sampling` this epoch's LRG split of the plans'
        batch size.
        """
        if self.lrg_sampling:
            return lrg_batch_split(self.batch_size, self.lrg_unlabeled_share_now, self.unlabeled_batch_size_per_rank)
        return self.batch_size, self.unlabeled_batch_size_per_rank

    def optimizers_to_step(self) -> List[torch.optim.Optimizer]:
        """The optimizers zeroed and stepped this iteration: ``self.optimizer`` and every registered one. A method
        that trains only some networks in a step (alternating co-training) returns those."""
        return [self.optimizer, *self.ssl_optimizers.values()]

    def ssl_extra_state(self) -> dict:
        """A method's own state to checkpoint (picklable), e.g. stage counters; restored by
        :meth:`load_ssl_extra_state` on ``--c``."""
        return {}

    def load_ssl_extra_state(self, state: dict) -> None:
        """Restore what :meth:`ssl_extra_state` returned."""

    def validation_networks(self) -> Dict[str, nn.Module]:
        """Extra networks validated beside ``self.network`` on the same validation batches every epoch.

        Name -> module taking ``self.network``'s input and returning logits at the patch's resolution (one tensor,
        or a list with the highest resolution first), e.g. an EMA teacher, a second student or a 2D network run
        slice by slice. Each one's pseudo-Dice (nnU-Net's online validation: hard Dice over the
        epoch's validation patches, mean over foreground classes) is logged per epoch as ``val_dice_<name>`` and
        drawn beside nnU-Net's pseudo-Dice in progress.png, so which network to deploy can be decided on
        validation data. Only used while :attr:`validate_other_networks` is True. Default: none.
        """
        return {}

    def _validated_networks(self) -> Dict[str, nn.Module]:
        return self.validation_networks() if self.validate_other_networks else {}

    def compute_loss(self, data_l: torch.Tensor, target_l, data_u: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss of one step and the terms to log (runs inside autocast on CUDA).

        Default: one student forward pass over labeled and unlabeled patches together (nnU-Net's networks use
        instance normalisation, so samples do not interact), nnU-Net's supervised loss on the labeled part and
        ``unsup_weight`` (ramped) times :meth:`unsupervised_loss` on the unlabeled part.
        """
        out_l, out_u = self.forward_student(data_l, data_u)
        zero = torch.zeros((), device=self.device)
        sup = self.loss(out_l, target_l) if data_l.shape[0] > 0 else zero
        terms: Dict[str, torch.Tensor] = {}
        if data_u.shape[0] > 0:
            unsup, terms = self.unsupervised_loss(data_u, out_u)
        else:
            unsup = zero
        weight = self.current_unsup_weight()
        total = sup + weight * unsup
        terms = {"sup_loss": sup, "unsup_loss": unsup, "unsup_weight": weight, **terms}
        return total, terms

    # ------------------------------------------------------------------ helpers for methods
    @property
    def unwrapped_network(self) -> nn.Module:
        return unwrap(self.network)

    def register_ssl_module(self, name: str, module: nn.Module) -> nn.Module:
        """Register an extra network: moved to the device, checkpointed, switched with deep supervision."""
        module = module.to(self.device)
        self.ssl_modules[name] = module
        return module

    def register_ssl_optimizer(self, name: str, optimizer: torch.optim.Optimizer,
                               lr_scheduler=None) -> torch.optim.Optimizer:
        """Register an extra optimizer: zeroed, stepped (with clipping and the grad scaler) after every backward
        pass like ``self.optimizer``, and checkpointed. Its ``lr_scheduler`` is stepped per epoch like nnU-Net's
        (``scheduler.step(current_epoch)``; as in nnU-Net its state is recomputed from the epoch, not saved)."""
        self.ssl_optimizers[name] = optimizer
        if lr_scheduler is not None:
            self.ssl_lr_schedulers[name] = lr_scheduler
        return optimizer

    def make_ema_copy(self) -> nn.Module:
        """A frozen copy of the student for an EMA teacher (compiled where nnU-Net compiles the student)."""
        teacher = copy.deepcopy(self.unwrapped_network)
        teacher.requires_grad_(False)
        if self._do_i_compile():
            teacher = torch.compile(teacher)
        return teacher

    def forward_student(self, data_l: torch.Tensor, data_u: torch.Tensor):
        """Student outputs for labeled and unlabeled patches from one forward pass, split back."""
        n_l = data_l.shape[0]
        out = self.network(torch.cat((data_l, data_u)) if data_u.shape[0] else data_l)
        if isinstance(out, (list, tuple)):
            return [o[:n_l] for o in out], [o[n_l:] for o in out]
        return out[:n_l], out[n_l:]

    def ds_loss(self, fn: Callable[..., torch.Tensor], *outputs) -> torch.Tensor:
        """Apply ``fn`` to corresponding outputs under the deep-supervision policy.

        Each of ``outputs`` is a tensor or a deep-supervision list (highest resolution first). Without deep
        supervision or with ``ssl_deep_supervision = False``: ``fn`` of the highest-resolution outputs. Otherwise
        the sum over resolutions weighted like nnU-Net's supervised loss (weights 1/2^i, lowest 0, normalised).
        """
        if not isinstance(outputs[0], (list, tuple)):
            return fn(*outputs)
        if not self.ssl_deep_supervision:
            return fn(*(o[0] for o in outputs))
        weights = self.loss.weight_factors
        total = 0.0
        for i, w in enumerate(weights):
            if w != 0:
                total = total + w * fn(*(o[i] for o in outputs))
        return total

    def current_unsup_weight(self) -> float:
        """``unsup_weight`` times the ramp-up at the current iteration."""
        epochs = (self.unsup_rampup_fraction * self.num_epochs if self.unsup_rampup_epochs is None
                  else self.unsup_rampup_epochs)
        return self.unsup_weight * rampup(self.unsup_rampup_shape, self.global_step,
                                          epochs * self.num_iterations_per_epoch)

    def ssl_hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    # ------------------------------------------------------------------ nnU-Net lifecycle
    def initialize(self):
        if self.is_cascaded:
            raise RuntimeError(f"{type(self).__name__}: cascaded configurations are not supported by nnssl "
                               f"(unlabeled images have no previous-stage segmentation)")
        super().initialize()
        global_u = self.configuration_manager.batch_size if self.unlabeled_batch_size is None \
            else int(self.unlabeled_batch_size)
        if global_u < 0:
            raise ValueError(f"unlabeled_batch_size must be >= 0, got {global_u}")
        if self.lrg_sampling and self.lrg_rule not in LRG_RULES:
            raise ValueError(f"lrg_rule must be one of {LRG_RULES}, got {self.lrg_rule!r}")
        if self.is_ddp:
            world, rank = dist.get_world_size(), dist.get_rank()
            self.unlabeled_batch_size_per_rank = global_u // world + int(rank < global_u % world)
        else:
            self.unlabeled_batch_size_per_rank = global_u
        self.build_ssl_modules()
        self.logger.update_config({"nnssl": self.ssl_hyperparameters()})

    def set_deep_supervision_enabled(self, enabled: bool):
        """Switch deep supervision in the network and every extra network, wherever a submodule has the flag
        (nnU-Net's decoders; also inside wrappers holding several networks)."""
        for module in (self.network, *self.ssl_modules.values()):
            for m in unwrap(module).modules():
                if hasattr(m, "deep_supervision"):
                    m.deep_supervision = enabled

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        # find the unlabeled images before nnU-Net starts its workers, so a missing pool is a clear error
        self.unlabeled_pool = self.get_unlabeled_pool()
        super().on_train_start()
        self.print_to_log_file(f"nnssl: {len(self.unlabeled_pool)} unlabeled images; hyperparameters "
                               f"{self.ssl_hyperparameters()}")
        self.on_ssl_train_start(resumed=self._ssl_state_loaded)
        self.dataloader_unlabeled = self.get_unlabeled_dataloader(self.unlabeled_pool)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
            old_stdout = sys.stdout
            with open(os.devnull, "w") as f:
                sys.stdout = f
                self.dataloader_unlabeled._finish()
                sys.stdout = old_stdout
        self.dataloader_unlabeled = None

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # nnU-Net sets this epoch's learning rate
        for scheduler in self.ssl_lr_schedulers.values():
            scheduler.step(self.current_epoch)
        if self.lrg_sampling:
            self.lrg_unlabeled_share_now = lrg_unlabeled_share(
                self.lrg_rule, lr=self.optimizer.param_groups[0]["lr"], max_lr=self.initial_lr,
                epoch=self.current_epoch, start_epoch=self.lrg_start_epoch or 0, num_epochs=self.num_epochs)
            n_l, n_u = self.batch_composition()
            self.print_to_log_file(f"LRG sampling ({self.lrg_rule}): unlabeled share "
                                   f"{self.lrg_unlabeled_share_now:.3f}, {n_l} labeled + {n_u} unlabeled per step")
        for module in self.ssl_modules.values():
            module.train()

    def train_step(self, batch: dict) -> dict:
        n_l, n_u = self.batch_composition()
        if not (0 <= n_l <= self.batch_size and 0 <= n_u <= self.unlabeled_batch_size_per_rank and n_l + n_u > 0):
            raise ValueError(f"batch_composition() returned ({n_l}, {n_u}); allowed: 0..{self.batch_size} "
                             f"labeled, 0..{self.unlabeled_batch_size_per_rank} unlabeled, not both 0")
        data_l = batch["data"][:n_l].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target_l = [t[:n_l].to(self.device, non_blocking=True) for t in target]
        else:
            target_l = target[:n_l].to(self.device, non_blocking=True)
        if n_u > 0:
            data_u = next(self.dataloader_unlabeled)["data"][:n_u].to(self.device, non_blocking=True)
        else:
            data_u = data_l[:0]

        optimizers = self.optimizers_to_step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss, terms = self.compute_loss(data_l, target_l, data_u)

        # nnU-Net's step (gradient norm clipped at 12), for each optimizer over its own parameters
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for optimizer in optimizers:
                self.grad_scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(_parameters(optimizer), 12)
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
            skipped = 0  # the GradScaler skips steps with non-finite gradients itself
        else:
            loss.backward()
            skipped = 0
            for optimizer in optimizers:
                norm = torch.nn.utils.clip_grad_norm_(_parameters(optimizer), 12)
                if torch.isfinite(norm):
                    optimizer.step()
                else:  # as the GradScaler does: one bad batch must not turn the weights into NaN for good
                    skipped += 1
        self.after_optimizer_step()
        self.global_step += 1

        out = {"loss": loss.detach().cpu().numpy(), "n_labeled": float(n_l), "n_unlabeled": float(n_u),
               "n_nonfinite_grad_skips": float(skipped)}
        if self.lrg_sampling:
            out["lrg_unlabeled_share"] = self.lrg_unlabeled_share_now
        for k, v in terms.items():
            out[k] = float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v)
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        for key in train_outputs[0]:
            if key == "loss":
                continue
            value = float(np.mean([o[key] for o in train_outputs]))
            if self.is_ddp:
                values = [None] * dist.get_world_size()
                dist.all_gather_object(values, value)
                value = float(np.mean(values))
            self.logger.local_logger.register(key, self.current_epoch)
            self.logger.log(key, value, self.current_epoch)
        parts = [f"{k} {np.round(float(np.mean([o[k] for o in train_outputs])), 4)}"
                 for k in train_outputs[0] if k != "loss"]
        self.print_to_log_file("ssl: " + ", ".join(parts))

    # ------------------------------------------------------------------ validation of extra networks
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        for module in self._validated_networks().values():
            module.eval()

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step for ``self.network``, then for each of :meth:`validation_networks` (nnU-Net's
        own step with the module swapped in, on a copy of the targets, which nnU-Net edits in place)."""
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
            self.logger.local_logger.register(key, self.current_epoch)
            self.logger.log(key, dice, self.current_epoch)
            parts.append(f"{name} {np.round(dice, 4)}")
        if parts:
            self.print_to_log_file("pseudo dice of the other networks: " + ", ".join(parts))

    # ------------------------------------------------------------------ unlabeled data
    def get_unlabeled_pool(self) -> UnlabeledPool:
        """The fold's hidden-label training cases plus every image of ``nnssl_preprocess_unlabeled``.

        Raises:
            RuntimeError: when the pool is empty, the split is inconsistent, or the unlabeled data was made
                with other plans; the message says what to run.
        """
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        datasets = []
        hidden = self._hidden_label_cases()
        if hidden:
            datasets.append(self.dataset_class(self.preprocessed_dataset_folder, hidden))
        folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                               self.configuration_manager.data_identifier)
        manifest_file = join(folder, UNLABELED_MANIFEST)
        if isfile(manifest_file):
            manifest = load_json(manifest_file)
            expected = preprocessing_fingerprint(self.plans_manager.plans, self.configuration_manager.configuration)
            if manifest.get("preprocessing_fingerprint") != expected:
                raise RuntimeError(f"the unlabeled images in {folder} were preprocessed with other plans "
                                   f"({manifest.get('plans_name')}); run nnssl_preprocess_unlabeled -d "
                                   f"{self.plans_manager.dataset_name} -c {self.configuration_name} -p "
                                   f"{self.plans_manager.plans_name} --overwrite")
            cases = sorted(manifest.get("cases", {}))
            if cases:
                datasets.append(nnUNetDatasetBlosc2(folder, cases))  # what nnssl_preprocess_unlabeled writes
        if not datasets:
            raise RuntimeError(
                f"{type(self).__name__} needs unlabeled images and found none for fold {self.fold}: the fold in "
                f"splits_final.json has no 'unlabeled' cases and {folder} holds no preprocessed images. Run "
                f"'nnssl_preprocess_unlabeled -d {self.plans_manager.dataset_name} -c {self.configuration_name}' "
                f"(images in $nnUNet_raw/{self.plans_manager.dataset_name}/imagesUnlabeled) and/or "
                f"'nnssl_make_split -d {self.plans_manager.dataset_name} --labeled N'. To train on labeled data "
                f"only, use nnUNetTrainer.")
        return UnlabeledPool(datasets)

    def _hidden_label_cases(self) -> List[str]:
        """The fold's ``unlabeled`` list of splits_final.json (training cases whose labels are hidden)."""
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold == "all" or not isfile(splits_file):
            return []
        splits = load_json(splits_file)
        if self.fold >= len(splits):
            return []
        fold = splits[self.fold]
        hidden = list(fold.get("unlabeled", []))
        leaked = sorted(set(hidden) & (set(fold["train"]) | set(fold["val"])))
        if leaked:
            raise RuntimeError(f"splits_final.json fold {self.fold}: cases {leaked[:5]} are both 'unlabeled' and "
                               f"train/val; remake the split with nnssl_make_split --force")
        available = set(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        missing = sorted(set(hidden) - available)
        if missing:
            raise RuntimeError(f"splits_final.json fold {self.fold} lists unlabeled cases that are not "
                               f"preprocessed in {self.preprocessed_dataset_folder}: {missing[:5]}")
        return hidden

    def get_unlabeled_dataloader(self, pool: UnlabeledPool):
        """nnU-Net's augmentation and worker setup for the unlabeled pool (no segmentation targets)."""
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = UnlabeledDataLoader(pool, max(1, self.unlabeled_batch_size_per_rank), initial_patch_size,
                                     patch_size, self.label_manager, transforms=transforms)
        n = get_allowed_n_proc_DA() if self.unlabeled_num_workers is None else int(self.unlabeled_num_workers)
        if n == 0:
            gen = SingleThreadedAugmenter(loader, None)
        else:
            gen = NonDetMultiThreadedAugmenter(loader, None, num_processes=n, num_cached=max(6, n // 2),
                                               seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        return gen

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnssl": {
                "global_step": self.global_step,
                "modules": {k: unwrap(m).state_dict() for k, m in self.ssl_modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.ssl_optimizers.items()},
                "hyperparameters": self.ssl_hyperparameters(),
                "extra": self.ssl_extra_state(),
            },
        }
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's restore (accepting a path or a loaded dict) plus the ``"nnssl"`` state."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        else:
            checkpoint = filename_or_checkpoint
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.unwrapped_network.load_state_dict(state)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

        ssl = checkpoint.get("nnssl")
        if ssl is None:
            self.print_to_log_file("WARNING: this checkpoint has no nnssl state (not written by an nnssl trainer); "
                                   "extra networks start from the student and the step counter from the epoch")
            self.global_step = self.current_epoch * self.num_iterations_per_epoch
            return
        self.global_step = int(ssl["global_step"])
        for name, module in self.ssl_modules.items():
            if name not in ssl["modules"]:
                raise RuntimeError(f"checkpoint has no state for the extra network {name!r}")
            unwrap(module).load_state_dict(ssl["modules"][name])
        for name, optimizer in self.ssl_optimizers.items():
            if name not in ssl["optimizers"]:
                raise RuntimeError(f"checkpoint has no state for the extra optimizer {name!r}")
            optimizer.load_state_dict(ssl["optimizers"][name])
        self.load_ssl_extra_state(ssl.get("extra", {}))
        self._ssl_state_loaded = True
