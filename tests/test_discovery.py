"""Trainers are found by name through nnU-Net's own lookup, budget variants included."""

import os
import pickle
import subprocess
import sys

import pytest

from nnssl.commands.trainer_path import ext_trainer_value
from nnssl.nnunet_ext import EXT_TRAINER_DIR
from nnssl.trainers.registry import trainer_class, trainer_names
from nnssl.trainers.variants import budget_variant, parse_variant_name


def test_parse_variant_names():
    assert parse_variant_name("nnSSL_MeanTeacherTrainer_5epochs") == ("nnSSL_MeanTeacherTrainer", 5, None, None)
    assert parse_variant_name("nnUNetTrainer_20epochs_50iters") == ("nnUNetTrainer", 20, 50, None)
    assert parse_variant_name("X_2epochs_5iters_2valiters") == ("X", 2, 5, 2)
    assert parse_variant_name("nnSSL_MeanTeacherTrainer") is None
    assert parse_variant_name("a__b_5epochs") is None


def test_variants_are_cached_picklable_and_set_the_budget():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnssl.trainers.mean_teacher import nnSSL_MeanTeacherTrainer

    cls = budget_variant("nnSSL_MeanTeacherTrainer_3epochs_7iters_2valiters")
    assert cls is budget_variant("nnSSL_MeanTeacherTrainer_3epochs_7iters_2valiters")
    assert issubclass(cls, nnSSL_MeanTeacherTrainer)
    assert pickle.loads(pickle.dumps(cls)) is cls
    base = budget_variant("nnUNetTrainer_3epochs_7iters")
    assert base.__mro__[1] is nnUNetTrainer
    assert budget_variant("NoSuchTrainer_3epochs") is None


def test_variant_budget_applied(workspace):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from conftest import DATASET

    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    plans = load_json(join(pre, "nnUNetPlans_cpu.json"))
    plans["continue_training"] = False
    t = budget_variant("nnSSL_MeanTeacherTrainer_30epochs_7iters_2valiters")(
        plans, "3d_fullres", 0, load_json(join(pre, "dataset.json")), torch.device("cpu"))
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every) == (30, 7, 2, 3)
    assert t.ema_decay == 0.99  # everything else is the base trainer's
    assert t.output_folder_base.endswith("nnSSL_MeanTeacherTrainer_30epochs_7iters_2valiters__nnUNetPlans_cpu__3d_fullres")


@pytest.mark.parametrize("name", list(trainer_names()) + ["nnSSL_MeanTeacherTrainer_2epochs_5iters",
                                                          "nnUNetTrainer_4epochs_10iters"])
def test_found_by_nnunet_lookup_with_ext_trainer(name):
    code = (
        "import os, sys\n"
        f"os.environ['nnUNet_extTrainer'] = {EXT_TRAINER_DIR!r}\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
        "import io, contextlib\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    cls = recursive_find_trainer_class_by_name({name!r})\n"
        "print(cls.__module__, cls.__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    module, cls_name = p.stdout.split()
    assert cls_name == name and "__" not in name
    assert module.startswith("nnssl.trainers")  # canonical module, not the shim's temporary copy


def test_ext_trainer_value_keeps_other_folders():
    assert ext_trainer_value(None) == EXT_TRAINER_DIR
    assert ext_trainer_value("/a" + os.pathsep + EXT_TRAINER_DIR) == EXT_TRAINER_DIR + os.pathsep + "/a"


def test_every_registered_trainer_is_exported_and_named_by_the_rules():
    """The re-export module that nnUNet_extTrainer points at lists exactly the registry's trainers and gives their
    canonical classes; nnU-Net's lookup needs ``__``-free names, and the budget variants parse ``<name>_<E>epochs``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exports", os.path.join(EXT_TRAINER_DIR,
                                                                           "nnssl_trainer_exports.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(n for n in dir(module) if n.startswith("nnSSL_")) == sorted(trainer_names())
    for name in trainer_names():
        assert name.startswith("nnSSL_") and name.endswith("Trainer") and "__" not in name
        cls = getattr(module, name)
        assert cls is trainer_class(name) and cls.__name__ == name
        assert parse_variant_name(f"{name}_3epochs") == (name, 3, None, None)
