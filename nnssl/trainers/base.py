"""``nnSSLTrainer``: the one base of every nnssl trainer.

It is an ``nnUNetTrainer`` (same constructor signature, plans, augmentation, validation, checkpoints and final
validation) that also owns, once, everything semi-supervised methods share:

- the unlabeled pool (:func:`nnssl.data.pool.find_unlabeled_pool`) and loader (:mod:`nnssl.data.unlabeled`):
  same augmentation as the labeled loader, nnU-Net's background workers, shut down with the others; no label
  ever leaves it;
- batch composition: ``batch_composition()`` returns the (labeled, unlabeled) sample counts of the next step,
  from the plans' batch size and :attr:`unlabeled_batch_size` by default; with :attr:`lrg_sampling` on, each
  sample of the plans' batch is unlabeled with this epoch's learning-rate-guided share
  (:func:`nnssl.schedules.lrg_unlabeled_share`, :func:`nnssl.schedules.lrg_batch_split`); the labeled samples
  kept always include nnU-Net's forced-foreground share (:func:`nnssl.data.batches.labeled_subset`);
- training progress (:meth:`training_progress`, 0..1 over the whole run: the one clock every schedule reads)
  and the ramp-up of the unlabeled weight (:attr:`unsup_weight`, :attr:`unsup_rampup_epochs`,
  :attr:`unsup_rampup_shape`), evaluated per iteration;
- EMA teachers (:meth:`add_ema_teacher`) and second networks with their own optimizer and schedule
  (:meth:`add_network`, :meth:`add_optimizer`): moved to the device, switched with deep supervision,
  checkpointed, validated;
- checkpoints (:mod:`nnssl.trainers.checkpoints`), written atomically, with all extra state under the key
  ``"nnssl"``, so ``--c`` resumes teachers, extra networks,
  their optimizers, the step counter, the random streams and the log's kinds, while ``network_weights`` stays
  what ``nnUNetv2_predict`` loads;
- seeding (:attr:`seed` or ``$nnssl_seed``; :mod:`nnssl.seeding`);
- the log schema (:class:`nnssl.trainers.progress.StepLog`): every step logs ``sup_loss``, ``unsup_loss``,
  ``unsup_weight`` and the method's extras by kind, per epoch in nnU-Net's logger and progress.png;
- the deep-supervision policy: unlabeled terms use the highest-resolution output unless
  :attr:`ssl_deep_supervision` is True, then every output with nnU-Net's deep-supervision weights (``ds_loss``);
- the CPU and CUDA paths of nnU-Net's ``train_step`` (autocast and GradScaler on CUDA only; ``torch.compile``
  where nnU-Net compiles, teachers included).

A method overrides named seams: ``build_ssl_modules`` (extra networks, through the helpers), either
``unsupervised_loss`` (its unlabeled term, one student forward pass) or ``compute_loss`` (the step seam for
methods with more than one forward pass; it uses the toolkit: :meth:`training_progress`, :meth:`top`,
:meth:`top_target`, :meth:`ds_loss`, :meth:`current_unsup_weight`, :meth:`step_log`), ``after_optimizer_step``,
``on_ssl_train_start`` (state that depends on the final student weights), ``batch_composition``,
``optimizers_to_step`` (e.g. alternating co-training), ``ssl_extra_state``/``load_ssl_extra_state`` (a method's
own counters in the checkpoint) and ``validation_networks`` (:mod:`nnssl.trainers.validation`).
Hyperparameters are declared once, as class attributes made with
:class:`nnssl.trainers.hyperparameters.hyperparameter`: default, logging and checkpoint in one line.
"""

from __future__ import annotations

