"""The one list of nnssl's trainers: name -> module, and what each supports.

Everything that enumerates the trainers (the re-export module that ``nnUNet_extTrainer`` points at, the
discovery tests, the benchmark scripts) reads this table; a new method is one line here. Importing this module
imports no trainer (no import-time work): :func:`trainer_class` imports on demand.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

# name -> (module, configurations it trains: "2d", "3d" or both)
TRAINERS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "nnSSL_MeanTeacherTrainer": ("nnssl.trainers.mean_teacher", ("2d", "3d")),
    "nnSSL_MEDLTrainer": ("nnssl.trainers.medl", ("2d", "3d")),
    "nnSSL_CADTrainer": ("nnssl.trainers.cad", ("2d", "3d")),
    "nnSSL_MNTrainer": ("nnssl.trainers.mn", ("3d",)),
    "nnSSL_SelfTrainingTrainer": ("nnssl.trainers.self_training", ("2d", "3d")),
    "nnSSL_MNRandom2DTrainer": ("nnssl.trainers.mn", ("3d",)),  # M&N's ablation: random 2D weights, no LoRA
}


# trainers that need a step before nnUNetv2_train (nnssl_pseudolabel with a trained teacher): a runner that trains
# every trainer the same way leaves them out with trainer_names(..., teacher_first=False)
TEACHER_FIRST = ("nnSSL_SelfTrainingTrainer",)


def trainer_names(dimensionality: str = None, teacher_first: bool = True) -> Tuple[str, ...]:
    """The nnssl trainers' names; with ``dimensionality`` ("2d" or "3d") only those that train it; with
    ``teacher_first=False`` without those of :data:`TEACHER_FIRST`."""
    return tuple(n for n, (_, dims) in TRAINERS.items() if (dimensionality is None or dimensionality in dims)
                 and (teacher_first or n not in TEACHER_FIRST))


def trainer_class(name: str) -> type:
    """The trainer class called ``name`` (imported on first use).

    Raises:
        KeyError: for a name that is not an nnssl trainer (the message lists the ones that are).
    """
    if name not in TRAINERS:
        raise KeyError(f"{name!r} is not an nnssl trainer; known: {', '.join(TRAINERS)}")
    return getattr(importlib.import_module(TRAINERS[name][0]), name)
