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
seeds a stock base trainer from ``$nnssl_seed`` as nnssl trainers seed themselves, writes ``checkpoint_latest.pth``
every tenth of the run (at most every 50 epochs, nnU-Net's interval), so that
``--c`` resumes an interrupted short run without losing much, and logs the wall time of each epoch's training
phase (``train_phase_seconds``, validation excluded) so that seconds per iteration compare across trainers. The class is created when nnU-Net looks the name
up (through the module ``__getattr__`` below and the re-export module that ``nnUNet_extTrainer`` points at); the
same name always gives the same class object, and the class pickles by name.

A name meant as a variant that gives none (a suffix that does not parse, a budget of zero, a base trainer that does
not exist) is explained by :func:`variant_name_problem`: one line saying what is wrong and the name that would
work, raised as :class:`TrainerNameError` by the re-export module and printed by ``nnssl_train``/``nnssl_predict``
instead of nnU-Net's generic "Could not find requested nnunet trainer".
"""

from __future__ import annotations

import difflib
import os
import re
import time
from typing import Optional, Type

import torch

_VARIANT = re.compile(r"^(?P<base>[A-Za-z]\w*?)_(?P<epochs>\d+)epochs(?:_(?P<iters>\d+)iters)?"
                      r"(?:_(?P<val>\d+)valiters)?$")
VARIANT_FORM = "<Trainer>_<E>epochs[_<I>iters][_<V>valiters]"
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
    if base is None or 0 in (epochs, iters, val_iters):
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

    def initialize(self):
        # nnssl trainers seed themselves (nnSSLTrainer.initialize); a stock base (the labeled-only baseline) is
        # seeded here the same way from $nnssl_seed, before nnU-Net builds and initialises the network, so that a
        # benchmark's seeds mean the same for every row
        from nnssl import seeding
        from nnssl.trainers.base import nnSSLTrainer

        if not issubclass(base, nnSSLTrainer) and not self.was_initialized:
            seed = seeding.resolve_seed(None)
            if seed is not None:
                seeding.seed_everything(seed)
        base.initialize(self)

    budget = f"{epochs} epochs" + (f" x {iters} iterations" if iters else "") + \
             (f", {val_iters} validation iterations" if val_iters else "")
    cls = type(name, (base,), {"__init__": __init__, "initialize": initialize,
                               "on_train_epoch_start": on_train_epoch_start,
                               "on_train_epoch_end": on_train_epoch_end, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base_name} with a budget of {budget} (see nnssl.trainers.variants)."})
    _made[name] = cls
    return cls


class TrainerNameError(RuntimeError):
    """A trainer name meant as a budget variant that gives none (message: :func:`variant_name_problem`)."""


def closest_trainer_name(name: str) -> Optional[str]:
    """The nnssl trainer (or ``nnUNetTrainer``) whose name is closest to ``name``, if any is close."""
    from nnssl.trainers.registry import TRAINERS

    matches = difflib.get_close_matches(name, [*TRAINERS, "nnUNetTrainer"], n=1, cutoff=0.8)
    return matches[0] if matches else None


def variant_name_problem(name: str) -> Optional[str]:
    """Why ``name``, meant as a budget variant, gives no trainer: one line with the problem and the name that would
    work; None for a name that gives a variant or is not meant as one.

    Meant as a variant: the name is no trainer itself and contains ``_<digits>epochs`` or starts with an nnssl
    trainer's name and ``_``.
    Problems: the suffix does not parse (``_5epochs_xiters``), a budget of zero (``_0epochs``, ``_5epochs_0iters``,
    ``_0valiters``), a base trainer that neither nnssl nor nnU-Net has (``nnSSL_MeanTeachrTrainer_5epochs``).
    """
    from nnssl.trainers.registry import TRAINERS

    counted = re.search(r"_\d+epochs", name)
    base = next((t for t in TRAINERS if name.startswith(t + "_")), None) or \
        (name[:counted.start()] if counted else None)
    if base is None or budget_variant(name) is not None or _find_base_trainer(name) is not None:
        return None
    suffix = name[len(base):]

    def number(pattern: str) -> Optional[int]:
        m = re.search(pattern, suffix, re.IGNORECASE)
        return None if m is None else int(m.group(1))

    budget = {"epochs": number(r"(\d+)_?epochs?"), "iters": number(r"(\d+)_?iters?"),
              "valiters": number(r"(\d+)_?valiters?")}
    zeros = [unit for unit, n in budget.items() if n == 0]
    known = _find_base_trainer(base) is not None
    if not known:
        problem = f"there is no trainer {base!r} to give a budget to (nnssl's are {', '.join(TRAINERS)})"
    elif zeros:
        problem = f"its budget has 0 {' and 0 '.join(zeros)}"
    else:
        problem = f"its budget suffix {suffix!r} does not parse"
    fixed = base if known else closest_trainer_name(base)
    if fixed is None:
        fix = ""
    elif budget["epochs"] is None:
        fix = f"; use {fixed} (nnU-Net's full budget) or {fixed}_<E>epochs"
    else:
        fix = f"; use {fixed}" + "".join(f"_{max(1, n)}{unit}" for unit, n in budget.items() if n is not None)
    return f"{name!r} is not a trainer: {problem}; budget variants are {VARIANT_FORM}, numbers >= 1{fix}"


def __getattr__(name: str):
    cls = budget_variant(name) if not name.startswith("_") else None
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
