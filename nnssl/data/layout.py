"""Where unlabeled images live, before and after preprocessing, and when preprocessed ones are stale.

The one definition of the unlabeled-data layout that the writer (``nnssl_preprocess_unlabeled``), the pool
discovery of the trainers (:mod:`nnssl.data.pool`) and the converters share:

- raw: ``$nnUNet_raw/DatasetXXX/imagesUnlabeled/`` with nnU-Net's channel naming;
- preprocessed: ``$nnUNet_preprocessed/DatasetXXX/unlabeled/<data_identifier>/`` plus a manifest
  (``nnssl_unlabeled.json``) that lists each completely written case and the preprocessing fingerprint;
- pseudo-labels of a teacher: ``.../unlabeled/<data_identifier>/pseudo_labels/<tag>/`` with its manifest
  (``nnssl_pseudo_labels.json``; :mod:`nnssl.data.pseudo_labels`).
"""

from __future__ import annotations

import hashlib
import json
import os

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_PREPROCESSED_FOLDER = "unlabeled"
UNLABELED_MANIFEST = "nnssl_unlabeled.json"
# stored pseudo-labels (nnssl_pseudolabel): unlabeled/<data_identifier>/pseudo_labels/<teacher tag>/, one manifest
# each (nnssl.data.pseudo_labels)
PSEUDO_LABEL_FOLDER = "pseudo_labels"
PSEUDO_LABEL_MANIFEST = "nnssl_pseudo_labels.json"


def unlabeled_preprocessed_folder(preprocessed_base: str, data_identifier: str) -> str:
    """Where preprocessed unlabeled images of one configuration live.

    ``$nnUNet_preprocessed/DatasetXXX/unlabeled/<data_identifier>/``: outside the labeled
    ``<data_identifier>`` folder, so nnU-Net's cross-validation split never sees these cases, and untouched by
    ``nnUNetv2_preprocess`` (which only recreates ``<data_identifier>``).
    """
    return os.path.join(preprocessed_base, UNLABELED_PREPROCESSED_FOLDER, data_identifier)


def preprocessing_fingerprint(plans: dict, configuration: dict) -> str:
    """Hash of everything in the plans that changes how an image is preprocessed (not the network).

    Two plans with the same fingerprint produce identical preprocessed data, e.g. nnU-Net's plans and a
    CPU-scale variant that only shrinks the network. Used to detect stale unlabeled data.
    """
    keys_cfg = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                "resampling_fn_data", "resampling_fn_data_kwargs")
    keys_plans = ("transpose_forward", "foreground_intensity_properties_per_channel", "image_reader_writer")
    relevant = {"configuration": {k: configuration.get(k) for k in keys_cfg},
                "plans": {k: plans.get(k) for k in keys_plans}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
