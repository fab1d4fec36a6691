"""``nnssl_train`` / ``nnssl_predict``: nnU-Net's own train and predict commands with nnssl's trainers findable.

They set ``nnUNet_extTrainer`` in-process (keeping any folders the user already has there) and then run
``nnUNetv2_train`` / ``nnUNetv2_predict`` unchanged, with the same arguments.

A trainer name that gives no trainer ends in one line on stderr (exit code 1) instead of nnU-Net's traceback: a
budget variant that does not parse or has a zero budget (:func:`nnssl.trainers.variants.variant_name_problem`),
or a name that nothing defines (:func:`trainer_not_found`); both name the trainer that would work. With these
commands ``nnUNet_extTrainer`` is always right, so nnU-Net's "Could not find requested nnunet trainer" here means
the name; for the stock commands, ``nnssl_trainer_path --check`` tells a missing or stale ``nnUNet_extTrainer``.
"""

from __future__ import annotations

import os
import re
from typing import Callable

from nnssl.commands.trainer_path import ext_trainer_value
from nnssl.nnunet_ext import EXT_TRAINER_DIR

_NOT_FOUND = re.compile(r"Could not find requested nnunet trainer (\S+) in")  # nnU-Net's lookup error


def _set_ext_trainer() -> None:
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))


def trainer_not_found(name: str) -> str:
    """One line for a trainer name that neither nnU-Net, nnssl nor the other ``nnUNet_extTrainer`` folders
    define: what was searched and the name that would work."""
    from nnssl.trainers.registry import TRAINERS
    from nnssl.trainers.variants import VARIANT_FORM, closest_trainer_name, variant_name_problem

    problem = variant_name_problem(name)
    if problem is not None:
        return problem
    others = [p for p in os.environ["nnUNet_extTrainer"].split(os.pathsep) if p and p != EXT_TRAINER_DIR]
    closest = closest_trainer_name(name)
    return (f"no trainer called {name!r}: not in nnU-Net, not one of nnssl's ({', '.join(TRAINERS)}, or with a "
            f"budget {VARIANT_FORM}), not in the other nnUNet_extTrainer folders ({', '.join(others) or 'none'}); "
            + (f"use {closest}" if closest else "a trainer of your own: add its folder to nnUNet_extTrainer"))


def _run(prog: str, entry_point: Callable[[], None]) -> None:
    """Run nnU-Net's ``entry_point``; a trainer name that gives no trainer exits with one line."""
    from nnssl.trainers.variants import TrainerNameError

    try:
        entry_point()
    except TrainerNameError as e:
        raise SystemExit(f"{prog}: {e}") from None
    except RuntimeError as e:
        match = _NOT_FOUND.search(str(e))
        if match is None:
            raise
        raise SystemExit(f"{prog}: {trainer_not_found(match.group(1))}") from None


def train() -> None:
    _set_ext_trainer()
    from nnunetv2.run.run_training import run_training_entry

    _run("nnssl_train", run_training_entry)


def predict() -> None:
    _set_ext_trainer()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    _run("nnssl_predict", predict_entry_point)
