"""Seeding helpers: same seed same draws, RNG state round trips, the environment variable, worker seeds."""

import pickle
import random

import numpy as np
import pytest
import torch

from nnssl.seeding import NNSSL_SEED_ENV, resolve_seed, rng_state, seed_everything, set_rng_state, worker_seeds


def draws():
    """Next draws of the three libraries (a Python float, a NumPy array, a torch tensor), as plain lists."""
    return [random.random(), random.randint(0, 10 ** 9)], np.random.rand(4).tolist(), torch.rand(4).tolist()


def test_same_seed_same_draws_in_all_three_libraries():
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    other = draws()
    assert all(a != b for a, b in zip(other, first))  # each library's stream changed with the seed
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_rng_state_round_trip_continues_the_same_streams():
    seed_everything(5)
    draws()  # somewhere in the streams, as in a running training
    state = pickle.loads(pickle.dumps(rng_state()))  # as stored in a checkpoint
    expected = draws()
    seed_everything(99)  # a resumed process starts elsewhere
    draws()
    set_rng_state(state)
    assert draws() == expected
    if torch.cuda.is_available():
        assert "cuda" in state
    with pytest.raises(KeyError, match="numpy"):
        set_rng_state({"python": state["python"], "torch": state["torch"]})


def test_resolve_seed_attribute_then_environment(monkeypatch):
    assert NNSSL_SEED_ENV == "nnssl_seed"
    monkeypatch.delenv(NNSSL_SEED_ENV, raising=False)
    assert resolve_seed(None) is None  # unseeded, nnU-Net's behaviour
    assert resolve_seed(7) == 7
    monkeypatch.setenv(NNSSL_SEED_ENV, " 42 ")
    assert resolve_seed(None) == 42
    assert resolve_seed(0) == 0  # the attribute wins, 0 included
    monkeypatch.setenv(NNSSL_SEED_ENV, "")
    assert resolve_seed(None) is None
    monkeypatch.setenv(NNSSL_SEED_ENV, "4.2")
    with pytest.raises(ValueError, match=NNSSL_SEED_ENV):
        resolve_seed(None)
    assert resolve_seed(3) == 3  # a bad variable does not matter when the attribute is set


def test_worker_seeds_are_distinct_across_workers_and_streams_and_reproducible():
    labeled, unlabeled = worker_seeds(0, 12, stream=0), worker_seeds(0, 12, stream=1)
    assert len(labeled) == 12 and len(set(labeled + unlabeled)) == 24
    assert all(0 <= s < 2 ** 32 for s in labeled + unlabeled)
    assert worker_seeds(0, 12, 0) == labeled  # deterministic
    assert worker_seeds(0, 5, 0) == labeled[:5]  # a worker's seed does not depend on the worker count
    assert set(worker_seeds(1, 12, 0)).isdisjoint(labeled)  # another run seed, other seeds
    many = [s for stream in range(8) for s in worker_seeds(2 ** 40, 256, stream)]
    assert len(set(many)) == len(many)
    assert worker_seeds(3, 0, 0) == []
    with pytest.raises(ValueError):
        worker_seeds(0, 2, -1)
