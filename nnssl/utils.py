"""Small helpers shared by the commands and the trainers: dataset lookup, file layout, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_PREPROCESSED_FOLDER = "unlabeled"
UNLABELED_MANIFEST = "nnssl_unlabeled.json"


class UserInputError(RuntimeError):
    """An error caused by the user's input or environment; commands print it without a traceback."""


def run_command(fn: Callable[[], Any]) -> Any:
    """Run a command's body; turn :class:`UserInputError` into a one-line message and exit code 2."""
    try:
        return fn()
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UserInputError(f"the environment variable {name} is not set; nnU-Net and nnssl need nnUNet_raw, "
                             f"nnUNet_preprocessed and nnUNet_results (see nnU-Net's setting_up_paths.md)")
    return value


def dataset_name(dataset_name_or_id: str | int) -> str:
    """nnU-Net's dataset name (``DatasetXXX_Name``) for an id or name, with a clear error if unknown."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as e:
        raise UserInputError(f"unknown dataset {dataset_name_or_id!r}: {str(e).splitlines()[0]}") from None


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


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj: Any, path: str) -> None:
    """JSON (indented) written with :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False))


def load_json_or_none(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
