"""Rating metrics on tiny examples worked out by hand: RMSE, MAE, clipping, cold and warm rows."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_inter
from recsys_torch.metrics import mae, predict, rating_metrics, rmse, unknown_counts, unknown_masks
from recsys_torch.models import PopularityModel


def fixed_model(item_scores, n_users=3, mu=0.0):
    """A model whose prediction for item i is ``mu + item_scores[i]`` for every user."""
    model = PopularityModel(n_users, len(item_scores))
    with torch.no_grad():
        model.global_bias.fill_(mu)
        model.item_score.copy_(torch.tensor(item_scores))
    return model


def test_rmse_and_mae_by_hand():
    pred, target = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 5.0, 3.0])
    # errors 0, -1, -2, 1: squares 0 + 1 + 4 + 1 = 6
    assert rmse(pred, target) == pytest.approx(math.sqrt(6 / 4))
    assert mae(pred, target) == pytest.approx(4 / 4)


def test_empty_metrics_are_nan():
    assert math.isnan(rmse(torch.zeros(0), torch.zeros(0))) and math.isnan(mae(torch.zeros(0), torch.zeros(0)))


def test_predictions_are_clipped_to_the_rating_scale():
    model = fixed_model([6.5, -1.0, 3.25])
    users, items = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    assert predict(model, users, items).tolist() == [6.5, -1.0, 3.25]
    assert predict(model, users, items, rating_scale=(1.0, 5.0)).tolist() == [5.0, 1.0, 3.25]


def test_rating_metrics_use_the_clipped_predictions():
    model = fixed_model([6.5, -1.0, 3.25])
    data = make_inter([0, 1, 2], [0, 1, 2], [4.0, 2.0, 3.0], rating_scale=(1.0, 5.0))
    # clipped 5, 1, 3.25 against 4, 2, 3: errors 1, -1, 0.25
    out = rating_metrics(model, data)
    assert out == {"rmse": pytest.approx(math.sqrt((1 + 1 + 0.0625) / 3)), "mae": pytest.approx(2.25 / 3)}


def test_no_scale_means_no_clipping():
    model = fixed_model([6.5])
    data = make_inter([0], [0], [5.0], rating_scale=None)
    assert rating_metrics(model, data)["rmse"] == pytest.approx(1.5)


def test_prediction_does_not_depend_on_the_batch_size(tiny_inter):
    model = PopularityModel(tiny_inter.n_users, tiny_inter.n_items)
    model.prepare(tiny_inter.subset(torch.arange(600)))
    whole = predict(model, tiny_inter.users, tiny_inter.items, batch_size=65536)
    assert torch.equal(whole, predict(model, tiny_inter.users, tiny_inter.items, batch_size=7))


# training knows users 0, 1 and items 0, 1; user 2 and item 2 are unknown to it
TRAIN = make_inter([0, 1, 0], [0, 1, 1], [3.0, 3.0, 3.0], n_users=3, n_items=3)


def test_cold_and_warm_rows_are_scored_apart():
    model = fixed_model([1.0, 2.0, 0.0], mu=3.0)  # predicts 4, 5, 3 for items 0, 1, 2
    # rows: warm (u0, i0), warm (u1, i1), cold user (u2, i0), cold item (u0, i2), both (u2, i2)
    data = make_inter([0, 1, 2, 0, 2], [0, 1, 0, 2, 2], [5.0, 5.0, 2.0, 3.0, 1.0], n_users=3, n_items=3)
    out = rating_metrics(model, data, TRAIN)
    # warm errors -1, 0; cold errors 2, 0, 2
    assert out["warm/rmse"] == pytest.approx(math.sqrt(1 / 2)) and out["warm/mae"] == pytest.approx(0.5)
    assert out["cold/rmse"] == pytest.approx(math.sqrt(8 / 3)) and out["cold/mae"] == pytest.approx(4 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(9 / 5)) and out["mae"] == pytest.approx(5 / 5)
    assert set(out) == {"rmse", "mae", "cold/rmse", "cold/mae", "warm/rmse", "warm/mae", "cold/n_ratings",
                        "warm/n_ratings"}


def test_no_cold_keys_without_cold_rows():
    model = fixed_model([1.0, 2.0, 0.0], mu=3.0)
    data = make_inter([0, 1], [0, 1], [4.0, 4.0], n_users=3, n_items=3)
    assert set(rating_metrics(model, data, TRAIN)) == {"rmse", "mae"}
    assert set(rating_metrics(model, data)) == {"rmse", "mae"}


def test_unknown_counts_are_distinct_ids():
    data = make_inter([2, 2, 0, 1], [0, 2, 2, 1], [1.0] * 4, n_users=3, n_items=3)
    unk_u, unk_i = unknown_masks(TRAIN, data)
    assert unk_u.tolist() == [True, True, False, False]
    assert unk_i.tolist() == [False, True, True, False]
    assert unknown_counts(TRAIN, data) == {"unknown_users": 1, "unknown_items": 1}


def test_predict_takes_times_for_a_model_without_the_time_interface():
    """A duck-typed model (any module with ``global_bias`` and ``forward(users, items)``) is scored
    without the times, which only a model that ``uses_time`` takes."""
    from recsys_torch.metrics import predict

    class Sum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("global_bias", torch.tensor(1.0))

        def forward(self, users, items):
            return self.global_bias + users.float() + 0.5 * items.float()

    users, items = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    got = predict(Sum(), users, items, times=torch.tensor([10, 20, 30]))
    assert torch.equal(got, torch.tensor([2.0, 2.0, 3.5]))
