"""Re-exports of the nnssl trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``)."""

from nnssl.trainers.cad import nnSSL_CADTrainer  # noqa: F401
from nnssl.trainers.mean_teacher import nnSSL_MeanTeacherTrainer  # noqa: F401
from nnssl.trainers.medl import nnSSL_MEDLTrainer  # noqa: F401
from nnssl.trainers.mn import nnSSL_MNTrainer  # noqa: F401


def __getattr__(name: str):
    """Budget variants such as ``nnSSL_MeanTeacherTrainer_20epochs_50iters`` (see nnssl.trainers.variants)."""
    from nnssl.trainers.variants import budget_variant

    cls = budget_variant(name) if not name.startswith("_") else None
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
