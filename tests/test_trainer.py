"""The generic Trainer: it learns, stops early on validation and keeps the best weights, every
hyperparameter is wired, it is deterministic per seed, and a diverging loss is an error."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from recsys_torch.errors import ConfigError, TrainingError
from recsys_torch.metrics import predict
from recsys_torch.models import MFModel, PopularityModel
from recsys_torch.splits import random_split
from recsys_torch.batches import EpochOrder
from recsys_torch.trainer import Trainer

FAST = dict(device="cpu", progress=False, num_threads=1)


@pytest.fixture(scope="module")
def split(tiny_inter):
    return random_split(tiny_inter, seed=0)[0]


def mf(inter, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MFModel(inter.n_users, inter.n_items, **{"embedding_dim": 8, **kwargs})


def test_loss_goes_down(split):
    trainer = Trainer(epochs=5, batch_size=128, lr=0.01, patience=None, **FAST)
    result = trainer.fit(mf(split.train), split.train, split.val)
    losses = [h["train/loss"] for h in result.history]
    rmses = [h["val/rmse"] for h in result.history]
    assert len(losses) == 5
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert rmses[-1] < rmses[0]
    assert result.fit_seconds > 0 and result.train_ratings_per_second > 0


# --- early stopping ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_case(tiny_inter):
    """Validation targets halfway between the global mean and the training ratings of the same pairs:
    predictions start at the mean, pass the halfway point, then overfit past it, so validation RMSE
    first falls and then rises."""
    train = tiny_inter.subset(torch.arange(600))
    mu = train.ratings.mean()
    return train, replace(train, ratings=(train.ratings + mu) / 2)


def fit_recording(train, val, patience):
    states, records = {}, {}

    def record_state(trainer, model, epoch, record):
        states[epoch] = copy.deepcopy(model.state_dict())
        records[epoch] = dict(record)

    model = mf(train, embedding_dim=16, reg=0.0, reg_bias=0.0)
    trainer = Trainer(epochs=12, batch_size=100, lr=0.01, patience=patience, callbacks=[record_state], **FAST)
    return model, trainer.fit(model, train, val), states, records


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_best_weights_are_restored(overfit_case):
    train, val = overfit_case
    model, result, states, records = fit_recording(train, val, patience=None)
    last = len(result.history)
    assert last == 12 and not result.stopped_early
    best = min(records, key=lambda e: records[e]["val/rmse"])
    assert 1 < best < last - 1  # the case really got worse after its best epoch
    assert result.best_epoch == best and result.best_metric == records[best]["val/rmse"]
    assert_state_equal(model.state_dict(), states[best])
    assert not torch.equal(model.user_factors.weight, states[last]["user_factors.weight"])
    assert predict(model, val.users, val.items).sub(val.ratings).pow(2).mean().sqrt().item() == pytest.approx(
        records[best]["val/rmse"], abs=1e-5)


def test_patience_stops_early_and_restores_the_best(overfit_case):
    train, val = overfit_case
    model, result, states, records = fit_recording(train, val, patience=3)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 3 < 12
    assert_state_equal(model.state_dict(), states[result.best_epoch])


def test_min_delta_counts_small_gains_as_no_gain(overfit_case):
    train, val = overfit_case
    states = {}
    model = mf(train, embedding_dim=16, reg=0.0, reg_bias=0.0)
    result = Trainer(epochs=12, batch_size=100, lr=0.01, patience=1, min_delta=10.0,
                     callbacks=[lambda t, m, e, r: states.setdefault(e, copy.deepcopy(m.state_dict()))],
                     **FAST).fit(model, train, val)
    assert result.best_epoch == 1 and len(result.history) == 2
    assert_state_equal(model.state_dict(), states[1])


# --- every hyperparameter changes the result (Surprise's test_SVD_parameters) --------------------------

BASE_MODEL = dict(embedding_dim=8, reg=0.05, reg_bias=0.01, init_std=0.1)
BASE_TRAINER = dict(epochs=3, batch_size=128, lr=0.01, optimizer="adam", patience=None, seed=0)


def predictions(split, model_kw=(), trainer_kw=()):
    model = mf(split.train, **{**BASE_MODEL, **dict(model_kw)})
    Trainer(**{**BASE_TRAINER, **dict(trainer_kw)}, **FAST).fit(model, split.train, split.val)
    return predict(model, split.test.users, split.test.items)


@pytest.fixture(scope="module")
def reference(split):
    return predictions(split)


def test_same_settings_same_predictions(split, reference):
    assert torch.equal(predictions(split), reference)


@pytest.mark.parametrize("model_kw, trainer_kw", [
    ({}, {"lr": 0.02}),
    ({}, {"epochs": 4}),
    ({}, {"batch_size": 64}),
    ({}, {"optimizer": "sgd"}),
    ({}, {"optimizer": "adagrad"}),
    ({}, {"seed": 1}),
    ({}, {"lr_schedule": "exponential", "lr_gamma": 0.5}),
    ({"embedding_dim": 12}, {}),
    ({"reg": 0.5}, {}),
    ({"reg_bias": 0.5}, {}),
    ({"init_std": 0.3}, {}),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "-")
def test_each_hyperparameter_changes_the_predictions(split, reference, model_kw, trainer_kw):
    changed = predictions(split, model_kw, trainer_kw)
    assert (changed - reference).abs().max() > 1e-4


def test_exponential_schedule_decays_the_learning_rate(split):
    result = Trainer(epochs=3, batch_size=256, lr=0.01, lr_schedule="exponential", lr_gamma=0.5,
                     patience=None, **FAST).fit(mf(split.train), split.train)
    assert [h["lr"] for h in result.history] == pytest.approx([0.01, 0.005, 0.0025])


# --- failures --------------------------------------------------------------------------------------------


def test_nan_loss_names_the_epoch(split):
    def poison(trainer, model, epoch, record):
        if epoch == 1:
            with torch.no_grad():
                model.user_factors.weight.fill_(float("nan"))

    trainer = Trainer(epochs=5, batch_size=256, lr=0.01, callbacks=[poison], **FAST)
    with pytest.raises(TrainingError, match=r"the training loss became nan at epoch 2, step 1: lower trainer.lr"):
        trainer.fit(mf(split.train), split.train, split.val)


def test_diverging_ratings_raise_at_the_first_step(split):
    huge = replace(split.train, ratings=split.train.ratings * 1e30)
    with pytest.raises(TrainingError, match=r"became inf at epoch 1, step 1"):
        Trainer(epochs=2, batch_size=256, **FAST).fit(mf(huge), huge)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": -1}, "trainer.epochs must be an integer >= 0, got -1"),
    ({"batch_size": 0}, "trainer.batch_size must be an integer >= 1"),
    ({"batch_size": 2.5}, "trainer.batch_size must be an integer >= 1, got 2.5"),
    ({"lr": 0.0}, "trainer.lr must be a finite number > 0"),
    ({"lr": float("inf")}, "trainer.lr must be a finite number > 0"),
    ({"num_threads": -1}, "trainer.num_threads must be an integer >= 1, got -1"),
    ({"eval_batch_size": 0}, "trainer.eval_batch_size must be an integer >= 1, got 0"),
    ({"lr_step_size": 0}, "trainer.lr_step_size must be an integer >= 1, got 0"),
    ({"min_delta": float("nan")}, "trainer.min_delta must be a finite number, got nan"),
    ({"seed": -1}, r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
    ({"seed": 1e20}, r"seed must be an integer in \[0, 9223372036854775807\]"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"device": "abacus"}, "trainer.device: unknown device 'abacus'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(**{**FAST, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "rmsprop"}, "trainer.optimizer must be one of"),
    ({"lr_schedule": "linear"}, "trainer.lr_schedule must be one of"),
])
def test_bad_settings_found_at_fit(split, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(epochs=1, **FAST, **kwargs).fit(mf(split.train), split.train)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Trainer(device="cuda", progress=False)


# --- other paths ----------------------------------------------------------------------------------------


def test_untrainable_model_is_only_evaluated(split):
    model = PopularityModel(split.train.n_users, split.train.n_items)
    result = Trainer(epochs=5, **FAST).fit(model, split.train, split.val)
    assert len(result.history) == 1 and "train/loss" not in result.history[0]
    assert result.best_metric == result.history[0]["val/rmse"] > 0


def test_a_last_batch_of_one(split):
    train = split.train.subset(torch.arange(257))
    model = mf(train)
    result = Trainer(epochs=2, batch_size=128, patience=None, **FAST).fit(model, train)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["train/loss"])) for h in result.history)


class RecordingLogger:
    def __init__(self):
        self.tags: dict[str, list[int]] = {}

    def scalar(self, tag, value, step):
        self.tags.setdefault(tag, []).append(step)


def test_the_logger_gets_losses_and_validation_metrics(split):
    logger = RecordingLogger()
    Trainer(epochs=2, batch_size=256, patience=None, logger=logger, **FAST).fit(mf(split.train), split.train, split.val)
    steps_per_epoch = -(-len(split.train) // 256)
    assert logger.tags["train/loss"] == [1, 2] and logger.tags["val/rmse"] == [1, 2]
    assert logger.tags["val/mae"] == [1, 2] and logger.tags["lr"] == [1, 2]
    assert logger.tags["train/loss_step"] == list(range(1, 2 * steps_per_epoch + 1))


def test_user_block_shuffle_is_a_permutation_with_users_together():
    import torch as _t

    from recsys_torch.data import Interactions

    users = _t.tensor([3, 0, 3, 1, 0, 3, 1, 4])
    inter = Interactions(users, _t.arange(8), _t.ones(8), 5, 8)
    order = EpochOrder("users", inter.users, inter.n_users)
    generator = _t.Generator().manual_seed(0)
    orders = set()
    for _ in range(6):
        perm = order(generator)
        assert sorted(perm.tolist()) == list(range(8))
        seq = users[perm].tolist()
        blocks = [u for k, u in enumerate(seq) if k == 0 or seq[k - 1] != u]
        assert len(blocks) == len(set(blocks)) == 4  # each user's rows are contiguous
        for u in set(seq):  # within a user, data order is kept
            rows = perm[users[perm] == u].tolist()
            assert rows == sorted(rows)
        orders.add(tuple(blocks))
    assert len(orders) > 1  # the user order changes between epochs
