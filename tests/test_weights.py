"""Weighted interactions: every loss counts a row of weight 2 as the row twice; time decay follows its
formula; a weight column in a csv file is read and checked; weighting changes what is learned the way
it should."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_inter
from recsys_torch import losses
from recsys_torch.data import encode
from recsys_torch.data.tabular import csv
from recsys_torch.errors import ConfigError, DataError
from recsys_torch.metrics import rmse
from recsys_torch.models import MFModel
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.trainer import Trainer


def test_a_weight_of_two_is_the_row_twice_in_every_loss():
    g = torch.Generator().manual_seed(0)
    pred, target, neg = torch.randn(3, generator=g), torch.randn(3, generator=g), torch.randn(3, 4, generator=g)
    logits, targets = torch.randn(3, 6, generator=g), torch.tensor([1, 4, 2])
    w = torch.tensor([2.0, 1.0, 1.0])
    twice = torch.tensor([0, 0, 1, 2])
    pairs = [
        (losses.mse(pred, target, w), losses.mse(pred[twice], target[twice])),
        (losses.bpr(pred, neg, w), losses.bpr(pred[twice], neg[twice])),
        (losses.sampled_softmax(pred, neg, weight=w), losses.sampled_softmax(pred[twice], neg[twice])),
        (losses.full_softmax(logits, targets, w), losses.full_softmax(logits[twice], targets[twice])),
        (losses.user_softmax(logits, torch.arange(3), targets, w),
         losses.user_softmax(logits, twice.clone(), targets[twice])),
    ]
    for weighted, duplicated in pairs:
        assert torch.allclose(weighted, duplicated, atol=1e-6)


def test_the_rating_task_weighs_loss_and_penalty_alike():
    inter = make_inter([0, 1, 2], [0, 1, 2], [5.0, 3.0, 1.0], n_users=3, n_items=3)
    torch.manual_seed(0)
    model = MFModel(3, 3, embedding_dim=2, reg=0.5, reg_bias=0.5)
    model.prepare(inter)
    task = RatingTask()
    weighted = task.loss(model, inter.users, inter.items, inter.ratings, torch.tensor([2.0, 1.0, 1.0]))
    twice = torch.tensor([0, 0, 1, 2])
    assert torch.allclose(weighted, task.loss(model, inter.users[twice], inter.items[twice], inter.ratings[twice]))


def test_time_decay_follows_its_formula():
    day = 86400
    inter = make_inter([0, 0, 1], [0, 1, 2], [4.0, 4.0, 4.0], timestamps=[0, 10 * day, 30 * day], n_users=2, n_items=3)
    decayed = RatingTask(time_decay=10).prepare_data(inter)
    assert torch.allclose(decayed.weights, torch.tensor([0.5 ** 3, 0.5 ** 2, 1.0]))
    ranked = RankingTask(threshold=None, time_decay=20).prepare_data(inter.__class__(
        **{**inter.__dict__, "weights": torch.tensor([2.0, 1.0, 1.0])}))
    assert torch.allclose(ranked.weights, torch.tensor([2 * 0.5 ** 1.5, 0.5 ** 1.0, 1.0]))
    with pytest.raises(ConfigError, match="time_decay .* no timestamps"):
        RatingTask(time_decay=5).prepare_data(make_inter([0], [0], [1.0], n_users=1, n_items=1))
    with pytest.raises(ConfigError, match="task.time_decay must be a finite number > 0"):
        RatingTask(time_decay=0)


def test_a_weight_column_is_read_and_checked(tmp_path):
    path = tmp_path / "r.csv"
    pd.DataFrame({"u": [1, 1, 2], "i": [1, 2, 1], "r": [5, 3, 4], "plays": [3, 1, 0.5]}).to_csv(path, index=False)
    data = encode(csv(str(path), columns={"user": "u", "item": "i", "rating": "r", "weight": "plays"}))
    assert data.interactions.weights.tolist() == [3.0, 1.0, 0.5]
    pd.DataFrame({"u": [1, 2], "i": [1, 1], "r": [5, 3], "plays": [1, -2]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"1 weight\(s\) are not finite numbers >= 0 \(first at row 1: -2"):
        encode(csv(str(path), columns={"user": "u", "item": "i", "rating": "r", "weight": "plays"}))


def _planted(noise_weight: float, tmp_path) -> float:
    """RMSE on clean test ratings of MF trained where a third of the training ratings are noise,
    given ``noise_weight`` (the clean ones weigh 1), read from a csv file's weight column."""
    rng = np.random.default_rng(0)
    n_users, n_items = 80, 60
    p, q = rng.normal(0, 1, (n_users, 3)), rng.normal(0, 1, (n_items, 3))
    pairs = [(u, i) for u in range(n_users) for i in rng.choice(n_items, 30, replace=False)]
    truth = np.array([3 + p[u] @ q[i] * 0.6 for u, i in pairs]).clip(1, 5)
    noisy = rng.random(len(pairs)) < 1 / 3
    ratings = np.where(noisy, rng.uniform(1, 5, len(pairs)), truth)
    weights = np.where(noisy, noise_weight, 1.0)
    path = tmp_path / f"ratings-{noise_weight}.csv"
    pd.DataFrame({"user": [u for u, _ in pairs], "item": [i for _, i in pairs], "rating": ratings,
                  "weight": weights}).to_csv(path, index=False)
    data = encode(csv(str(path), columns={"weight": "weight"})).interactions
    test = torch.from_numpy(~noisy & (rng.random(len(pairs)) < 0.25))
    train = data.subset(~test)
    torch.manual_seed(0)
    model = MFModel(data.n_users, data.n_items, embedding_dim=3, reg=0.02, reg_bias=0.02)
    Trainer(epochs=60, batch_size=256, lr=0.02, patience=None, progress=False, device="cpu", fused=False).fit(
        model, train, None)
    model.eval()
    with torch.no_grad():
        pred = model(data.users[test], data.items[test])
    return rmse(pred, torch.from_numpy(truth).float()[test])


def test_weighting_down_noisy_rows_learns_the_clean_signal_better(tmp_path):
    equal, down = _planted(1.0, tmp_path), _planted(0.05, tmp_path)
    assert down < equal - 0.05, (down, equal)
    assert math.isfinite(down)
