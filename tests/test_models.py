"""Models (popularity, baseline, mf): shapes, gradients, seeds, unknown-id fallback, damped means."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_inter
from recsys_torch.metrics import predict
from recsys_torch.models import BaselineModel, MFModel, PopularityModel
from recsys_torch.tasks import RatingTask
from recsys_torch.trainer import Trainer

MODELS = {
    "popularity": lambda n_u, n_i: PopularityModel(n_u, n_i, damping=2.0),
    "baseline": lambda n_u, n_i: BaselineModel(n_u, n_i, reg_bias=0.02),
    "mf": lambda n_u, n_i: MFModel(n_u, n_i, embedding_dim=8, reg=0.05, reg_bias=0.01),
}
TRAINABLE = ["baseline", "mf"]


def prepared(name, inter, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name](inter.n_users, inter.n_items)
    model.prepare(inter)
    return model


@pytest.mark.parametrize("biases", [False, True])
def test_full_ranking_scores_are_the_same_sums_whether_or_not_the_biases_are_zero(tiny_inter, biases):
    """A Gramian-loss run holds the biases at zero: full ranking then skips the users x items matrix of
    them, and must give the very same floats (evaluation breaks ties below float32 resolution)."""
    torch.manual_seed(0)
    model = MFModel(tiny_inter.n_users, tiny_inter.n_items, embedding_dim=4)
    model.prepare(tiny_inter)
    with torch.no_grad():
        model.global_bias.fill_(1.0)
        if biases:
            model.user_bias.weight.normal_()
            model.item_bias.weight.normal_()
    users = torch.arange(tiny_inter.n_users)
    u, items = model.user_side(users), model.item_table()
    spelled_out = (model.global_bias + u.bias).unsqueeze(1) + items.bias.unsqueeze(0) + u.vector @ items.vector.T
    assert torch.equal(model.score_all(users), spelled_out)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [7, 1])
def test_output_shapes(tiny_inter, name, batch):
    model = prepared(name, tiny_inter)
    users, items = tiny_inter.users[:batch], tiny_inter.items[:batch]
    scores, penalty = model.score_with_penalty(users, items)
    assert model(users, items).shape == (batch,)  # a batch of one stays a vector
    assert scores.shape == (batch,)
    assert torch.as_tensor(penalty).shape in ((), (batch,))
    assert model.score_all(users).shape == (batch, tiny_inter.n_items)
    assert predict(model, users, items).shape == (batch,)
    # full ranking and pair scoring agree
    torch.testing.assert_close(model.score_all(users)[torch.arange(batch), items], model(users, items).detach())


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_parameter(tiny_inter, name):
    model = prepared(name, tiny_inter)
    with torch.no_grad():  # biases start at zero; give every parameter a part in the score
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = tiny_inter.subset(torch.arange(200))
    RatingTask().loss(model, batch.users, batch.items, batch.ratings).backward()
    params = dict(model.named_parameters())
    assert params, "a trainable model has parameters"
    for pname, p in params.items():
        assert p.grad is not None, pname
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, pname


def test_popularity_has_nothing_to_train(tiny_inter):
    model = prepared("popularity", tiny_inter)
    assert not model.trainable and not any(True for _ in model.parameters())


@pytest.mark.parametrize("name", TRAINABLE)
def test_same_seed_same_model(tiny_inter, name):
    a, b, c = prepared(name, tiny_inter, 5), prepared(name, tiny_inter, 5), prepared(name, tiny_inter, 6)
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), key
    if name == "mf":  # biases start at zero; factors are random
        assert not torch.equal(a.user_factors.weight, c.user_factors.weight)


# --- unknown ids -------------------------------------------------------------------------------------

# users 0-2 and items 0-2 are rated in training; user 3 and item 3 exist in the id space only
TRAIN = make_inter([0, 0, 1, 1, 2, 2, 0, 1], [0, 1, 1, 2, 0, 2, 2, 0], [5, 4, 2, 1, 4, 3, 3, 2],
                   n_users=4, n_items=4)


def trained(name):
    torch.manual_seed(0)
    model = MODELS[name](TRAIN.n_users, TRAIN.n_items)
    Trainer(epochs=20, batch_size=4, lr=0.05, patience=None, device="cpu", progress=False).fit(model, TRAIN)
    return model


@pytest.mark.parametrize("name", TRAINABLE)
def test_unknown_ids_fall_back_to_the_known_biases(name):
    model = trained(name)
    assert model.known_users.tolist() == [True, True, True, False]
    assert model.known_items.tolist() == [True, True, True, False]
    with torch.no_grad():  # whatever an untrained row holds, it must not reach a score
        model.user_bias.weight[3] = 3.0
        model.item_bias.weight[3] = -2.0
        if name == "mf":
            model.user_factors.weight[3] = 1.0
            model.item_factors.weight[3] = 1.0
            assert model.user_factors.weight[1].abs().sum() > 0 and model.item_factors.weight[1].abs().sum() > 0
    mu = TRAIN.ratings.double().mean().item()
    b_u = model.user_bias.weight[1, 0].item()
    b_i = model.item_bias.weight[1, 0].item()
    assert model.global_bias.item() == pytest.approx(mu)
    assert b_u != 0 and b_i != 0
    users, items = torch.tensor([1, 3, 3]), torch.tensor([3, 1, 3])
    expected = torch.tensor([mu + b_u, mu + b_i, mu], dtype=torch.float64)
    torch.testing.assert_close(predict(model, users, items).double(), expected, atol=1e-5, rtol=0)
    # full ranking uses the same fallback
    ranked = model.score_all(torch.tensor([1]))[0].double()
    assert ranked[3].item() == pytest.approx(mu + b_u, abs=1e-5)


def test_known_ids_use_their_vectors():
    model = trained("mf")
    u, i = 1, 2
    p, q = model.user_factors.weight[u], model.item_factors.weight[i]
    expected = model.global_bias + model.user_bias.weight[u, 0] + model.item_bias.weight[i, 0] + p @ q
    torch.testing.assert_close(model(torch.tensor([u]), torch.tensor([i]))[0], expected)


# --- popularity --------------------------------------------------------------------------------------


def test_popularity_predicts_the_damped_item_mean():
    train = make_inter([0, 1, 2, 0], [0, 0, 1, 2], [5.0, 5.0, 1.0, 3.0], n_users=4, n_items=4)
    model = PopularityModel(4, 4, damping=2.0)
    model.prepare(train)
    mu = 14.0 / 4
    expected = {0: (10 + 2 * mu) / (2 + 2), 1: (1 + 2 * mu) / (1 + 2), 2: (3 + 2 * mu) / (1 + 2), 3: mu}
    for user in (0, 3):  # the same for every user, known or not
        got = predict(model, torch.full((4,), user), torch.arange(4))
        torch.testing.assert_close(got.double(), torch.tensor([expected[i] for i in range(4)], dtype=torch.float64))


def test_popularity_without_damping_is_the_plain_mean():
    train = make_inter([0, 1, 2], [0, 0, 1], [5.0, 4.0, 1.0])
    model = PopularityModel(3, 2, damping=0.0)
    model.prepare(train)
    torch.testing.assert_close(predict(model, torch.tensor([0, 0]), torch.tensor([0, 1])), torch.tensor([4.5, 1.0]))


def test_popularity_ranks_implicit_feedback_by_count():
    train = make_inter([0, 1, 2, 0, 1, 0], [2, 2, 2, 0, 0, 3], [1.0] * 6, n_users=3, n_items=4)
    model = PopularityModel(3, 4)
    model.prepare(train)
    order = model.score_all(torch.tensor([1]))[0].argsort(descending=True).tolist()
    assert order == [2, 0, 3, 1]
    torch.testing.assert_close(predict(model, torch.tensor([0]), torch.tensor([2])), torch.tensor([1.0]),
                               atol=1e-2, rtol=0)


@pytest.mark.parametrize("name", ["PopularityModel", "BaselineModel", "MFModel", "ContentModel", "HybridModel"])
def test_a_misspelled_setting_is_refused_not_ignored(name):
    import recsys_torch.models as models

    cls = getattr(models, name)
    if name != "ContentModel":  # which needs item features
        cls(4, 5, item_features=None, user_features=None)  # what train.py passes every model is accepted
    with pytest.raises(TypeError, match="embeding_dim"):
        cls(4, 5, embeding_dim=8)


def test_a_model_written_before_times_still_trains_and_scores():
    """Subclasses that override the two-argument ``score_with_penalty`` (the interface before
    ``times``) keep working: without times, the model is called as before."""
    from recsys_torch.metrics import rating_metrics
    from recsys_torch.models.mf import MFModel
    from recsys_torch.trainer import Trainer

    class Shifted(MFModel):
        def score_with_penalty(self, users, items):
            scores, penalty = super().score_with_penalty(users, items)
            return scores + 0.0, penalty

    inter = make_inter([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 0, 2], [5, 3, 4, 2, 1, 5], timestamps=[1, 2, 3, 4, 5, 6])
    model = Shifted(inter.n_users, inter.n_items, embedding_dim=2)
    Trainer(epochs=2, batch_size=4, progress=False, fused=False).fit(model, inter)
    assert math.isfinite(rating_metrics(model, inter)["rmse"])
