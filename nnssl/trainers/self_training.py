"""Offline self-training (noisy student) on pseudo-labels stored by ``nnssl_pseudolabel``."""

from __future__ import annotations

import os

import torch

from nnssl.data.pseudo_labels import PseudoLabeledPool, confidence_weight, identity, select_store
from nnssl.data.unlabeled import UnlabeledPool
from nnssl.losses.segmentation import weighted_dice_ce
from nnssl.trainers.base import nnSSLTrainer
from nnssl.trainers.hyperparameters import hyperparameter


class _KeepLastBatch:
    """The unlabeled batch generator, remembering its last batch (the base passes on only its ``data``; the
    pseudo-labeled term needs its ``target``)."""

    def __init__(self, generator):
        self.generator = generator
        self.last = None

    def __iter__(self):
        return self

    def __next__(self):
        self.last = next(self.generator)
        return self.last


class nnSSL_SelfTrainingTrainer(nnSSLTrainer):
    """Offline self-training: a student learns from labeled patches and from a fixed teacher's stored
    pseudo-labels, both through nnU-Net's augmentation (a noisy student).

    Idea: Noisy Student (Xie et al., CVPR 2020): a teacher labels the unlabeled images once, a student trained
    with strong augmentation on labeled and pseudo-labeled images together becomes the next teacher. The nnU-Net
    maintainers' advice for unlabeled data is the same recipe (MIC-DKFZ/nnUNet #2338, #2233: predict the unlabeled
    images with a trained nnU-Net, train on the union), and the FLARE22/23 winners built their semi-supervised
    entries on it (pseudo-labels of an nnU-Net teacher, filtered, several rounds).

    The two steps::

        nnssl_pseudolabel -d ID -c CONFIG -f FOLD -tr TEACHER_TRAINER -p PLANS        # once per round
        nnUNetv2_train ID CONFIG FOLD -tr nnSSL_SelfTrainingTrainer -p PLANS [-pretrained_weights TEACHER.pth]

    Loss: nnU-Net's Dice + CE (deep supervision) on labeled patches plus ``w(t) * L_pl`` on pseudo-labeled
    patches, ``L_pl`` the voxel-weighted Dice + CE (:func:`nnssl.losses.segmentation.weighted_dice_ce`) against
    the pseudo-label with weight :func:`nnssl.data.pseudo_labels.confidence_weight` (``c * [c >= threshold]``,
    ``c`` the teacher's max class probability), on every deep-supervision output like nnU-Net's own loss.

    How the pseudo-labels reach the loss: the pool (:class:`nnssl.data.pseudo_labels.PseudoLabeledPool`) hands
    nnU-Net's loader each case's pseudo-label and confidence as a two-channel *segmentation*, so nnU-Net's
    cropping and spatial augmentation (rotation, scaling, mirroring) move them with the image exactly as they
    move real labels, and the intensity augmentation touches the image only; the confidence is quantised to
    1/20 for that (:func:`nnssl.data.pseudo_labels.confidence_levels`); padding gets confidence 0 (ignored).
    The batch's ``target`` (kept by :class:`_KeepLastBatch`) is read in :meth:`unsupervised_loss`; deep-supervision
    targets are its nearest-neighbour resizes (:meth:`ds_loss`), as nnU-Net downsamples its labels.

    Which pseudo-labels: :attr:`pseudo_labels` (a store tag or folder; default ``$nnssl_pseudo_labels``, else
    the newest complete store of this preprocessing that is usable, :func:`nnssl.data.pseudo_labels.select_store`).
    The run refuses to start, naming the ``nnssl_pseudolabel`` command to run, when none exists, when it is
    incomplete, from other preprocessing, lacks cases of this fold's pool, or when its teacher was trained on
    labels of this fold's validation or hidden-label cases (a fold-0 teacher labels fold 0's pool; an ensemble
    teacher of all folds fits a student trained with fold ``all``). The store's identity and the teacher's cost
    (:func:`nnssl.data.pseudo_labels.teacher_cost`) go into debug.json and every checkpoint (``nnssl/extra/
    pseudo_labels``); ``--c`` keeps the store of the checkpoint.

    Attributes:
        pseudo_label_threshold: voxels whose teacher confidence is below it are ignored (0.8).
        confidence_weighting: weight kept voxels by their confidence (True) or by 1.
        pseudo_labels: which store (None: ``$nnssl_pseudo_labels``, else automatic).
        and the base's ``unsup_weight`` (1.0: the pseudo-labeled term weighs as much as the labeled one, as in
        Noisy Student's single loss), ``unsup_rampup_shape`` ("none": the teacher is fixed, so its labels are as
        good at step 0 as later; "linear"/"sigmoid" with ``unsup_rampup_fraction`` ramp it),
        ``unlabeled_batch_size`` (None: as many pseudo-labeled as labeled patches per step, the unlabeled share
        of the batch), ``lrg_sampling``, ``ssl_deep_supervision`` (True here).

    Deviations and choices:

    - Starts from scratch by default (Noisy Student trains a new student); ``-pretrained_weights`` of the teacher
      fine-tunes it instead (nnU-Net's flag, same architecture needed).
    - Noisy Student's student is larger than its teacher and uses dropout and stochastic depth; nnU-Net's
      network stays the plans' network, and the noise is nnU-Net's augmentation.
    - Noisy Student's unlabeled:labeled batch ratio is 3:1 or more; here 1:1 by default (GPU memory of 3D
      patches), an attribute (``unlabeled_batch_size``).
    - The confidence threshold 0.8 and the confidence weighting are this implementation's choices (Noisy Student
      keeps soft or hard labels unfiltered at the image level; FLARE winners filter by uncertainty); both are
      attributes. The pseudo-labeled Dice is the batch Dice of the weighted loss, since nnU-Net's loss takes no
      voxel weights.
    - Pseudo-labels are computed once per round (offline) at the preprocessed resolution, with test-time
      mirroring unless ``--disable-tta``; the confidence is quantised to 1/20 on its way through augmentation.
    """

    unsup_weight = hyperparameter(1.0, "weight of the pseudo-labeled term next to nnU-Net's Dice + CE "
                                       "(Noisy Student: one loss over labeled and pseudo-labeled images)")
    unsup_rampup_shape = hyperparameter("none", "ramp of the pseudo-labeled term: 'none' (full weight from the "
                                                "start: the teacher is fixed), 'linear', 'sigmoid', 'cosine'")
    ssl_deep_supervision = hyperparameter(True, "the pseudo-labeled term on every deep-supervision output, "
                                                "like nnU-Net's loss on real labels")
    pseudo_label_threshold = hyperparameter(
        0.8, "teacher confidence (max class probability, 0..1) below which a voxel's pseudo-label is ignored")
    confidence_weighting = hyperparameter(True, "weight kept voxels by the teacher's confidence (False: weight 1)")
    pseudo_labels = hyperparameter(None, "pseudo-label store (tag under unlabeled/<data_identifier>/pseudo_labels/ "
                                         "or a folder); None = $nnssl_pseudo_labels, else the newest usable one")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_label_identity = None  # set when the store is chosen, checkpointed
        self._checkpoint_store = None  # the store a resumed run keeps

    # ------------------------------------------------------------------ the pool: stored pseudo-labels
    def get_unlabeled_pool(self) -> PseudoLabeledPool:
        pool: UnlabeledPool = super().get_unlabeled_pool()
        splits = self.fold_split()
        wanted = self._checkpoint_store or self.pseudo_labels or os.environ.get("nnssl_pseudo_labels") or None
        store = select_store(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                             self.configuration_manager.configuration, self.configuration_name, self.fold,
                             pool.identifiers, splits.get("val", []), splits.get("unlabeled", []), wanted)
        self.pseudo_label_identity = identity(store.manifest, store.folder)
        self.logger.update_config({"nnssl_pseudo_labels": self.pseudo_label_identity})
        self.print_to_log_file(f"pseudo-labels: {store.folder} (teacher {store.manifest['teacher']['trainer']} "
                               f"fold(s) {store.manifest['teacher']['folds']}, {len(store.manifest['cases'])} cases)")
        return PseudoLabeledPool(pool, store)

    def fold_split(self) -> dict:
        """This fold's entry of splits_final.json (``{}`` for fold ``all`` or without a split)."""
        from nnssl.utils import load_json_or_none

        splits = load_json_or_none(os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json"))
        if self.fold == "all" or not splits or int(self.fold) >= len(splits):
            return {}
        return splits[int(self.fold)]

    def get_unlabeled_dataloader(self, pool):
        return _KeepLastBatch(super().get_unlabeled_dataloader(pool))

    def on_train_end(self):
        if isinstance(self.dataloader_unlabeled, _KeepLastBatch):  # the base shuts nnU-Net's workers down
            self.dataloader_unlabeled = self.dataloader_unlabeled.generator
        super().on_train_end()

    # ------------------------------------------------------------------ the pseudo-labeled term
    def unsupervised_loss(self, data_u, student_out_u):
        target = self.dataloader_unlabeled.last["target"][:data_u.shape[0]].to(self.device, non_blocking=True)
        pseudo_label, levels = target[:, :1], target[:, 1:]
        weight = confidence_weight(levels.float(), self.pseudo_label_threshold, self.confidence_weighting)

        def term(output, y, w):
            return weighted_dice_ce(torch.log_softmax(output.float(), 1), y, w)

        loss = self.ds_loss(term, student_out_u, targets=(pseudo_label, weight))
        return loss, {"pseudo_label_kept_fraction": (weight > 0).float().mean().detach()}

    # ------------------------------------------------------------------ checkpoint
    def ssl_extra_state(self) -> dict:
        return {"pseudo_labels": self.pseudo_label_identity}

    def load_ssl_extra_state(self, state: dict) -> None:
        ident = state.get("pseudo_labels")
        if ident:
            self._checkpoint_store = ident["folder"]
