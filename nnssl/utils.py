"""Small helpers shared by the commands and the trainers: dataset lookup, user errors, atomic writes.

The unlabeled-data layout lives in :mod:`nnssl.data.layout`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional


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
