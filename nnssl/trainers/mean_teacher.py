"""Mean Teacher for nnU-Net."""

from __future__ import annotations

import torch

from nnssl.ema import ema_decay_with_warmup, ema_update_
from nnssl.losses.consistency import softmax_mse
from nnssl.trainers.base import nnSSLTrainer


class nnSSL_MeanTeacherTrainer(nnSSLTrainer):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), the semi-supervised baseline.

    Idea: the student matches the softmax of an exponential-moving-average teacher on noisy unlabeled patches.
    Losses: nnU-Net's Dice + CE (deep supervision) on labeled patches, plus
    ``w(t) * mean((softmax(student(x_u)) - softmax(teacher(x_u + noise)))^2)`` on unlabeled patches.

    Defaults follow SSL4MIS ``train_mean_teacher_{2D,3D}.py`` (the reference implementation of the
    medical-imaging literature), translated to nnU-Net's epoch/iteration regime:

    - ``unsup_weight = 0.1`` (SSL4MIS ``consistency``); sigmoid ramp-up over the whole training
      (``unsup_rampup_epochs = None``, i.e. ``num_epochs``): SSL4MIS ramps to full weight at iteration
      200 x 150 = 30000 of 30000 (2D), so its ramp spans the whole budget; we evaluate the ramp per iteration on
      ``num_epochs x num_iterations_per_epoch``, so it spans the whole budget of any run length.
    - ``ema_decay = 0.99`` per optimizer step with SSL4MIS' warm-up ``min(1 - 1/(step + 1), 0.99)``; an nnU-Net
      iteration is one optimizer step, so no translation is needed. Parameters and buffers are averaged.
    - teacher input noise ``clamp(N(0, teacher_noise_std^2), -teacher_noise_clip, +teacher_noise_clip)`` with
      0.1 / 0.2 (SSL4MIS); nnU-Net's z-scored intensities have the scale of SSL4MIS' normalised inputs.
    - unlabeled batch: as many unlabeled as labeled patches (SSL4MIS' two-stream batches 12+12 / 2+2).

    Attributes:
        ema_decay: EMA decay per optimizer step (0.99).
        teacher_noise_std: std of the Gaussian noise on the teacher's input (0.1).
        teacher_noise_clip: the noise is clipped to +-this (0.2).
        and the base's ``unsup_weight`` (0.1 here), ``unsup_rampup_epochs``, ``unsup_rampup_shape``,
        ``unlabeled_batch_size``, ``ssl_deep_supervision`` (False: consistency on the full-resolution output).

    Deviations from the paper / SSL4MIS, and why:

    - Everything else is nnU-Net's: SGD with Nesterov momentum 0.99, poly learning rate from 1e-2, nnU-Net's
      augmentation for both the labeled and the unlabeled stream, deep supervision on the supervised loss, and
      nnU-Net's plans (patch, batch size, network). That is the point of nnssl: methods on nnU-Net's footing.
    - SSL4MIS' 2D script sets the consistency weight to 0 for the first 1000 iterations; we do not: the sigmoid
      ramp is already ~0.007-0.01 over that span of a long run.
    - Inference uses the student (as the paper and SSL4MIS); ``network_weights`` in the checkpoint is the
      student, the teacher is stored under ``nnssl/modules/teacher``; the teacher's validation pseudo-Dice is
      logged beside the student's (``val_dice_teacher``).
    """

    HYPERPARAMETERS = nnSSLTrainer.HYPERPARAMETERS + ("ema_decay", "teacher_noise_std", "teacher_noise_clip")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_weight = 0.1
        self.ema_decay = 0.99
        self.teacher_noise_std = 0.1
        self.teacher_noise_clip = 0.2
        self.teacher = None

    def build_ssl_modules(self) -> None:
        self.teacher = self.register_ssl_module("teacher", self.make_ema_copy())

    def on_ssl_train_start(self, resumed: bool) -> None:
        if not resumed:  # -pretrained_weights are loaded into the student after initialize()
            ema_update_(self.teacher, self.unwrapped_network, 0.0)

    def unsupervised_loss(self, data_u, student_out_u):
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(data_u) * self.teacher_noise_std,
                                -self.teacher_noise_clip, self.teacher_noise_clip)
            teacher_out_u = self.teacher(data_u + noise)
        return self.ds_loss(softmax_mse, student_out_u, teacher_out_u), {}

    def validation_networks(self):
        return {"teacher": self.teacher}

    def after_optimizer_step(self) -> None:
        ema_update_(self.teacher, self.unwrapped_network, ema_decay_with_warmup(self.global_step, self.ema_decay))
