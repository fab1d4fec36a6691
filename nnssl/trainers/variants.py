"""Short-budget variants of any trainer, by name, through the stock nnU-Net commands.

nnU-Net's way of changing a trainer's budget is a variant class (``nnUNetTrainer_5epochs``). nnssl makes such
variants on demand for every budget: a trainer name followed by a suffix

    <Trainer>_<E>epochs[_<I>iters][_<V>valiters]

is ``<Trainer>`` with ``num_epochs = E`` and, when given, ``num_iterations_per_epoch = I`` and
``num_val_iterations_per_epoch = V``. ``<Trainer>`` is any nnssl trainer or any trainer that ships with nnU-Net,
so the labeled-only baseline gets exactly the same budget:

    nnUNetv2_train 4 3d_fullres 0 -tr nnSSL_MeanTeacherTrainer_20epochs_50iters
    nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_20epochs_50iters

Ramp-ups expressed in fractions of the training (the nnssl default) follow the shorter budget. The variant
writes ``checkpoint_latest.pth`` every tenth of the run (at most every 50 epochs, nnU-Net's interval), so that
``--c`` resumes an interrupted short run without losing much, and logs the wall time of each epoch's training
phase (``train_phase_seconds``, validation excluded) so that seconds per iteration compare across trainers. The class is created when nnU-Net looks the name
up (through the module ``__getattr__`` below and the re-export module that ``nnUNet_extTrainer`` points at); the
same name always gives the same class object, and the class pickles by name.
"""

from __future__ import annotations

import os
import re
import time
from typing import Optional, Type

import torch

_VARIANT = re.compile(r"^(?P<base>[A-Za-z]\w*?)_(?P<epochs>\d+)epochs(?:_(?P<iters>\d+)iters)?"
                      r"(?:_(?P<val>\d+)valiters)?$")
TRAIN_PHASE_KEY = "train_phase_seconds"
_made: dict = {}  # cache: the same name must give the same class object (identity, pickling)


def parse_variant_name(name: str) -> Optional[tuple]:
    """``(base, epochs, iters or None, val_iters or None)`` for a variant name, else None."""
    m = _VARIANT.match(name)
    if m is None or "__" in name:
        return None
    to_int = lambda s: None if s is None else int(s)  # noqa: E731
    return m.group("base"), int(m.group("epochs")), to_int(m.group("iters")), to_int(m.group("val"))


def _find_base_trainer(name: str) -> Optional[type]:
    """An nnssl trainer (:mod:`nnssl.trainers.registry`) or an nnU-Net in-tree trainer called ``name`` (never
    searches nnUNet_extTrainer)."""
    import nnunetv2
    from nnunetv2.utilities.find_objects import recursive_find_python_class

    from nnssl.trainers.registry import TRAINERS, trainer_class

    if name in TRAINERS:
        return trainer_class(name)
    tree = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    return recursive_find_python_class(tree, name, current_module="nnunetv2.training.nnUNetTrainer")


def budget_variant(name: str) -> Optional[Type]:
    """The variant class for ``name`` (created on first use), or None if the name is not a variant name."""
    if name in _made:
        return _made[name]
    parsed = parse_variant_name(name)
    if parsed is None:
        return None
    base_name, epochs, iters, val_iters = parsed
    base = _find_base_trainer(base_name)
    if base is None or epochs < 1 or iters == 0:
        return None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iters is not None:
            self.num_iterations_per_epoch = iters
        if val_iters is not None:
            self.num_val_iterations_per_epoch = val_iters
        self.save_every = max(1, min(self.save_every, epochs // 10))
        log = self.logger.local_logger.my_fantastic_logging
        log.setdefault(TRAIN_PHASE_KEY, [])

    def on_train_epoch_start(self):
        self._train_phase_start = time.perf_counter()
        base.on_train_epoch_start(self)

    def on_train_epoch_end(self, train_outputs):
        base.on_train_epoch_end(self, train_outputs)
        self.logger.log(TRAIN_PHASE_KEY, time.perf_counter() - self._train_phase_start, self.current_epoch)

    budget = f"{epochs} epochs" + (f" x {iters} iterations" if iters else "") + \
             (f", {val_iters} validation iterations" if val_iters else "")
    cls = type(name, (base,), {"__init__": __init__, "on_train_epoch_start": on_train_epoch_start,
                               "on_train_epoch_end": on_train_epoch_end, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base_name} with a budget of {budget} (see nnssl.trainers.variants)."})
    _made[name] = cls
    return cls


def __getattr__(name: str):
    cls = budget_variant(name) if not name.startswith("_") else None
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