import copy
import os
import sys
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import autocast, nn
from torch import distributed as dist
import torch.nn.functional as F

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnssl import seeding
from nnssl.data.batches import forced_foreground_count, labeled_subset
from nnssl.data.pool import find_unlabeled_pool
from nnssl.data.unlabeled import UnlabeledDataLoader, UnlabeledPool
from nnssl.ema import ema_decay_with_warmup, ema_update_
from nnssl.networks.modules import unwrap_network
from nnssl.schedules import LRG_RULES, lrg_batch_split, lrg_unlabeled_share, rampup
from nnssl.trainers.checkpoints import SSLCheckpoints
from nnssl.trainers.hyperparameters import hyperparameter, hyperparameters_of
from nnssl.trainers.progress import COUNT, LOSS, STEP_SCHEMA, SSLLocalLogger, StepLog
from nnssl.trainers.validation import OtherNetworksValidation


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DDP and/or ``torch.compile`` wrappers."""
    return unwrap_network(module)[0]


def _parameters(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class nnSSLTrainer(SSLCheckpoints, OtherNetworksValidation, nnUNetTrainer):
    """Base trainer of nnssl (not meant to be trained itself: it has no unlabeled term).

    Attributes (hyperparameters shared by all methods; see each declaration below):
        unlabeled_batch_size, unsup_weight, unsup_rampup_epochs, unsup_rampup_fraction, unsup_rampup_shape,
        ssl_deep_supervision, unlabeled_num_workers, lrg_sampling, lrg_rule, lrg_start_epoch,
        validate_other_networks, seed, max_consecutive_nonfinite_steps.
    """

    unlabeled_batch_size = hyperparameter(
        None, "unlabeled patches per step; None = the plans' batch size (the literature's two-stream batches hold "
              "as many unlabeled as labeled samples)")
    unsup_weight = hyperparameter(1.0, "maximum weight of the unlabeled term")
    unsup_rampup_epochs = hyperparameter(
        None, "length of the weight's ramp-up in epochs; None = unsup_rampup_fraction of the whole training")
    unsup_rampup_fraction = hyperparameter(
        1.0, "share of num_epochs the ramp spans when unsup_rampup_epochs is None (1.0: the whole training, "
             "SSL4MIS' choice)")
    unsup_rampup_shape = hyperparameter("sigmoid", "'sigmoid' (exp(-5(1-t)^2)), 'linear', 'cosine' or 'none'")
    ssl_deep_supervision = hyperparameter(
        False, "apply unlabeled terms to every deep-supervision output (nnU-Net's weights) instead of the "
               "highest-resolution one only")
    unlabeled_num_workers = hyperparameter(
        None, "background workers of the unlabeled loader; None = nnUNet_n_proc_DA, like the labeled loader")
    lrg_sampling = hyperparameter(
        False, "learning-rate-guided sampling (M&N): each sample of the plans' batch is unlabeled with this "
               "epoch's share (drawn per step); False = labeled and unlabeled streams of fixed sizes")
    lrg_rule = hyperparameter("lr", "'lr' (share = 1 - lr / initial_lr) or 'linear' (epoch-linear, M&N's code)")
    lrg_start_epoch = hyperparameter(0, "epochs before this one draw labeled samples only")
    validate_other_networks = hyperparameter(
        True, "also validate validation_networks() (teachers, second students) and log val_dice_<name>")
    seed = hyperparameter(
        None, "seed of torch, numpy, random, the LRG draws and the loaders' workers; None = $nnssl_seed, "
              "unset = unseeded (see nnssl.seeding for what stays non-deterministic)")
    max_consecutive_nonfinite_steps = hyperparameter(
        10, "consecutive steps skipped for a non-finite loss or gradient norm after which the run stops with an "
            "error (see train_step)")
    _nonfinite_streak: Tuple[Tuple[str, ...], ...] = ()  # what was non-finite in each skipped step of the streak

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lrg_unlabeled_share_now = 0.0  # this epoch's LRG share (set in on_train_epoch_start)
        self.global_step = 0  # optimizer steps taken; checkpointed
        self.ssl_modules: Dict[str, nn.Module] = {}
        self.ssl_optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.ssl_lr_schedulers: Dict[str, object] = {}
        self.ema_teachers: Dict[str, Tuple[Callable[[], nn.Module], float]] = {}  # name -> (source, decay)
        self.validated_modules: List[str] = []  # registered modules validated by default
        self.dataloader_unlabeled = None
        self.unlabeled_pool: Optional[UnlabeledPool] = None
        self.resolved_seed: Optional[int] = None
        self.batch_rng = np.random.default_rng()  # LRG draws; reseeded in initialize when seeded
        self._ssl_state_loaded = False
        ssl_logger = SSLLocalLogger(self.logger.local_logger.verbose)
        ssl_logger.my_fantastic_logging = self.logger.local_logger.my_fantastic_logging
        self.logger.local_logger = ssl_logger

    # ------------------------------------------------------------------ seams for methods
    def build_ssl_modules(self) -> None:
        """Build extra networks (teachers, second students) with :meth:`add_ema_teacher` / :meth:`add_network`.
        Called by ``initialize``."""

    def on_ssl_train_start(self, resumed: bool) -> None:
        """Called when training starts, after ``-pretrained_weights`` were loaded into the student and the EMA
        teachers were copied from it (unless resumed).

        Args:
            resumed: True when the extra state came from a checkpoint (``--c``); then leave it as it is.
        """

    def unsupervised_loss(self, data_u: torch.Tensor, student_out_u) -> Tuple[torch.Tensor, StepLog]:
        """The method's unlabeled term (before the ramp-up weight) and its extras to log (a :class:`StepLog`,
        or a plain dict whose values are logged as metrics).

        Args:
            data_u: ``(n_u, C, *patch)`` augmented unlabeled patches on the device.
            student_out_u: the student's outputs for them (a list under deep supervision, highest resolution
                first); use :meth:`ds_loss` to apply the deep-supervision policy.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no unlabeled term; train a method trainer "
                                  f"such as nnSSL_MeanTeacherTrainer")

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step and the EMA teachers' update (``self.global_step`` is the index of
        that step)."""

    def batch_composition(self) -> Tuple[int, int]:
        """(labeled, unlabeled) samples of the next step; at most the loaders' batch sizes. Called once per step.

        Default: both loaders' full batches, or with :attr:`lrg_sampling` this epoch's LRG share drawn per sample
        of the plans' batch size (capped by the unlabeled loader's batch).
        """
        if self.lrg_sampling:
            return lrg_batch_split(self.batch_size, self.lrg_unlabeled_share_now, self.unlabeled_batch_size_per_rank,
                                   rng=self.batch_rng)
        return self.batch_size, self.unlabeled_batch_size_per_rank

    def lrg_clock(self) -> Tuple[int, int]:
        """(epoch, epochs in all) that LRG's ``"linear"`` rule reads; default nnU-Net's epoch counter. A method
        that counts epochs per network returns the deployed network's."""
        return self.current_epoch, self.num_epochs

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
        """Extra networks validated beside ``self.network`` (see :mod:`nnssl.trainers.validation`). Default:
        the EMA teachers and networks registered with ``validate=True``."""
        return {name: self.ssl_modules[name] for name in self.validated_modules}

    def compute_loss(self, data_l: torch.Tensor, target_l, data_u: torch.Tensor) -> Tuple[torch.Tensor, StepLog]:
        """The step seam: total loss of one step and its :class:`StepLog` (runs inside autocast on CUDA).

        Default: one student forward pass over labeled and unlabeled patches together (nnU-Net's networks use
        instance normalisation, so samples do not interact), nnU-Net's supervised loss on the labeled part and
        ``unsup_weight`` (ramped) times :meth:`unsupervised_loss` on the unlabeled part. A method with more than
        one forward pass overrides this and builds its log with :meth:`step_log`.
        """
        out_l, out_u = self.forward_student(data_l, data_u)
        sup = self.loss(out_l, target_l) if data_l.shape[0] > 0 else self.zero()
        extras = StepLog()
        if data_u.shape[0] > 0:
            unsup, extras = self.unsupervised_loss(data_u, out_u)
        else:
            unsup = self.zero()
        weight = self.current_unsup_weight()
        log = self.step_log(sup, unsup, weight)
        for name, value in extras.items():
            log.add(getattr(extras, "kinds", {}).get(name, "metric"), name, value)
        return sup + weight * unsup, log

    # ------------------------------------------------------------------ the step toolkit
    def training_progress(self) -> float:
        """Share of the training's optimizer steps done, in [0, 1] (``global_step / (num_epochs x iterations)``):
        the one clock that ramps and schedules read."""
        return min(1.0, self.global_step / max(1, self.num_epochs * self.num_iterations_per_epoch))

    @staticmethod
    def top(output) -> torch.Tensor:
        """The highest-resolution output of a network (deep supervision returns a list, highest first)."""
        return output[0] if isinstance(output, (list, tuple)) else output

    @staticmethod
    def top_target(target) -> torch.Tensor:
        """The full-resolution target of nnU-Net's batch (a list under deep supervision)."""
        return target[0] if isinstance(target, (list, tuple)) else target

    def zero(self) -> torch.Tensor:
        """A scalar 0 on the device (a term that is absent in this step)."""
        return torch.zeros((), device=self.device)

    def step_log(self, sup_loss, unsup_loss, unsup_weight) -> StepLog:
        """The schema every step logs: the labeled terms, the unlabeled terms before their weight, the weight."""
        return StepLog().loss("sup_loss", sup_loss).loss("unsup_loss", unsup_loss).schedule("unsup_weight",
                                                                                             unsup_weight)

    def ds_loss(self, fn: Callable[..., torch.Tensor], *outputs, targets: Sequence[torch.Tensor] = (),
                deep_supervision: Optional[bool] = None) -> torch.Tensor:
        """Apply ``fn`` to corresponding outputs under the deep-supervision policy.

        Each of ``outputs`` is a tensor or a deep-supervision list (highest resolution first); ``targets`` are
        full-resolution tensors ``(B, C, *patch)`` (labels, masks, weights) passed to ``fn`` after the outputs,
        resized to each output's resolution with nearest-exact interpolation (as nnU-Net downsamples its
        deep-supervision targets); integer targets stay integer. ``deep_supervision``: None follows
        :attr:`ssl_deep_supervision`; True uses every output (e.g. a loss on ground-truth voxels); False only the
        highest resolution. With every output: the sum weighted like nnU-Net's supervised loss (weights 1/2^i,
        lowest 0, normalised).
        """
        use_all = self.ssl_deep_supervision if deep_supervision is None else deep_supervision

        def at(i: Optional[int]):
            outs = [o[i] if i is not None else o for o in outputs]
            shape = outs[0].shape[2:]
            resized = []
            for t in targets:
                if t.shape[2:] != shape:
                    t = F.interpolate(t.float(), size=shape, mode="nearest-exact").to(t.dtype)
                resized.append(t)
            return fn(*outs, *resized)

        if not isinstance(outputs[0], (list, tuple)):
            return at(None)
        if not use_all:
            return at(0)
        total = 0.0
        for i, w in enumerate(self.loss.weight_factors):
            if w != 0:
                total = total + w * at(i)
        return total

    def current_unsup_weight(self) -> float:
        """``unsup_weight`` times the ramp-up at the current training progress."""
        epochs = (self.unsup_rampup_fraction * self.num_epochs if self.unsup_rampup_epochs is None
                  else self.unsup_rampup_epochs)
        return self.unsup_weight * rampup(self.unsup_rampup_shape, self.global_step,
                                          epochs * self.num_iterations_per_epoch)

    def ssl_hyperparameters(self) -> dict:
        """Every declared hyperparameter with its value (logged and checkpointed)."""
        return hyperparameters_of(self)

    def forward_student(self, data_l: torch.Tensor, data_u: torch.Tensor):
        """Student outputs for labeled and unlabeled patches from one forward pass, split back."""
        n_l = data_l.shape[0]
        out = self.network(torch.cat((data_l, data_u)) if data_u.shape[0] else data_l)
        if isinstance(out, (list, tuple)):
            return [o[:n_l] for o in out], [o[n_l:] for o in out]
        return out[:n_l], out[n_l:]

    # ------------------------------------------------------------------ helpers for the networks of a method
    @property
    def unwrapped_network(self) -> nn.Module:
        return unwrap(self.network)

    def register_ssl_module(self, name: str, module: nn.Module, validate: bool = False) -> nn.Module:
        """Register an extra network: moved to the device, checkpointed, switched with deep supervision, and
        validated beside the deployed network when ``validate``."""
        module = module.to(self.device)
        self.ssl_modules[name] = module
        if validate and name not in self.validated_modules:
            self.validated_modules.append(name)
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

    def nnunet_optimizer(self, parameters) -> Tuple[torch.optim.Optimizer, PolyLRScheduler]:
        """nnU-Net's optimizer and schedule for ``parameters``: SGD (Nesterov, momentum 0.99, ``initial_lr``,
        ``weight_decay``) with the poly learning rate over ``num_epochs``."""
        optimizer = torch.optim.SGD(parameters, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def add_optimizer(self, name: str, parameters, optimizer: Optional[torch.optim.Optimizer] = None,
                      lr_scheduler=None) -> torch.optim.Optimizer:
        """An optimizer of its own for ``parameters`` (nnU-Net's SGD and poly schedule unless ``optimizer``, with
        its ``lr_scheduler``, is given), registered: stepped with the others, checkpointed."""
        if optimizer is None:
            optimizer, lr_scheduler = self.nnunet_optimizer(parameters)
        return self.register_ssl_optimizer(name, optimizer, lr_scheduler)

    def add_network(self, name: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    lr_scheduler=None, compile: bool = True, validate: bool = True) -> nn.Module:
        """A second network that learns: compiled where nnU-Net compiles the student (``compile``), moved to the
        device, switched with deep supervision, checkpointed, validated (``validate``), with its own optimizer
        (nnU-Net's SGD and poly schedule, or ``optimizer`` over the module's parameters built by the caller and
        its ``lr_scheduler``) stepped with the student's.

        Returns:
            the registered (possibly compiled) module.
        """
        if compile and self._do_i_compile():
            module = torch.compile(module)
        module = self.register_ssl_module(name, module, validate)
        self.add_optimizer(name, module.parameters(), optimizer, lr_scheduler)
        return module

    def make_ema_copy(self, source: Optional[nn.Module] = None) -> nn.Module:
        """A frozen copy of ``source`` (default the student) for an EMA teacher (compiled where nnU-Net compiles
        the student)."""
        teacher = copy.deepcopy(unwrap(source) if source is not None else self.unwrapped_network)
        teacher.requires_grad_(False)
        if self._do_i_compile():
            teacher = torch.compile(teacher)
        return teacher

    def add_ema_teacher(self, decay: float, name: str = "teacher", source: Optional[Callable[[], nn.Module]] = None,
                        validate: bool = True) -> nn.Module:
        """An exponential-moving-average teacher of the student (or of ``source()``).

        Registered (device, checkpoint, deep-supervision switch, validation when ``validate``); copied from its
        source when training starts unless resumed with ``--c`` (so ``-pretrained_weights`` reach it); updated
        after every optimizer step with SSL4MIS' warm-up ``min(1 - 1/(step + 1), decay)`` over parameters and
        buffers (:func:`nnssl.ema.ema_update_`).
        """
        source = source or (lambda: self.unwrapped_network)
        teacher = self.register_ssl_module(name, self.make_ema_copy(source()), validate)
        self.ema_teachers[name] = (source, float(decay))
        return teacher

    def _update_ema_teachers(self) -> None:
        for name, (source, decay) in self.ema_teachers.items():
            ema_update_(self.ssl_modules[name], unwrap(source()), ema_decay_with_warmup(self.global_step, decay))

    # ------------------------------------------------------------------ batch composition
    def forced_foreground_count(self, n_labeled: int) -> int:
        """Forced-foreground samples among ``n_labeled`` labeled samples kept from nnU-Net's batch
        (:func:`nnssl.data.batches.forced_foreground_count` with this trainer's oversampling settings)."""
        return forced_foreground_count(self.batch_size, self.oversample_foreground_percent,
                                       self.probabilistic_oversampling, n_labeled)

    def labeled_indices(self, n_labeled: int) -> List[int]:
        """Which of nnU-Net's labeled batch to keep when a step uses ``n_labeled`` of its ``batch_size`` samples:
        nnU-Net forces foreground in the last samples of its batch, and the kept ones keep that share
        (:func:`nnssl.data.batches.labeled_subset`)."""
        forced = forced_foreground_count(self.batch_size, self.oversample_foreground_percent,
                                         self.probabilistic_oversampling, self.batch_size)
        return labeled_subset(self.batch_size, forced, n_labeled)

    # ------------------------------------------------------------------ nnU-Net lifecycle
    def initialize(self):
        if self.is_cascaded:
            raise RuntimeError(f"{type(self).__name__}: cascaded configurations are not supported by nnssl "
                               f"(unlabeled images have no previous-stage segmentation)")
        self.resolved_seed = seeding.resolve_seed(self.seed)
        if self.resolved_seed is not None:  # before nnU-Net builds and initialises the network
            seeding.seed_everything(self.resolved_seed)
            self.batch_rng = np.random.default_rng(self.resolved_seed)
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
        self.logger.update_config({"nnssl": {**self.ssl_hyperparameters(), "resolved_seed": self.resolved_seed}})

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
        self.print_to_log_file(f"nnssl: {len(self.unlabeled_pool)} unlabeled images; seed {self.resolved_seed}; "
                               f"hyperparameters {self.ssl_hyperparameters()}")
        if not self._ssl_state_loaded:  # -pretrained_weights are loaded into the student after initialize()
            for name, (source, _) in self.ema_teachers.items():
                ema_update_(self.ssl_modules[name], unwrap(source()), 0.0)
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
            epoch, num_epochs = self.lrg_clock()
            self.lrg_unlabeled_share_now = lrg_unlabeled_share(
                self.lrg_rule, lr=self.optimizer.param_groups[0]["lr"], max_lr=self.initial_lr,
                epoch=epoch, start_epoch=self.lrg_start_epoch or 0, num_epochs=num_epochs)
            expected_u = min(self.lrg_unlabeled_share_now * self.batch_size, self.unlabeled_batch_size_per_rank)
            self.print_to_log_file(f"LRG sampling ({self.lrg_rule}): unlabeled share "
                                   f"{self.lrg_unlabeled_share_now:.3f}, {expected_u:.2f} of {self.batch_size} "
                                   f"samples unlabeled per step in expectation")
        for module in self.ssl_modules.values():
            module.train()

    def train_step(self, batch: dict) -> dict:
        """One step: :meth:`compute_loss` on this step's labeled and unlabeled samples, nnU-Net's backward pass and
        optimizer step (gradient norm clipped at 12) for each optimizer of :meth:`optimizers_to_step`, then the EMA
        teachers' update and :meth:`after_optimizer_step`.

        The non-finite guard: a step whose total loss is NaN or Inf (under DDP: on any rank, then every rank skips
        it) or, on the CPU path, whose gradient norm is non-finite for any of its optimizers is skipped as a
        whole: no optimizer steps, no EMA teacher update, no ``after_optimizer_step``, and ``global_step`` stays
        (it counts optimizer steps taken, so every schedule reads the progress of the training that happened).
        Each step logs ``n_nonfinite_loss_skips`` (0 or 1) and ``n_nonfinite_grad_skips`` (optimizers with a
        non-finite gradient norm), kind count; an epoch's value is their mean over its steps. On CUDA the
        GradScaler skips optimizer steps with non-finite gradients itself (lowering its scale, usual at the start
        of fp16 training), so those steps are neither counted nor skipped here. After
        :attr:`max_consecutive_nonfinite_steps` skipped steps in a row the run stops with a RuntimeError that
        names the non-finite terms of the steps' :class:`StepLog` and where it stopped; while skipping,
        :meth:`save_checkpoint` keeps the existing checkpoints.
        """
        n_l, n_u = self.batch_composition()
        if not (0 <= n_l <= self.batch_size and 0 <= n_u <= self.unlabeled_batch_size_per_rank and n_l + n_u > 0):
            raise ValueError(f"batch_composition() returned ({n_l}, {n_u}); allowed: 0..{self.batch_size} "
                             f"labeled, 0..{self.unlabeled_batch_size_per_rank} unlabeled, not both 0")
        keep = slice(None) if n_l == self.batch_size else self.labeled_indices(n_l)  # no copy when all are kept
        data_l = batch["data"][keep].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target_l = [t[keep].to(self.device, non_blocking=True) for t in target]
        else:
            target_l = target[keep].to(self.device, non_blocking=True)
        if n_u > 0:
            data_u = next(self.dataloader_unlabeled)["data"][:n_u].to(self.device, non_blocking=True)
        else:
            data_u = data_l[:0]

        optimizers = self.optimizers_to_step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss, log = self.compute_loss(data_l, target_l, data_u)
        if not isinstance(log, StepLog) or any(k not in log for k in STEP_SCHEMA):
            raise TypeError(f"{type(self).__name__}.compute_loss must return (loss, StepLog) with "
                            f"{', '.join(STEP_SCHEMA)}: build it with self.step_log(sup, unsup, weight)")

        finite_loss = torch.isfinite(loss.detach()).all().to(torch.int32)
        if self.is_ddp:  # every rank skips together, or the others would wait in backward's all-reduce
            dist.all_reduce(finite_loss, op=dist.ReduceOp.MIN)
        nonfinite_grads = []
        if finite_loss and self.grad_scaler is not None:  # nnU-Net's step (gradient norm clipped at 12)
            self.grad_scaler.scale(loss).backward()
            for optimizer in optimizers:
                self.grad_scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(_parameters(optimizer), 12)
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        elif finite_loss:
            loss.backward()
            norms = [torch.nn.utils.clip_grad_norm_(_parameters(optimizer), 12) for optimizer in optimizers]
            nonfinite_grads = [o for o, norm in zip(optimizers, norms) if not torch.isfinite(norm)]
            if not nonfinite_grads:  # as the GradScaler does: one bad batch must not turn the weights into NaN
                for optimizer in optimizers:
                    optimizer.step()
        skipped = not finite_loss or bool(nonfinite_grads)
        if not skipped:
            self._update_ema_teachers()
            self.after_optimizer_step()
            self.global_step += 1

        log.add(COUNT, "n_labeled", float(n_l)).add(COUNT, "n_unlabeled", float(n_u))
        log.add(COUNT, "n_nonfinite_loss_skips", float(not finite_loss))
        log.add(COUNT, "n_nonfinite_grad_skips", float(len(nonfinite_grads)))
        if self.lrg_sampling:
            log.schedule("lrg_unlabeled_share", self.lrg_unlabeled_share_now)
        self._log_kinds = log.kinds
        out = {"loss": loss.detach().cpu().numpy()}
        for k, v in log.items():
            out[k] = float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v)

        if not skipped:
            self._nonfinite_streak = ()
        elif not finite_loss:
            self._nonfinite_streak += (tuple(k for k in log if not np.isfinite(out[k])) or ("the total loss",),)
        else:
            names = {id(self.optimizer): "network", **{id(o): name for name, o in self.ssl_optimizers.items()}}
            self._nonfinite_streak += (tuple(f"the gradient norm of {names[id(o)]}" for o in nonfinite_grads),)
        if self._nonfinite_streak and len(self._nonfinite_streak) >= self.max_consecutive_nonfinite_steps:
            counts = Counter(term for step in self._nonfinite_streak for term in step)
            raise RuntimeError(
                f"{type(self).__name__}: {len(self._nonfinite_streak)} steps in a row skipped for non-finite values "
                f"at epoch {self.current_epoch}, after optimizer step {self.global_step} (non-finite: "
                + ", ".join(f"{term} in {n}" for term, n in counts.items())
                + f"); the checkpoints in {self.output_folder} are from before these steps. Check the images for "
                  f"NaN/Inf (nnssl_verify_dataset), lower those terms' weights or the learning rate, or raise "
                  f"max_consecutive_nonfinite_steps; nnUNetv2_train --c resumes from the last checkpoint")
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        kinds = getattr(self, "_log_kinds", {})
        keys = [k for k in train_outputs[0] if k != "loss"]
        for key in keys:
            value = float(np.mean([o[key] for o in train_outputs]))
            if self.is_ddp:
                values = [None] * dist.get_world_size()
                dist.all_gather_object(values, value)
                value = float(np.mean(values))
            self.logger.local_logger.register(key, self.current_epoch, kinds.get(key, LOSS))
            self.logger.log(key, value, self.current_epoch)
        parts = [f"{k} {np.round(float(np.mean([o[k] for o in train_outputs])), 4)}" for k in keys]
        self.print_to_log_file("ssl: " + ", ".join(parts))

    # ------------------------------------------------------------------ unlabeled data
    def get_unlabeled_pool(self) -> UnlabeledPool:
        """The fold's hidden-label training cases plus every image of ``nnssl_preprocess_unlabeled``
        (:func:`nnssl.data.pool.find_unlabeled_pool`)."""
        return find_unlabeled_pool(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                   self.configuration_manager.configuration, self.configuration_name, self.fold,
                                   self.dataset_class, type(self).__name__)

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
            seeds = None if self.resolved_seed is None else seeding.worker_seeds(self.resolved_seed, n, stream=1)
            gen = NonDetMultiThreadedAugmenter(loader, None, num_processes=n, num_cached=max(6, n // 2),
                                               seeds=seeds, pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        return gen
