"""Learning-rate-guided (LRG) sampling: the pure rule by hand, and a trainer that draws the scheduled samples."""

import math

import numpy as np
import pytest

from nnssl.schedules import lrg_batch_split, lrg_unlabeled_share
from nnssl.trainers.mean_teacher import nnSSL_MeanTeacherTrainer
from trainer_helpers import make_trainer


def poly(epoch, num_epochs, lr0=0.01):
    return lr0 * (1 - epoch / num_epochs) ** 0.9  # nnU-Net's PolyLRScheduler


def share(rule, epoch, num_epochs=100, start=0, lr=None):
    return lrg_unlabeled_share(rule, lr=poly(epoch, num_epochs) if lr is None else lr, max_lr=0.01, epoch=epoch,
                               start_epoch=start, num_epochs=num_epochs)


def test_lr_rule_at_start_end_and_across_the_poly_schedule():
    assert share("lr", 0) == 0.0  # lr = max: labeled only
    assert share("lr", 100, lr=0.0) == 1.0  # lr = 0: unlabeled only
    assert share("lr", 50) == pytest.approx(1 - 0.5 ** 0.9)  # 0.4641
    assert share("lr", 99) == pytest.approx(1 - 0.01 ** 0.9)  # 0.9842
    values = [share("lr", e) for e in range(100)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert share("lr", 10, start=20) == 0.0 and share("lr", 20, start=20) == pytest.approx(1 - 0.8 ** 0.9)
    assert share("lr", 0, lr=0.02) == 0.0  # a rate above the maximum is clipped, never negative


def test_linear_rule_is_the_released_codes():
    # pakheiyeung/M-N: num_pseudo = floor((epoch - 500) / (4000 - 500) * 5), num_label = 5 - num_pseudo
    for epoch, n_pseudo in ((499, 0), (500, 0), (1199, 0), (1200, 1), (1900, 2), (2600, 3), (3300, 4), (3999, 4)):
        s = share("linear", epoch, num_epochs=4000, start=500)
        assert lrg_batch_split(5, s) == (5 - n_pseudo, n_pseudo), epoch
    assert share("linear", 2250, num_epochs=4000, start=500) == 0.5


def test_batch_split_keeps_the_total_and_floors():
    assert lrg_batch_split(4, 0.0) == (4, 0)
    assert lrg_batch_split(4, 0.2499) == (4, 0)
    assert lrg_batch_split(4, 0.25) == (3, 1)
    assert lrg_batch_split(4, 0.99) == (1, 3)
    assert lrg_batch_split(4, 1.0) == (0, 4)
    assert lrg_batch_split(4, 1.0, max_unlabeled=2) == (2, 2)  # capped by the unlabeled loader; total kept
    assert lrg_batch_split(3, 0.7) == (1, 2)  # floor(2.1)
    with pytest.raises(ValueError):
        lrg_batch_split(4, 1.5)
    with pytest.raises(ValueError):
        lrg_unlabeled_share("cosine", lr=0.1, max_lr=1, epoch=0, start_epoch=0, num_epochs=1)


@pytest.mark.parametrize("share_", [0.1, 0.25, 0.4641, 0.5, 0.75, 0.9])
def test_batch_split_draw_follows_the_schedule_in_expectation_at_batch_size_2(share_):
    rng = np.random.default_rng(0)
    splits = [lrg_batch_split(2, share_, rng=rng) for _ in range(20000)]
    assert all(n_l + n_u == 2 and n_l >= 0 and n_u >= 0 for n_l, n_u in splits)
    assert abs(np.mean([n_u for _, n_u in splits]) / 2 - share_) < 0.02  # the floor gives 0 below 0.5
    counts = {n_u: sum(1 for _, u in splits if u == n_u) for n_u in (0, 1, 2)}
    assert counts[0] > 0 and counts[2] > 0  # all-labeled and all-unlabeled steps both occur


def test_batch_split_draw_extremes_cap_and_seed():
    rng = np.random.default_rng(1)
    assert all(lrg_batch_split(2, 0.0, rng=rng) == (2, 0) for _ in range(100))
    assert all(lrg_batch_split(3, 1.0, rng=rng) == (0, 3) for _ in range(100))
    assert all(lrg_batch_split(4, 1.0, 2, rng=rng) == (2, 2) for _ in range(100))  # capped, total kept
    assert all(lrg_batch_split(4, 0.7, max_unlabeled=0, rng=rng) == (4, 0) for _ in range(100))
    capped = [lrg_batch_split(5, 0.6, 1, rng) for _ in range(1000)]
    assert {n_u for _, n_u in capped} == {0, 1} and all(n_l + n_u == 5 for n_l, n_u in capped)
    draws = [[lrg_batch_split(2, 0.3, rng=g) for _ in range(50)]
             for g in (np.random.default_rng(7), np.random.default_rng(7))]
    assert draws[0] == draws[1]  # same seed, same draws
    with pytest.raises(TypeError, match="Generator"):
        lrg_batch_split(2, 0.5, rng=np.random.RandomState(0))
    with pytest.raises(ValueError):
        lrg_batch_split(2, 0.5, max_unlabeled=-1)


@pytest.mark.parametrize("rule", ["lr", "linear"])
@pytest.mark.slow
def test_trainer_with_lrg_draws_the_scheduled_samples(workspace, rule):
    t = make_trainer(nnSSL_MeanTeacherTrainer, epochs=5, iters=4)
    t.lrg_sampling, t.lrg_rule, t.lrg_start_epoch, t.seed = True, rule, 1, 0
    t.run_training()
    log = t.logger.local_logger.my_fantastic_logging
    b = t.batch_size
    assert b == 2  # the synthetic CPU plans
    # hand values, E = 5, start 1: "lr": 1 - (1 - e/5)^0.9 = -, 0.182, 0.369, 0.562, 0.765
    #                               "linear": (e - 1) / 4 = -, 0, 0.25, 0.5, 0.75
    assert log["n_unlabeled"][0] == 0  # share 0 before the start epoch: never an unlabeled sample
    assert [n_l + n_u for n_l, n_u in zip(log["n_labeled"], log["n_unlabeled"])] == [b] * 5
    for epoch, lr in enumerate(log["lrs"]):
        s = lrg_unlabeled_share(rule, lr=lr, max_lr=t.initial_lr, epoch=epoch, start_epoch=1, num_epochs=5)
        assert log["lrg_unlabeled_share"][epoch] == pytest.approx(s)
    assert log["lrg_unlabeled_share"][0] == 0.0 and log["lrg_unlabeled_share"][4] > 0.7
    assert np.isnan(log["unsup_loss"][0]) or log["unsup_loss"][0] == 0.0  # epoch 0: no unlabeled samples
    assert log["unsup_loss"][4] > 0
    assert math.isclose(log["lrg_unlabeled_share"][2], {"lr": 1 - 0.6 ** 0.9, "linear": 0.25}[rule], rel_tol=1e-6)


def test_trainer_realised_share_follows_the_schedule_at_batch_size_2(workspace):
    """The base's own batch composition over a run (B = 2): its mean unlabeled share is the schedule's mean. The
    earlier floor(share * B) drew none below share 0.5 (mean 0.3 here instead of 0.48)."""
    t = make_trainer(nnSSL_MeanTeacherTrainer, epochs=10, iters=50)
    t.lrg_sampling, t.lrg_rule, t.seed = True, "lr", 0
    t.initialize()
    assert t.batch_size == 2
    realised, scheduled = [], []
    for epoch in range(t.num_epochs):
        t.current_epoch = epoch
        t.optimizer.param_groups[0]["lr"] = t.initial_lr * (1 - epoch / t.num_epochs) ** 0.9
        t.lrg_unlabeled_share_now = lrg_unlabeled_share("lr", lr=t.optimizer.param_groups[0]["lr"],
                                                        max_lr=t.initial_lr, epoch=epoch, start_epoch=0,
                                                        num_epochs=t.num_epochs)
        for _ in range(t.num_iterations_per_epoch):
            n_l, n_u = t.batch_composition()
            assert n_l + n_u == 2
            realised.append(n_u / 2)
            scheduled.append(t.lrg_unlabeled_share_now)
    assert abs(np.mean(realised) - np.mean(scheduled)) < 0.1
    floor_mean = np.mean([lrg_batch_split(2, s)[1] / 2 for s in scheduled])
    assert abs(floor_mean - np.mean(scheduled)) > 0.1  # what the test guards against
