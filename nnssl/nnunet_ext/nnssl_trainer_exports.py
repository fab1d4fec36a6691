"""Re-exports of the nnssl trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

The trainers are the ones of :mod:`nnssl.trainers.registry`, resolved on first access; budget variants such
as ``nnSSL_MeanTeacherTrainer_20epochs_50iters`` are made on demand (see :mod:`nnssl.trainers.variants`).

A name meant as a budget variant that gives none (``nnSSL_MeanTeacherTrainer_5epochs_xiters``, ``_0epochs``,
``_5epochs_0iters``, an unknown base trainer) raises :class:`nnssl.trainers.variants.TrainerNameError` with the
problem and the name that would work: nnU-Net's lookup tests names with ``hasattr``, which passes on anything but
an ``AttributeError``, so the message reaches the user instead of nnU-Net's generic "Could not find requested
nnunet trainer". It does so only when no folder after this one in ``nnUNet_extTrainer`` is left to search (such a
folder may define that very name); otherwise the lookup goes on, and ``nnssl_train``/``nnssl_predict`` explain
a name that nothing defines.
"""

import os


def _folders_searched_after_this_one() -> list:
    """The existing folders that nnU-Net searches after this module's (``nnUNet_extTrainer`` order)."""
    here = os.path.dirname(os.path.abspath(__file__))
    folders = [os.path.abspath(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    later = folders[folders.index(here) + 1:] if here in folders else []
    return [p for p in later if os.path.isdir(p)]


def __getattr__(name: str):
    from nnssl.trainers.registry import TRAINERS, trainer_class
    from nnssl.trainers.variants import TrainerNameError, budget_variant, variant_name_problem

    if name in TRAINERS:
        return trainer_class(name)
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = budget_variant(name)
    if cls is not None:
        return cls
    problem = None if _folders_searched_after_this_one() else variant_name_problem(name)
    if problem is not None:
        raise TrainerNameError(problem)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    from nnssl.trainers.registry import TRAINERS

    return sorted(TRAINERS)
