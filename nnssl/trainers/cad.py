"""CAD: confidence-aware adaptive displacement for nnU-Net."""

from __future__ import annotations

import time
from typing import Dict

import torch
import torch.nn.functional as F

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnssl.ema import ema_decay_with_warmup, ema_update_
from nnssl.losses.segmentation import cps_dice_loss, mix_loss
from nnssl.ops.displacement import llcr_displace
from nnssl.ops.mixing import bcp_mix, box_mask, pseudo_labels, strong_intensity_view
from nnssl.schedules import escalate
from nnssl.trainers.base import nnSSLTrainer


def _top(output):
    """The highest-resolution output of a network (deep supervision returns a list)."""
    return output[0] if isinstance(output, (list, tuple)) else output


class nnSSL_CADTrainer(nnSSLTrainer):
    """CAD, confidence-aware adaptive displacement (Xiao, Xu, Liang, Deng, Xiao; arXiv 2502.00536, 2025).

    Idea: two students learn from an EMA teacher's pseudo-labels on bidirectional copy-paste mixes (BCP) and from
    each other (cross pseudo-supervision); each student's largest low-confidence region is replaced by a
    high-confidence region of the other student's view, with a confidence threshold and a maximum region size that
    escalate over training, and the students supervise each other on the displaced images too.

    CAD has no public code; it extends ABD (Chi et al., CVPR 2024; chy-upc/ABD ``train_ACDC_BCP.py``), whose
    structure this trainer follows. One step, with ``n = min(labeled, unlabeled)`` pairs:

    1. teacher (EMA of student 1) pseudo-labels of the unlabeled patches: argmax, largest connected component per
       class (:func:`nnssl.ops.mixing.pseudo_labels`);
    2. BCP mix (:func:`nnssl.ops.mixing.bcp_mix`): one random box of ``copy_paste_box_fraction`` of each axis,
       half of the pairs paste the labeled patch's box into the unlabeled patch, the other half the unlabeled box
       into the labeled patch; student 1 sees the mixed images, student 2 a strong intensity view of them;
    3. each student: ``mix_loss_weight`` x BCP's mix loss (Dice + CE, weight 1 on ground-truth voxels,
       ``pseudo_label_weight`` on pseudo-labeled voxels; nnU-Net's deep supervision with the mixed targets
       downsampled like nnU-Net's), plus cross pseudo-supervision (Dice against the other student's argmax);
    4. Largest Low-Confidence Region Replacement (:func:`nnssl.ops.displacement.llcr_displace`) between the two
       views with the current Dynamic Threshold Escalation values; both students predict both displaced views and
       supervise each other (Dice against the other's argmax).

    ``loss = mix_loss_weight (mix_1 + mix_2) + w(t) cps_weight (cps_1 + cps_2 + cps_displaced_1 + cps_displaced_2)``
    with ``w(t)`` the base's ramp; ABD: ``(Dice + CE)/2 + cps + cps_displaced`` per student.

    Inference (stock ``nnUNetv2_predict``): student 1 (``network_weights``), as ABD's ``Inference_model1``; the
    teacher is checkpointed under ``nnssl/modules/teacher`` and student 2 under ``nnssl/modules/student_2``. The
    teacher's and student 2's validation pseudo-Dice are logged beside student 1's every epoch
    (``val_dice_teacher``, ``val_dice_student_2``), so the choice can be checked on validation data.

    Attributes:
        pseudo_label_weight: weight of pseudo-labeled voxels in the mix loss (BCP/ABD ``u_weight`` 0.5), times the
            ramp ``w(t)``.
        mix_loss_weight: weight of each student's mix loss (ABD 0.5: ``(Dice + CE) / 2``).
        cps_weight: weight of each cross pseudo-supervision term (ABD 1).
        copy_paste_box_fraction: BCP box side per axis as a share of the patch (2/3).
        pseudo_label_largest_component: keep the largest component per class of the teacher's argmax (True).
        ema_decay: teacher EMA decay (0.99, with the warm-up ``min(1 - 1/(t+1), 0.99)``).
        strong_view: give student 2 a strong intensity view (True); strong_contrast_range (0.75, 1.25) and
            strong_noise_std (0.1): see :func:`nnssl.ops.mixing.strong_intensity_view`.
        displacement_threshold_start / _end: confidence threshold of LLCR at the start / end of training
            (0.80 / 0.95; CAD leaves them open).
        displacement_max_fraction_start / _end: maximum replaced share of a patch's voxels (1/16, ABD's one grid
            patch of a 4 x 4 grid, / 1/4; CAD leaves them open).
        displacement_schedule_shape: shape of Dynamic Threshold Escalation over the whole training (``"linear"``).
        region_connectivity: connectivity of low-confidence components (None: full, 8 in 2D / 26 in 3D).
        region_search_max_voxels: the confidence maps are average-pooled to at most about this many voxels before
            the component search (32768; ``0`` = no pooling), which bounds its cost on large patches.
        and the base's ``unsup_weight`` (1.0), ``unsup_rampup_fraction`` (0.25), ``unsup_rampup_shape``
        (``"sigmoid"``), ``unlabeled_batch_size`` (None: as many as labeled).

    Deviations from ABD/CAD, and why (CAD's own constants are unpublished; see ../shared/reference/ssl-methods.md
    3.8 for what is a reconstruction):

    - No separate labeled-only pre-training stage (BCP/ABD: 10k of 40k iterations) and random, different
      initialisations of the two students: instead the pseudo-label terms (pseudo-labeled voxels of the mix loss
      and all cross pseudo-supervision) ramp up (sigmoid) over the first quarter of training
      (``unsup_rampup_fraction = 0.25``, BCP's pre-training share); labeled voxels always have weight 1.
    - nnU-Net's footing: its SGD (Nesterov 0.99, poly from 1e-2) for both students, its augmentation, plans and
      deep supervision (on the mix loss); cross pseudo-supervision uses the full-resolution output.
    - The strong view is an intensity perturbation of the same mixed images (so one teacher pass and one set of
      pseudo-labels serve both students); ABD's strong view is a colour-jittered copy with its own teacher pass.
    - The source of a replacement is the other view's box of the same size with the highest mean confidence
      (ABD's argmax/argmin branch); ABD's alternative top-k KL matching is not used.
    - A low-confidence component's bounding box larger than the current maximum is shrunk around the component's
      least confident voxel; the search runs on pooled confidence maps (``region_search_max_voxels``).
    - Dice terms are nnU-Net's (foreground classes, batch Dice); SSL4MIS/ABD's Dice includes the background.
    - Regions (``regions_class_order``) and ignore labels are not supported: a clear error at initialisation.
    """

    HYPERPARAMETERS = nnSSLTrainer.HYPERPARAMETERS + (
        "pseudo_label_weight", "mix_loss_weight", "cps_weight", "copy_paste_box_fraction",
        "pseudo_label_largest_component", "ema_decay", "strong_view", "strong_contrast_range", "strong_noise_std",
        "displacement_threshold_start", "displacement_threshold_end", "displacement_max_fraction_start",
        "displacement_max_fraction_end", "displacement_schedule_shape", "region_connectivity",
        "region_search_max_voxels")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_weight = 1.0
        self.unsup_rampup_fraction = 0.25
        self.pseudo_label_weight = 0.5
        self.mix_loss_weight = 0.5
        self.cps_weight = 1.0
        self.copy_paste_box_fraction = 2.0 / 3.0
        self.pseudo_label_largest_component = True
        self.ema_decay = 0.99
        self.strong_view = True
        self.strong_contrast_range = (0.75, 1.25)
        self.strong_noise_std = 0.1
        self.displacement_threshold_start = 0.80
        self.displacement_threshold_end = 0.95
        self.displacement_max_fraction_start = 1.0 / 16.0
        self.displacement_max_fraction_end = 1.0 / 4.0
        self.displacement_schedule_shape = "linear"
        self.region_connectivity = None
        self.region_search_max_voxels = 32768
        self.student_2 = None
        self.teacher = None

    # ------------------------------------------------------------------ networks
    def build_ssl_modules(self) -> None:
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(f"{type(self).__name__} needs plain class labels: region-based training and ignore "
                               f"labels are not supported (copy-paste mixes hard label maps)")
        student_2 = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                    self.num_input_channels,
                                                    self.label_manager.num_segmentation_heads,
                                                    self.enable_deep_supervision)
        if self._do_i_compile():
            student_2 = torch.compile(student_2)
        self.student_2 = self.register_ssl_module("student_2", student_2)
        optimizer = torch.optim.SGD(self.student_2.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        self.register_ssl_optimizer("student_2", optimizer, PolyLRScheduler(optimizer, self.initial_lr,
                                                                            self.num_epochs))
        self.teacher = self.register_ssl_module("teacher", self.make_ema_copy())

    def on_ssl_train_start(self, resumed: bool) -> None:
        if not resumed:  # -pretrained_weights are loaded into student 1 after initialize()
            ema_update_(self.teacher, self.unwrapped_network, 0.0)

    def validation_networks(self):
        return {"teacher": self.teacher, "student_2": self.student_2}

    def after_optimizer_step(self) -> None:
        ema_update_(self.teacher, self.unwrapped_network, ema_decay_with_warmup(self.global_step, self.ema_decay))

    # ------------------------------------------------------------------ schedules
    def training_progress(self) -> float:
        """Share of the training's optimizer steps done, in [0, 1]."""
        return min(1.0, self.global_step / max(1, self.num_epochs * self.num_iterations_per_epoch))

    def displacement_schedule(self):
        """(confidence threshold, maximum replaced fraction) now: Dynamic Threshold Escalation."""
        p = self.training_progress()
        return (escalate(self.displacement_threshold_start, self.displacement_threshold_end, p, 1.0,
                         self.displacement_schedule_shape),
                escalate(self.displacement_max_fraction_start, self.displacement_max_fraction_end, p, 1.0,
                         self.displacement_schedule_shape))

    # ------------------------------------------------------------------ loss
    def _mix_loss(self, output, target: torch.Tensor, labeled_region: torch.Tensor, pseudo_weight: float):
        """BCP mix loss under nnU-Net's deep supervision: targets and regions downsampled like nnU-Net's."""
        def at(out):
            if out.shape[2:] == target.shape[2:]:
                return mix_loss(out, target, labeled_region, 1.0, pseudo_weight)
            t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest-exact").long()
            r = F.interpolate(labeled_region, size=out.shape[2:], mode="nearest-exact")
            return mix_loss(out, t, r, 1.0, pseudo_weight)

        if not isinstance(output, (list, tuple)):
            return at(output)
        total = 0.0
        for w, out in zip(self.loss.weight_factors, output):
            if w != 0:
                total = total + w * at(out)
        return total

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compute_loss(self, data_l, target_l, data_u):
        n = min(data_l.shape[0], data_u.shape[0])
        ramp = self.current_unsup_weight()
        zero = torch.zeros((), device=self.device)
        if n == 0:  # no labeled/unlabeled pair in this step: nnU-Net's supervised loss for both students
            sup = self.loss(self.network(data_l), target_l) + self.loss(self.student_2(data_l), target_l)
            return sup, {"mix_loss": zero, "cps_loss": zero, "displaced_cps_loss": zero, "unsup_weight": ramp}
        y_top = target_l[0] if isinstance(target_l, (list, tuple)) else target_l
        x_l, y_l, x_u = data_l[:n], y_top[:n].long(), data_u[:n]

        with torch.no_grad():
            teacher_logits = _top(self.teacher(x_u))
            self._sync()
            t0 = time.perf_counter()
            plab = pseudo_labels(teacher_logits, self.pseudo_label_largest_component, self.region_connectivity)
            pseudo_label_s = time.perf_counter() - t0
        mask = box_mask(x_l.shape[2:], self.copy_paste_box_fraction, device=self.device)
        x_mix, y_mix, labeled_region = bcp_mix(x_l, y_l, x_u, plab, mask)
        x_mix_2 = (strong_intensity_view(x_mix, self.strong_contrast_range, self.strong_noise_std)
                   if self.strong_view else x_mix)

        out_1, out_2 = self.network(x_mix), self.student_2(x_mix_2)
        pseudo_weight = self.pseudo_label_weight * ramp
        mix = (self._mix_loss(out_1, y_mix, labeled_region, pseudo_weight)
               + self._mix_loss(out_2, y_mix, labeled_region, pseudo_weight))
        top_1, top_2 = _top(out_1), _top(out_2)
        cps = cps_dice_loss(top_1, top_2) + cps_dice_loss(top_2, top_1)

        threshold, max_fraction = self.displacement_schedule()
        with torch.no_grad():
            conf_1 = torch.softmax(top_1.detach().float(), 1).amax(1)
            conf_2 = torch.softmax(top_2.detach().float(), 1).amax(1)
            self._sync()
            t0 = time.perf_counter()
            x_d1, x_d2, replaced = llcr_displace(x_mix, x_mix_2, conf_1, conf_2, threshold, max_fraction,
                                                 self.region_search_max_voxels, self.region_connectivity)
            region_search_s = time.perf_counter() - t0
        x_d = torch.cat((x_d1, x_d2))
        d_1, d_2 = _top(self.network(x_d)), _top(self.student_2(x_d))
        cps_d = cps_dice_loss(d_1, d_2) + cps_dice_loss(d_2, d_1)

        total = self.mix_loss_weight * mix + ramp * self.cps_weight * (cps + cps_d)
        terms: Dict[str, object] = {
            "mix_loss": mix, "cps_loss": cps, "displaced_cps_loss": cps_d, "unsup_weight": ramp,
            "displacement_threshold": threshold, "displacement_max_fraction": max_fraction,
            "replaced_fraction": replaced, "region_search_s": region_search_s, "pseudo_label_s": pseudo_label_s}
        return total, terms
