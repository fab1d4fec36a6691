"""Re-exports of the nnssl trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

The trainers are the ones of :mod:`nnssl.trainers.registry`, resolved on first access; budget variants such
as ``nnSSL_MeanTeacherTrainer_20epochs_50iters`` are made on demand (see :mod:`nnssl.trainers.variants`).
"""


def __getattr__(name: str):
    from nnssl.trainers.registry import TRAINERS, trainer_class
    from nnssl.trainers.variants import budget_variant

    if name in TRAINERS:
        return trainer_class(name)
    cls = budget_variant(name) if not name.startswith("_") else None
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls


def __dir__():
    from nnssl.trainers.registry import TRAINERS

    return sorted(TRAINERS)
