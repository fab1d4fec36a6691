"""Seeding and RNG state for reproducible runs: pure helpers the trainers call.

A run is seeded by the trainer attribute, else by the environment variable ``nnssl_seed`` (:data:`NNSSL_SEED_ENV`,
lower-case-prefixed like nnU-Net's ``nnUNet_...`` variables), else not at all (:func:`resolve_seed` returns None
and nothing is seeded, nnU-Net's behaviour). A seeded run seeds Python's ``random``, NumPy's global generator and
torch (CPU and every CUDA device) with :func:`seed_everything`, gives each background augmentation worker its own
seed (:func:`worker_seeds`, one stream per loader), and stores :func:`rng_state` in its checkpoints so that a
resumed run continues the same random streams (:func:`set_rng_state`).

What stays non-deterministic even with a seed:

- background augmentation workers: ``NonDetMultiThreadedAugmenter`` delivers batches in the order the workers
  finish them, so which seeded worker's batch comes at which step depends on timing. Each worker's own sequence
  is reproducible; the interleaving is not (only a single-process loader, or batchgenerators' ordered
  ``MultiThreadedAugmenter``, fixes it);
- CUDA kernels: ``torch.backends.cudnn.benchmark`` (nnU-Net turns it on) picks algorithms by timing, and kernels
  with atomic adds (e.g. the backward of convolutions, interpolation, ``index_add``/scatter) sum in a varying
  order, so floating-point results differ in the last bits and diverge over training;
- ``torch.compile``: the generated kernels (and their autotuning) may differ between runs;
- anything that draws from a generator not seeded here (a library's own ``numpy.random.Generator``, other
  processes). Under DDP every rank calls these helpers itself; to give ranks different streams the caller
  offsets the seed by the rank.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

NNSSL_SEED_ENV = "nnssl_seed"

_MAX_SEED = 2 ** 32 - 1  # NumPy's legacy global generator takes seeds in [0, 2^32)


def resolve_seed(attribute_value: Optional[int]) -> Optional[int]:
    """The run's seed: ``attribute_value`` if not None, else the environment variable ``nnssl_seed``, else None.

    Args:
        attribute_value: the trainer's seed attribute (an int) or None.

    Returns:
        an int seed, or None for an unseeded run (the variable unset or empty).

    Raises:
        ValueError: when the environment variable is set to something that is not an integer.
    """
    if attribute_value is not None:
        return int(attribute_value)
    raw = os.environ.get(NNSSL_SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {NNSSL_SEED_ENV}={raw!r} is not an integer seed; "
                         f"set it to e.g. 0, or unset it for an unseeded run") from None


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators with ``seed``.

    Args:
        seed: an integer in ``[0, 2^32)`` (NumPy's global generator's range).

    Raises:
        ValueError: for a seed outside that range.
    """
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators of all devices too (lazily if CUDA is not initialised)


def rng_state() -> Dict[str, Any]:
    """The current state of Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators.

    Returns:
        a picklable dict (``torch.save``-able, loadable with ``weights_only=False``): ``"python"``, ``"numpy"``,
        ``"torch"`` (a ``uint8`` CPU tensor) and, when CUDA is available, ``"cuda"`` (one tensor per device).
    """
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state`: the next draws are those that followed its capture.

    A ``"cuda"`` entry is restored when CUDA is available, for as many devices as both the state and this machine
    have (a state saved on another number of GPUs restores the common ones); without CUDA it is ignored.

    Raises:
        KeyError: when ``"python"``, ``"numpy"`` or ``"torch"`` is missing.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise KeyError(f"RNG state lacks {missing}; expected a dict from nnssl.seeding.rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        for device, s in enumerate(list(cuda)[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device)


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of ``[0, 2^32)`` that mixes every input bit into every output
    bit (so consecutive inputs give unrelated-looking outputs, and distinct inputs distinct outputs)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MAX_SEED
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MAX_SEED
    return h ^ (h >> 16)


def worker_seeds(seed: int, n_workers: int, stream: int) -> List[int]:
    """Distinct seeds for the ``n_workers`` background augmentation workers of one loader.

    For batchgenerators' ``NonDetMultiThreadedAugmenter(..., seeds=worker_seeds(seed, n, stream))``; each worker
    seeds NumPy's global generator (and torch) with its seed. ``stream`` tells a run's loaders apart (e.g. 0 the
    labeled training loader, 1 the unlabeled one, 2 validation). Seed ``i`` is ``fmix32(base XOR (stream << 16 | i))``
    with ``base`` derived from ``seed`` by NumPy's ``SeedSequence``: for one run seed, all seeds of all workers and
    streams are distinct (XOR with a fixed base and the bijective mixer are both injective).

    Args:
        seed: the run's seed (>= 0).
        n_workers: number of workers, in ``[0, 2^16]``.
        stream: the loader's stream index, in ``[0, 2^16)``.

    Returns:
        ``n_workers`` distinct ints in ``[0, 2^32)``.

    Raises:
        ValueError: for a negative seed, or a worker count or stream outside its range.
    """
    if seed < 0 or not 0 <= n_workers <= 2 ** 16 or not 0 <= stream < 2 ** 16:
        raise ValueError(f"need seed >= 0, n_workers in [0, 65536] and stream in [0, 65536), "
                         f"got {seed}, {n_workers}, {stream}")
    base = int(np.random.SeedSequence(int(seed)).generate_state(1, dtype=np.uint32)[0])
    return [_fmix32(base ^ ((int(stream) << 16) | i)) for i in range(int(n_workers))]
