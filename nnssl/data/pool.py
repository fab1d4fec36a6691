"""Which unlabeled images a training run of one fold sees: a plain function of the preprocessed folder.

The pool joins the fold's hidden-label training cases (``splits_final.json`` key ``unlabeled``, read from
nnU-Net's labeled preprocessed folder) and every image that ``nnssl_preprocess_unlabeled`` wrote for the
configuration (``unlabeled/<data_identifier>/``, listed in its manifest). Nothing here needs a trainer: commands
(pseudo-labelling, dataset checks) call :func:`find_unlabeled_pool` with the same arguments.
"""

from __future__ import annotations

import os
from typing import List, Union

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnssl.data.layout import UNLABELED_MANIFEST, preprocessing_fingerprint, unlabeled_preprocessed_folder
from nnssl.data.unlabeled import UnlabeledPool


def hidden_label_cases(preprocessed_base: str, fold: Union[int, str], available: List[str]) -> List[str]:
    """The fold's ``unlabeled`` list of ``splits_final.json`` (training cases whose labels are hidden).

    Args:
        preprocessed_base: ``$nnUNet_preprocessed/DatasetXXX``.
        fold: the fold (``"all"`` has no hidden-label cases).
        available: identifiers preprocessed in the configuration's labeled folder.

    Raises:
        RuntimeError: a case is both hidden-label and train/val, or is not preprocessed; the message says
            what to run.
    """
    splits_file = join(preprocessed_base, "splits_final.json")
    if fold == "all" or not isfile(splits_file):
        return []
    splits = load_json(splits_file)
    if fold >= len(splits):
        return []
    split = splits[fold]
    hidden = list(split.get("unlabeled", []))
    leaked = sorted(set(hidden) & (set(split["train"]) | set(split["val"])))
    if leaked:
        raise RuntimeError(f"splits_final.json fold {fold}: cases {leaked[:5]} are both 'unlabeled' and "
                           f"train/val; remake the split with nnssl_make_split --force")
    missing = sorted(set(hidden) - set(available))
    if missing:
        raise RuntimeError(f"splits_final.json fold {fold} lists unlabeled cases that are not preprocessed in "
                           f"{os.path.dirname(splits_file)}: {missing[:5]}")
    return hidden


def find_unlabeled_pool(preprocessed_base: str, plans: dict, configuration: dict, configuration_name: str,
                        fold: Union[int, str], dataset_class, trainer_name: str = "this trainer") -> UnlabeledPool:
    """The unlabeled pool of ``fold``: hidden-label training cases plus every preprocessed unlabeled image.

    Args:
        preprocessed_base: ``$nnUNet_preprocessed/DatasetXXX``.
        plans: the plans dict; configuration: the configuration's dict of it (``ConfigurationManager.configuration``,
            with ``data_identifier``); both give the preprocessing fingerprint.
        configuration_name: named in messages.
        fold: the fold whose ``unlabeled`` list is used.
        dataset_class: nnU-Net's dataset class of the labeled folder (``nnUNetDatasetBlosc2`` etc.).
        trainer_name: named in the error message.

    Raises:
        RuntimeError: when the pool is empty, the split is inconsistent, or the unlabeled data was made with
            other plans; the message says what to run.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = os.path.basename(preprocessed_base)
    data_identifier = configuration["data_identifier"]
    labeled_folder = join(preprocessed_base, data_identifier)
    datasets = []
    hidden = hidden_label_cases(preprocessed_base, fold, dataset_class.get_identifiers(labeled_folder))
    if hidden:
        datasets.append(dataset_class(labeled_folder, hidden))
    folder = unlabeled_preprocessed_folder(preprocessed_base, data_identifier)
    manifest_file = join(folder, UNLABELED_MANIFEST)
    if isfile(manifest_file):
        manifest = load_json(manifest_file)
        if manifest.get("preprocessing_fingerprint") != preprocessing_fingerprint(plans, configuration):
            raise RuntimeError(f"the unlabeled images in {folder} were preprocessed with other plans "
                               f"({manifest.get('plans_name')}); run nnssl_preprocess_unlabeled -d {dataset} -c "
                               f"{configuration_name} -p {plans.get('plans_name')} --overwrite")
        cases = sorted(manifest.get("cases", {}))
        if cases:
            datasets.append(nnUNetDatasetBlosc2(folder, cases))  # what nnssl_preprocess_unlabeled writes
    if not datasets:
        raise RuntimeError(
            f"{trainer_name} needs unlabeled images and found none for fold {fold}: the fold in "
            f"splits_final.json has no 'unlabeled' cases and {folder} holds no preprocessed images. Run "
            f"'nnssl_preprocess_unlabeled -d {dataset} -c {configuration_name}' (images in "
            f"$nnUNet_raw/{dataset}/imagesUnlabeled) and/or 'nnssl_make_split -d {dataset} --labeled N'. To train "
            f"on labeled data only, use nnUNetTrainer.")
    return UnlabeledPool(datasets)
