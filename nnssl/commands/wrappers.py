"""``nnssl_train`` / ``nnssl_predict``: nnU-Net's own train and predict commands with nnssl's trainers findable.

They set ``nnUNet_extTrainer`` in-process (keeping any folders the user already has there) and then run
``nnUNetv2_train`` / ``nnUNetv2_predict`` unchanged, with the same arguments.
"""

from __future__ import annotations

import os

from nnssl.commands.trainer_path import ext_trainer_value


def _set_ext_trainer() -> None:
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))


def train() -> None:
    _set_ext_trainer()
    from nnunetv2.run.run_training import run_training_entry

    run_training_entry()


def predict() -> None:
    _set_ext_trainer()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    predict_entry_point()
