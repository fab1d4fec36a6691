"""CAD: confidence-aware adaptive displacement for nnU-Net."""

from __future__ import annotations

import time

import torch

from nnssl.data.batches import labeled_subset
from nnssl.losses.segmentation import cps_dice_loss, mix_loss
from nnssl.ops.displacement import llcr_displace
from nnssl.ops.mixing import bcp_mix, box_mask, strong_intensity_view
from nnssl.ops.pseudo_labels import pseudo_labels
from nnssl.schedules import escalate
from nnssl.trainers.base import nnSSLTrainer
from nnssl.trainers.hyperparameters import hyperparameter


class nnSSL_CADTrainer(nnSSLTrainer):
    """CAD, confidence-aware adaptive displacement (Xiao, Xu, Liang, Deng, Xiao; arXiv 2502.00536, 2025).

    Idea: two students learn from an EMA teacher's pseudo-labels on bidirectional copy-paste mixes (BCP) and from
    each other (cross pseudo-supervision); each student's largest low-confidence region is replaced by a
    high-confidence region of the other student's view, with a confidence threshold and a maximum region size that
    escalate over training, and the students supervise each other on the displaced images too.

    CAD has no public code; it extends ABD (Chi et al., CVPR 2024; chy-upc/ABD ``train_ACDC_BCP.py``), whose
    structure this trainer follows. One step, with ``n = min(labeled, unlabeled)`` pairs (the labeled samples
    kept include nnU-Net's forced-foreground share, :func:`nnssl.data.batches.labeled_subset`):

    1. teacher (EMA of student 1) pseudo-labels of the unlabeled patches: argmax, largest connected component per
       class (:func:`nnssl.ops.mixing.pseudo_labels`);
    2. BCP mix (:func:`nnssl.ops.mixing.bcp_mix`): one random box of ``copy_paste_box_fraction`` of each axis,
       half of the pairs paste the labeled patch's box into the unlabeled patch, the other half the unlabeled box
       into the labeled patch; student 1 sees the mixed images, student 2 a strong intensity view of them;
    3. each student: ``mix_loss_weight`` x BCP's mix loss summed over the inward and the outward half of the
       pairs (each half's Dice + CE, weight 1 on ground-truth voxels, ``pseudo_label_weight`` on pseudo-labeled
       voxels; nnU-Net's deep supervision with the mixed targets downsampled like nnU-Net's): ABD's
       ``(dice_in + dice_out + ce_in + ce_out) / 2``; plus cross pseudo-supervision (Dice against the other
       student's argmax, all classes including the background, as ABD's ``DiceLoss``);
    4. Largest Low-Confidence Region Replacement (:func:`nnssl.ops.displacement.llcr_displace`) between the two
       views with the current Dynamic Threshold Escalation values; both students predict both displaced views and
       supervise each other (Dice against the other's argmax).

    ``loss = mix_loss_weight (mix_1 + mix_2) + w(t) cps_weight (cps_1 + cps_2 + cps_displaced_1 + cps_displaced_2)``
    with ``mix_i = mix_i,in + mix_i,out`` and ``w(t)`` the base's ramp; ABD:
    ``(dice_in + dice_out + ce_in + ce_out) / 2 + cps + cps_displaced`` per student. Logged: ``sup_loss`` = the
    mix loss (it carries the ground truth), ``unsup_loss`` = all cross pseudo-supervision terms.

    Inference (stock ``nnUNetv2_predict``): student 1 (``network_weights``), as ABD's ``Inference_model1``; the
    teacher is checkpointed under ``nnssl/modules/teacher`` and student 2 under ``nnssl/modules/student_2``. The
    teacher's and student 2's validation pseudo-Dice are logged beside student 1's every epoch
    (``val_dice_teacher``, ``val_dice_student_2``), so the choice can be checked on validation data.

    Attributes:
        pseudo_label_weight: weight of pseudo-labeled voxels in the mix loss (BCP/ABD ``u_weight`` 0.5), times the
            ramp ``w(t)``.
        mix_loss_weight: weight of each student's mix loss summed over the two halves (ABD 0.5).
        cps_weight: weight of each cross pseudo-supervision term (ABD 1).
        cps_include_background: the cross pseudo-supervision Dice averages all classes including the background
            (True, ABD's ``DiceLoss``) or the foreground classes only (nnU-Net's Dice).
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
    - The mix loss's Dice is nnU-Net's (foreground classes, batch Dice; ABD's includes the background and squares
      the denominator); the cross pseudo-supervision Dice includes the background like ABD's (for binary data a
      foreground-only Dice is a different loss) but keeps nnU-Net's unsquared denominator (for one-hot targets
      only ``p^2`` vs ``p`` differs).
    - Before the faithfulness review the mix loss was averaged over the two halves (half ABD's weight against
      the cross pseudo-supervision terms), the CPS Dice was foreground-only, and the labeled samples beyond the
      unlabeled count were the forced-foreground ones dropped; the HC18 row of the benchmark up to then was
      measured with that.
    - Regions (``regions_class_order``) and ignore labels are not supported: a clear error at initialisation.
    """

    pseudo_label_weight = hyperparameter(0.5, "weight of pseudo-labeled voxels in the mix loss (BCP/ABD u_weight)")
    mix_loss_weight = hyperparameter(0.5, "weight of each student's mix loss summed over both halves (ABD 0.5)")
    cps_weight = hyperparameter(1.0, "weight of each cross pseudo-supervision term (ABD 1)")
    cps_include_background = hyperparameter(True, "CPS Dice over all classes including background (ABD)")
    copy_paste_box_fraction = hyperparameter(2.0 / 3.0, "BCP box side per axis, share of the patch (BCP 2/3)")
    pseudo_label_largest_component = hyperparameter(True, "largest component per class of the teacher's argmax")
    ema_decay = hyperparameter(0.99, "teacher EMA decay (ABD 0.99, with the warm-up)")
    strong_view = hyperparameter(True, "student 2 sees a strong intensity view of the mixed images")
    strong_contrast_range = hyperparameter((0.75, 1.25), "contrast factor range of the strong view")
    strong_noise_std = hyperparameter(0.1, "Gaussian noise std of the strong view (z-scored intensities)")
    displacement_threshold_start = hyperparameter(0.80, "LLCR confidence threshold at the start (CAD: open)")
    displacement_threshold_end = hyperparameter(0.95, "LLCR confidence threshold at the end (CAD: open)")
    displacement_max_fraction_start = hyperparameter(1.0 / 16.0, "max replaced share of a patch at the start")
    displacement_max_fraction_end = hyperparameter(1.0 / 4.0, "max replaced share of a patch at the end")
    displacement_schedule_shape = hyperparameter("linear", "shape of Dynamic Threshold Escalation")
    region_connectivity = hyperparameter(None, "connectivity of low-confidence components (None: full)")
    region_search_max_voxels = hyperparameter(32768, "confidence maps pooled to about this many voxels (0: none)")
    unsup_weight = hyperparameter(1.0, "maximum of the ramp on pseudo-label terms")
    unsup_rampup_fraction = hyperparameter(0.25, "the ramp spans this share of training (BCP's pre-training share)")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_2 = None
        self.teacher = None

    # ------------------------------------------------------------------ networks
    def build_ssl_modules(self) -> None:
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(f"{type(self).__name__} needs plain class labels: region-based training and ignore "
                               f"labels are not supported (copy-paste mixes hard label maps)")
        self.student_2 = self.add_network("student_2", self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision))
        self.teacher = self.add_ema_teacher(self.ema_decay)  # of student 1, the deployed network

    # ------------------------------------------------------------------ schedules
    def displacement_schedule(self):
        """(confidence threshold, maximum replaced fraction) now: Dynamic Threshold Escalation."""
        p = self.training_progress()
        return (escalate(self.displacement_threshold_start, self.displacement_threshold_end, p, 1.0,
                         self.displacement_schedule_shape),
                escalate(self.displacement_max_fraction_start, self.displacement_max_fraction_end, p, 1.0,
                         self.displacement_schedule_shape))

    # ------------------------------------------------------------------ loss
    def mix_loss_halves(self, output, target: torch.Tensor, labeled_region: torch.Tensor, pseudo_weight: float,
                        n_in: int) -> torch.Tensor:
        """ABD's mix loss of one student: BCP's mix loss of the inward pairs plus that of the outward pairs,
        each under nnU-Net's deep supervision (targets and regions downsampled like nnU-Net's)."""
        def fn(out, t, r):
            return mix_loss(out, t, r, 1.0, pseudo_weight)

        total = self.zero()
        for half in (slice(0, n_in), slice(n_in, target.shape[0])):
            if half.stop > half.start:
                out = [o[half] for o in output] if isinstance(output, (list, tuple)) else output[half]
                total = total + self.ds_loss(fn, out, targets=(target[half], labeled_region[half]),
                                             deep_supervision=True)
        return total

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compute_loss(self, data_l, target_l, data_u):
        n = min(data_l.shape[0], data_u.shape[0])
        ramp = self.current_unsup_weight()
        if n == 0:  # no labeled/unlabeled pair in this step: nnU-Net's supervised loss for both students
            sup = self.loss(self.network(data_l), target_l) + self.loss(self.student_2(data_l), target_l)
            log = self.step_log(sup, self.zero(), ramp)
            for name in ("cps_loss", "displaced_cps_loss"):
                log.loss(name, self.zero())
            return sup, log
        keep = labeled_subset(data_l.shape[0], self.forced_foreground_count(data_l.shape[0]), n)
        x_l, y_l, x_u = data_l[keep], self.top_target(target_l)[keep].long(), data_u[:n]

        with torch.no_grad():
            teacher_logits = self.top(self.teacher(x_u))
            self._sync()
            t0 = time.perf_counter()
            plab = pseudo_labels(teacher_logits, self.pseudo_label_largest_component, self.region_connectivity)
            pseudo_label_s = time.perf_counter() - t0
        mask = box_mask(x_l.shape[2:], self.copy_paste_box_fraction, device=self.device)
        n_in = (n + 1) // 2
        x_mix, y_mix, labeled_region = bcp_mix(x_l, y_l, x_u, plab, mask, n_in)
        x_mix_2 = (strong_intensity_view(x_mix, self.strong_contrast_range, self.strong_noise_std)
                   if self.strong_view else x_mix)

        out_1, out_2 = self.network(x_mix), self.student_2(x_mix_2)
        pseudo_weight = self.pseudo_label_weight * ramp
        mix = (self.mix_loss_halves(out_1, y_mix, labeled_region, pseudo_weight, n_in)
               + self.mix_loss_halves(out_2, y_mix, labeled_region, pseudo_weight, n_in))
        top_1, top_2 = self.top(out_1), self.top(out_2)
        bg = self.cps_include_background
        cps = cps_dice_loss(top_1, top_2, bg) + cps_dice_loss(top_2, top_1, bg)

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
        d_1, d_2 = self.top(self.network(x_d)), self.top(self.student_2(x_d))
        cps_d = cps_dice_loss(d_1, d_2, bg) + cps_dice_loss(d_2, d_1, bg)

        total = self.mix_loss_weight * mix + ramp * self.cps_weight * (cps + cps_d)
        log = self.step_log(mix, cps + cps_d, ramp).loss("cps_loss", cps).loss("displaced_cps_loss", cps_d)
        log.schedule("displacement_threshold", threshold).schedule("displacement_max_fraction", max_fraction)
        log.metric("replaced_fraction", replaced)
        log.timing("region_search_s", region_search_s).timing("pseudo_label_s", pseudo_label_s)
        return total, log
