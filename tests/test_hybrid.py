"""Content-based and hybrid models: cold-entity masking, fusion, the SVD++ term, feature-less entities."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_torch.data import encode
from recsys_torch.data.features import Features
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError
from recsys_torch.metrics import rating_metrics
from recsys_torch.models import ContentModel, HybridModel
from recsys_torch.splits import random_split
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.trainer import Trainer

from conftest import make_inter

N_USERS, N_ITEMS = 6, 8

# every model variant the tests below run through
VARIANTS = {
    "content": (ContentModel, {}),
    "content_id_user": (ContentModel, {"user_tower": "id"}),
    "content_feature_user_mlp": (ContentModel, {"user_tower": "features", "hidden": [5]}),
    "hybrid_sum": (HybridModel, {"fusion": "sum"}),
    "hybrid_gated": (HybridModel, {"fusion": "gated"}),
    "hybrid_concat": (HybridModel, {"fusion": "concat"}),
    "hybrid_implicit_mlp": (HybridModel, {"fusion": "gated", "implicit": True, "hidden": [6]}),
}


def bag_features(n: int, n_vocab: int, width: int, n_dense: int, seed: int, absent=()) -> Features:
    """Random feature bags; entities in ``absent`` have no feature row (empty bag, zero dense)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(1, n_vocab, (n, width), generator=g)
    index[:, -1] = 0  # some padding in every row
    weight = (index > 0).float() * 0.5
    dense = torch.randn(n, n_dense, generator=g)
    present = torch.ones(n, dtype=torch.bool)
    for e in absent:
        index[e], weight[e], dense[e], present[e] = 0, 0.0, 0.0, False
    vocab = ["<pad>"] + [f"f={v}" for v in range(1, n_vocab)]
    return Features(index, weight, dense, vocab, [f"x{j}" for j in range(n_dense)], present)


def item_feats(absent=()) -> Features:
    return bag_features(N_ITEMS, 7, 3, 2, seed=1, absent=absent)


def user_feats(absent=()) -> Features:
    return bag_features(N_USERS, 5, 2, 1, seed=2, absent=absent)


def full_train() -> Interactions:
    """Every (user, item) pair but those of user 5 and item 7, with ratings from a seeded draw."""
    pairs = [(u, i) for u in range(N_USERS - 1) for i in range(N_ITEMS - 1) if (u + i) % 3]
    g = torch.Generator().manual_seed(0)
    ratings = torch.randint(1, 6, (len(pairs),), generator=g).float()
    users, items = zip(*pairs)
    return make_inter(users, items, ratings, n_users=N_USERS, n_items=N_ITEMS)


def build(name: str, item_features=None, user_features=None, **extra):
    cls, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    item_features = item_feats() if item_features is None else item_features
    user_features = user_feats() if user_features is None else user_features
    return cls(N_USERS, N_ITEMS, item_features=item_features, user_features=user_features,
               embedding_dim=4, **{**kwargs, **extra})


def all_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    u, i = torch.meshgrid(torch.arange(N_USERS), torch.arange(N_ITEMS), indexing="ij")
    return u.reshape(-1), i.reshape(-1)


def perturb_id_rows(model, user: int, item: int) -> None:
    """Overwrite every id-indexed row (vectors and biases) of ``user`` and ``item``."""
    with torch.no_grad():
        for name, row in (("user_factors", user), ("user_bias", user), ("item_factors", item), ("item_bias", item)):
            table = getattr(model, name, None)
            if table is not None:
                table.weight[row] += 3.0
        if getattr(model, "implicit", None) is not None:
            model.implicit.y.weight[item] += 3.0


# ---- cold entities are scored from features only ---------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_unknown_ids_are_never_scored_with_id_rows(name):
    model = build(name).eval()
    model.prepare(full_train())  # user 5 and item 7 unknown
    users, items = all_pairs()
    before, table_before = model(users, items), model.score_all(torch.arange(N_USERS))
    perturb_id_rows(model, user=5, item=7)
    assert torch.allclose(model(users, items), before, atol=1e-6)
    assert torch.allclose(model.score_all(torch.arange(N_USERS)), table_before, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_id_rows_of_known_entities_do_change_scores(name):
    """The control for the test above: the same perturbation moves the scores of known ids, so that
    test would fail if the masking were gone."""
    model = build(name).eval()
    model.prepare(full_train())
    users, items = all_pairs()
    before = model(users, items)
    perturb_id_rows(model, user=0, item=0)
    changed = (model(users, items) - before).abs() > 1e-4
    assert changed[items == 0].any() and changed[users == 0].any()


@pytest.mark.parametrize("fusion", ["sum", "gated"])
def test_unknown_entity_gets_exactly_its_feature_part(fusion):
    model = HybridModel(N_USERS, N_ITEMS, item_feats(), user_feats(), embedding_dim=4, fusion=fusion).eval()
    model.prepare(full_train())
    ids = torch.tensor([7])
    vec, bias, _ = model.item_tower(ids)
    side = model.item_side(ids)
    assert torch.allclose(side.vector, vec) and torch.allclose(side.bias, bias)
    if fusion == "gated":
        known_vec = model.item_side(torch.tensor([0])).vector
        assert not torch.allclose(known_vec, model.item_tower(torch.tensor([0]))[0])


@pytest.mark.parametrize("dropout", [{"id_dropout": 1.0}, {"user_id_dropout": 1.0}, {"item_id_dropout": 1.0}])
def test_id_dropout_scores_training_examples_from_features(dropout):
    model = HybridModel(N_USERS, N_ITEMS, item_feats(), user_feats(), embedding_dim=4, fusion="gated",
                        implicit=True, **dropout)
    model.prepare(full_train())
    users, items = torch.arange(N_USERS - 1), torch.arange(N_ITEMS - 1)
    for train_mode in (True, False):  # no dropout at prediction time
        model.train(train_mode)
        user_dropped = torch.allclose(model.user_side(users).vector, model.user_tower(users)[0])
        item_dropped = torch.allclose(model.item_side(items).vector, model.item_tower(items)[0])
        assert user_dropped == (train_mode and "item_id_dropout" not in dropout)
        assert item_dropped == (train_mode and "user_id_dropout" not in dropout)


# ---- gated fusion ignores a pure-noise feature -----------------------------------------------------
def _low_rank_with_noise_features(seed: int = 0, n_users=150, n_items=80, n_ratings=5000, n_cols=10, levels=3):
    rng = np.random.default_rng(seed)
    p, q = rng.normal(0, 0.7, (n_users, 4)), rng.normal(0, 0.7, (n_items, 4))
    keys = rng.choice(n_users * n_items, n_ratings, replace=False)
    u, i = keys // n_items, keys % n_items
    r = 3.5 + (p[u] * q[i]).sum(1) + rng.normal(0, 0.3, n_ratings)
    inter = make_inter(u, i, r, n_users=n_users, n_items=n_items, rating_scale=(-10.0, 20.0))
    # n_cols categorical columns drawn independently of everything: pure noise
    index = torch.as_tensor(rng.integers(0, levels, (n_items, n_cols)) + 1 + levels * np.arange(n_cols))
    vocab = ["<pad>"] + [f"noise={v}" for v in range(levels * n_cols)]
    feats = Features(index, torch.ones(n_items, n_cols), torch.zeros(n_items, 0), vocab, [],
                     torch.ones(n_items, dtype=torch.bool))
    return inter, feats


def test_gated_fusion_learns_to_ignore_a_noise_feature_that_hurts_sum():
    # (data seeds 0, 1 and 2 all pass with these margins; one is enough here)
    inter, noise = _low_rank_with_noise_features(seed=0)
    split = random_split(inter, seed=0, val=0.1, test=0.2)[0]
    rmse, models = {}, {}
    for fusion, feats in (("none", None), ("sum", noise), ("gated", noise)):
        torch.manual_seed(0)
        model = HybridModel(inter.n_users, inter.n_items, feats, None, embedding_dim=8,
                            fusion="sum" if fusion == "none" else fusion, reg=0.02)
        trainer = Trainer(epochs=60, batch_size=512, lr=0.02, patience=5, progress=False, seed=0)
        trainer.fit(model, split.train, split.val)
        rmse[fusion], models[fusion] = rating_metrics(model, split.test)["rmse"], model
    assert rmse["sum"] > rmse["none"] + 0.01  # the premise: the noise hurts sum fusion
    assert rmse["gated"] < rmse["sum"] - 0.01
    gated = models["gated"].eval()
    with torch.no_grad():
        ids = torch.arange(inter.n_items)
        id_vec, feat_vec = gated.item_factors(ids), gated.item_tower(ids)[0]
        g = gated.item_fusion.gate_of(id_vec, feat_vec, torch.ones(len(ids)))
        id_part = (g.unsqueeze(1) * id_vec).norm(dim=1).mean()
        feat_part = ((1 - g).unsqueeze(1) * feat_vec).norm(dim=1).mean()
    assert feat_part < 0.1 * id_part


# ---- the SVD++ implicit term ------------------------------------------------------------------------
def test_implicit_term_matches_a_naive_per_user_sum():
    rated = {0: [1, 2, 3], 1: [0], 2: [4, 1, 6, 2], 3: [], 4: [5, 5 - 5], 5: []}
    users = [u for u, items in rated.items() for _ in items]
    items = [i for u in rated for i in rated[u]]
    train = make_inter(users, items, [4.0] * len(users), n_users=N_USERS, n_items=N_ITEMS)
    torch.manual_seed(0)
    model = HybridModel(N_USERS, N_ITEMS, None, None, embedding_dim=3, implicit=True, reg_implicit=0.3)
    model.prepare(train)
    batch = torch.tensor([2, 0, 3, 2, 4, 1, 5])
    vector, penalty = model.implicit(batch)
    y = model.implicit.y.weight.detach()
    for row, u in enumerate(batch.tolist()):
        js = rated[u]
        expect = sum((y[j] for j in js), torch.zeros(3)) / math.sqrt(len(js)) if js else torch.zeros(3)
        expect_pen = 0.3 * sum(float(y[j].pow(2).sum()) for j in js) / len(js) if js else 0.0
        assert torch.allclose(vector[row], expect, atol=1e-6)
        assert penalty[row].item() == pytest.approx(expect_pen, rel=1e-5, abs=1e-8)
    # the user side adds it to the id vector (users 3 and 5 rated nothing: no id vector either)
    model.eval()
    known = torch.tensor([1.0, 1, 0, 1, 1, 1, 0]).unsqueeze(1)
    assert torch.allclose(model.user_side(batch).vector, model.user_factors(batch) * known + vector, atol=1e-6)


def test_implicit_term_of_most_users_is_one_sparse_product_equal_to_the_bags():
    """Many distinct users take the all-users sparse product, a few the per-user bags: same terms,
    same penalties, same gradients."""
    g = torch.Generator().manual_seed(3)
    n_users, n_items = 40, 9
    users, items = torch.randint(0, n_users - 2, (150,), generator=g), torch.randint(0, n_items, (150,), generator=g)
    model = HybridModel(n_users, n_items, None, None, embedding_dim=3, implicit=True, reg_implicit=0.3)
    model.prepare(make_inter(users, items, [4.0] * 150, n_users=n_users, n_items=n_items))
    term = model.implicit
    few = torch.tensor([3, 17, 39])  # 3 * 8 < 40 users: the bags (39 rated nothing)
    outputs = {}
    for name, rows in (("bags", few), ("product", torch.arange(n_users))):
        term.y.weight.grad = None
        vector, penalty = term.rows(rows)
        vector, penalty = vector[-len(few):] if name == "bags" else vector[few], penalty[few] if name == "product" else penalty
        (vector.pow(3).sum() + penalty.sum()).backward()
        outputs[name] = (vector.detach(), penalty.detach(), term.y.weight.grad.clone())
    for a, b in zip(outputs["bags"], outputs["product"]):
        assert torch.allclose(a, b, atol=1e-6)
    assert outputs["bags"][0][2].abs().sum() == 0 and outputs["bags"][0][0].abs().sum() > 0


def test_pair_dots_are_the_gathered_dot_products_and_their_gradients():
    """The sparse path of the training scores: one SDDMM forward, two sparse products backward, with
    repeated pairs and rows that no pair uses."""
    from recsys_torch.sparse import Pairs

    rows, cols = torch.tensor([2, 0, 2, 5, 0, 2, 3]), torch.tensor([1, 1, 1, 0, 3, 2, 3])  # (2, 1) twice
    grads = []
    for sparse in (True, False):
        left = torch.randn(7, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        right = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
        out = (Pairs(rows, cols, 7, 4).dots(left, right) if sparse
               else (left[rows] * right[cols]).sum(1))
        (out * torch.arange(1.0, 8.0)).sum().backward()
        grads.append((out.detach(), left.grad, right.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert grads[0][1][[1, 4, 6]].abs().sum() == 0  # rows no pair names get no gradient


def _reference_loss(model, users, items, ratings):
    """The hybrid's rating loss written per example, straight from its parameters, in the order the
    model draws its id dropout (users, then items)."""
    def side(name, ids, dropout):
        known = (model.known_users if name == "user" else model.known_items)[ids].float()
        n = (model.user_count if name == "user" else model.item_count)[ids]
        k = known * n / (n + model.id_prior)
        k = k * (torch.rand(k.shape) >= dropout * model.id_prior / (n + model.id_prior)).float()
        v = getattr(model, f"{name}_factors").weight[ids]
        b = getattr(model, f"{name}_bias").weight[ids, 0]
        tower, fusion = getattr(model, f"{name}_tower"), getattr(model, f"{name}_fusion")
        f, fb, fp = tower.encode(tower.index[ids], tower.weight[ids], tower.dense[ids])
        scale = (model.user_reg_scale if name == "user" else model.item_reg_scale)[ids]
        penalty = k * scale * (model.reg * v.pow(2).sum(1) + model.reg_bias * b * b) + fp
        vector, bias = fusion(v, b, f, fb, k)
        alone = fusion(torch.zeros_like(f), torch.zeros_like(fb), f, fb, torch.zeros_like(fb))  # a new entity
        if name == "user":
            term = model.implicit
            for row, u in enumerate(ids.tolist()):
                js = term.indices[term.indptr[u]:term.indptr[u + 1]]
                if len(js):
                    y = term.y.weight[js]
                    vector = vector + torch.nn.functional.one_hot(torch.tensor(row), len(ids)).float()[:, None] * (
                        k[row] * y.sum(0) / math.sqrt(len(js)))
                    penalty = penalty + torch.nn.functional.one_hot(torch.tensor(row), len(ids)).float() * (
                        k[row] * term.reg * y.pow(2).sum(1).mean())
        return (vector, bias), penalty, alone

    def mse(u, i):
        return ((model.global_bias + u[1] + i[1] + (u[0] * i[0]).sum(1) - ratings) ** 2).mean()

    user, user_penalty, new_user = side("user", users, model.user_id_dropout)
    item, item_penalty, new_item = side("item", items, model.item_id_dropout)
    views = mse(user, new_item) + mse(new_user, item) + mse(new_user, new_item)  # new item, new user, both
    return mse(user, item) + (user_penalty + item_penalty).mean() + model.feature_alone * views


@pytest.mark.parametrize("fusion", ["sum", "gated", "concat"])
@pytest.mark.parametrize("dropout", [{}, {"user_id_dropout": 0.5, "item_id_dropout": 0.3}])
def test_batched_sides_equal_the_per_example_formula(fusion, dropout):
    """The model computes each distinct entity once and gathers; the loss (with the views of a new
    item, a new user and both, fitted with feature_alone) and every gradient equal the per-example
    formula's."""
    from recsys_torch.tasks import RatingTask

    model = build("hybrid_sum", fusion=fusion, implicit=True, id_prior=2.0, feature_alone=0.4, reg=0.2,
                  reg_bias=0.1, reg_exponent=0.5, **dropout)
    train = full_train()
    model.prepare(train)
    model.train()
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(0, len(train), (30,), generator=g)
    users, items, ratings = train.users[pick], train.items[pick], train.ratings[pick]
    grads = []
    for loss_of in (lambda: RatingTask().loss(model, users, items, ratings),
                    lambda: _reference_loss(model, users, items, ratings)):
        model.zero_grad()
        torch.manual_seed(11)
        loss = loss_of()
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.to_dense().clone() for n, p in model.named_parameters()
                                    if p.grad is not None}))
    (loss, grad), (expect, expect_grad) = grads
    assert loss == pytest.approx(expect, rel=1e-5)
    assert grad.keys() == expect_grad.keys()
    for name in grad:
        assert torch.allclose(grad[name], expect_grad[name], atol=1e-5), name


@pytest.mark.parametrize("features,views", [({}, 3), ({"use_user_features": False}, 2),
                                             ({"use_item_features": False}, 2),
                                             ({"use_item_features": False, "use_user_features": False}, 0)])
def test_feature_alone_fits_a_view_per_kind_of_new_entity_that_has_features(features, views):
    model = build("hybrid_sum", feature_alone=0.5, **features)
    train = full_train()
    model.prepare(train)
    model.train()
    _, _, others = model.training_scores(train.users, train.items)
    assert len(others) == views and all(w == 0.5 for w, _ in others)
    model.eval()
    assert model.training_scores(train.users, train.items)[2] == []


def test_feature_towers_run_once_per_step_for_both_views():
    """feature_alone scores the pairs a second time from the towers alone: from the same tower outputs."""
    from recsys_torch.tasks import RatingTask

    model = build("hybrid_sum", feature_alone=0.5)
    train = full_train()
    model.prepare(train)
    model.train()
    calls = []
    for tower in (model.user_tower, model.item_tower):
        encode = tower.encode
        tower.encode = lambda *a, _encode=encode: calls.append(1) or _encode(*a)
    RatingTask().loss(model, train.users, train.items, train.ratings).backward()
    assert len(calls) == 2


def test_implicit_index_survives_a_state_dict_round_trip():
    model = build("hybrid_implicit_mlp").eval()
    model.prepare(full_train())
    fresh = build("hybrid_implicit_mlp").eval()  # CSR still empty: a different size
    fresh.load_state_dict(model.state_dict())
    users, items = all_pairs()
    assert torch.equal(fresh(users, items), model(users, items))


# ---- feature-less entities, missing feature tables --------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_entities_without_a_feature_row(name):
    model = build(name, item_features=item_feats(absent=[0, 7]), user_features=user_feats(absent=[5]))
    train = full_train()
    Trainer(epochs=2, batch_size=8, lr=0.01, progress=False).fit(model, train)
    users, items = all_pairs()
    scores = model.eval()(users, items)
    assert torch.isfinite(scores).all()
    assert torch.isfinite(model.score_all(torch.arange(N_USERS))).all()
    if not getattr(model.item_tower, "mlp", None):
        # an unknown item with no features has nothing to go on: a zero vector and zero bias
        side = model.item_side(torch.tensor([7]))
        assert side.vector.abs().max() == 0 and side.bias.abs().max() == 0


def test_content_needs_item_features():
    with pytest.raises(ConfigError, match="item features"):
        ContentModel(N_USERS, N_ITEMS, item_features=None, user_features=user_feats())
    with pytest.raises(ConfigError, match="user features"):
        ContentModel(N_USERS, N_ITEMS, item_features=item_feats(), user_features=None, user_tower="features")


def test_hybrid_without_features_is_mf_and_ranks_known_items_only():
    model = HybridModel(N_USERS, N_ITEMS, None, None, embedding_dim=4)
    assert model.item_tower is None and model.user_tower is None
    assert not model.scores_unknown_items
    assert HybridModel(N_USERS, N_ITEMS, item_feats(), None).scores_unknown_items
    model.eval().prepare(full_train())
    # unknown item: global mean plus the known user's bias
    side_u, side_i = model.user_side(torch.tensor([0])), model.item_side(torch.tensor([7]))
    assert side_i.vector.abs().max() == 0 and side_i.bias.abs().max() == 0
    assert model(torch.tensor([0]), torch.tensor([7])).item() == pytest.approx(
        (model.global_bias + side_u.bias).item())


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="fusion"):
        HybridModel(N_USERS, N_ITEMS, item_feats(), None, fusion="product")
    with pytest.raises(ConfigError, match="item_id_dropout"):
        HybridModel(N_USERS, N_ITEMS, item_feats(), None, item_id_dropout=1.5)
    with pytest.raises(ConfigError, match="user_tower"):
        ContentModel(N_USERS, N_ITEMS, item_feats(), None, user_tower="ids")


# ---- shapes, gradients, full ranking ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_batch_of_one_and_full_ranking(name):
    model = build(name).eval()
    model.prepare(full_train())
    users, items = all_pairs()
    scores, penalty = model.score_with_penalty(users, items)
    assert scores.shape == (len(users),) and torch.as_tensor(penalty).shape == (len(users),)
    one = model(torch.tensor([3]), torch.tensor([7]))
    assert one.shape == (1,)
    table = model.score_all(torch.arange(N_USERS))
    assert table.shape == (N_USERS, N_ITEMS)
    assert torch.allclose(table.reshape(-1), scores, atol=1e-5)
    assert one.item() == pytest.approx(table[3, 7].item(), abs=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model = build(name).train()
    model.prepare(full_train())
    users, items = all_pairs()
    scores, penalty = model.score_with_penalty(users, items)
    (scores.pow(2).mean() + penalty.mean()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, pname


# ---- every hyperparameter is wired ------------------------------------------------------------------
def _fit_predict(cls, dataset, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    model = cls(dataset.n_users, dataset.n_items, dataset.item_features, dataset.user_features, **kwargs)
    inter = dataset.interactions
    Trainer(epochs=2, batch_size=128, lr=0.01, progress=False, seed=0).fit(model, inter)
    return model.eval()(inter.users, inter.items, inter.timestamps).detach()


HYBRID_CHANGES = [{"embedding_dim": 8}, {"fusion": "gated"}, {"fusion": "concat"}, {"hidden": [8]},
                  {"implicit": True}, {"use_item_features": False}, {"use_user_features": False},
                  {"id_dropout": 0.5}, {"user_id_dropout": 0.5}, {"item_id_dropout": 0.5}, {"reg": 0.5},
                  {"reg_bias": 0.5}, {"reg_features": 0.5}, {"reg_exponent": 1.0}, {"init_std": 0.3},
                  {"bias_init_damping": 5.0}, {"implicit": True, "reg_implicit": 5.0}, {"day_bias": True},
                  {"day_bias": True, "reg_day_bias": 5.0}, {"day_bias": True, "day_scale": True},
                  {"day_bias": True, "day_scale": True, "reg_day_scale": 5.0}]
CONTENT_CHANGES = [{"embedding_dim": 8}, {"hidden": [8]}, {"user_tower": "id"}, {"user_tower": "features"},
                   {"item_id_bias": False}, {"reg": 0.5}, {"reg_bias": 0.5}, {"reg_features": 0.5},
                   {"reg_exponent": 1.0}, {"init_std": 0.3}, {"bias_init_damping": 5.0}]


@pytest.mark.parametrize("cls,changes", [(HybridModel, HYBRID_CHANGES), (ContentModel, CONTENT_CHANGES)])
def test_every_hyperparameter_changes_the_model(tiny_raw, cls, changes):
    dataset = encode(tiny_raw)
    for change in changes:
        base = {"embedding_dim": 4, **({"implicit": True} if "reg_implicit" in change else {}),
                **({"day_bias": True} if "reg_day_bias" in change else {}),
                **({"day_bias": True, "day_scale": True} if "reg_day_scale" in change else {})}
        reference = _fit_predict(cls, dataset, **base)
        changed = _fit_predict(cls, dataset, **{**base, **change})
        assert not torch.allclose(reference, changed, atol=1e-5), change


# ---- through the real configs -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["model=content", "split=cold_item"],
    ["model=hybrid", "split=cold_user", "model.fusion=gated", "model.implicit=true", "model.user_id_dropout=0.2"],
    ["model=hybrid", "split=cold_item", "model.fusion=concat", "model.hidden=[8]"],
])
def test_cold_splits_end_to_end(compose, tmp_path, overrides):
    from recsys_torch.train import train

    metrics = train(compose(overrides), str(tmp_path))
    assert math.isfinite(metrics["test/cold/rmse"]) and metrics["test/cold/rmse"] == metrics["test/rmse"]
    assert metrics["n_test_unknown_items"] + metrics["n_test_unknown_users"] > 0
    assert (tmp_path / "checkpoint.pt").exists()


def test_cold_start_table_script_writes_a_markdown_table(tmp_path, capsys):
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cold_start_table", repo / "scripts" / "cold_start_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "table.md"
    tiny = ["data=synthetic", "data.n_users=60", "data.n_items=40", "data.n_ratings=1200", "trainer.epochs=1"]
    assert script.main(["--seeds", "1,2", "--out", str(out), *tiny]) == 0
    text = out.read_text()
    rmse_table, wins_table = text.split("\n\n")[:2]
    rows = [line for line in rmse_table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(script.MODELS)
    for row in rows:
        cells = [c.strip(" *") for c in row.split("|")[2:-1]]
        assert len(cells) == 3 and all(math.isfinite(float(c.split(" ± ")[0])) for c in cells)
    assert "| `hybrid` against | `popularity` " in wins_table
    # the warning that mf cannot score new items is said once, not once per run
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no item features to score them" in line]
    assert len(warnings) == len(set(warnings)) == 3  # popularity, baseline, mf


@pytest.mark.parametrize("cls,kwargs", [
    (HybridModel, {"fusion": "gated", "implicit": True, "hidden": [8]}),
    (HybridModel, {"day_bias": True, "day_scale": True}),
    (HybridModel, {"new_user_bias": True, "id_prior": 5.0}),
    (ContentModel, {"user_tower": "both", "hidden": [8]}),
])
def test_checkpoint_round_trip(tiny_raw, tmp_path, cls, kwargs):
    from recsys_torch.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    dataset = encode(tiny_raw)
    split = random_split(dataset.interactions, seed=0)[0]
    model = cls(dataset.n_users, dataset.n_items, dataset.item_features, dataset.user_features,
                embedding_dim=4, **kwargs)
    Trainer(epochs=2, batch_size=128, progress=False).fit(model, split.train, split.val)
    cfg = {"model": {"_target_": f"{cls.__module__}.{cls.__name__}", "embedding_dim": 4, **kwargs}}
    save_checkpoint(str(tmp_path / "checkpoint.pt"), model, cfg, dataset, split.train)
    loaded = model_from_checkpoint(load_checkpoint(str(tmp_path / "checkpoint.pt")))
    test = split.test
    assert torch.equal(loaded(test.users, test.items, test.timestamps),
                       model.eval()(test.users, test.items, test.timestamps))


# ---- the day-specific user bias (timeSVD++) ---------------------------------------------------------
DAY = 86400


def timed_train() -> Interactions:
    """:func:`full_train` with times: each user rates its even items on one day, its odd ones the next."""
    inter = full_train()
    times = (inter.users * 3 + inter.items % 2) * DAY + 100
    return make_inter(inter.users, inter.items, inter.ratings, times, n_users=N_USERS, n_items=N_ITEMS)


def _sessions(inter: Interactions) -> torch.Tensor:
    """Each row's (user, day) as its rank among the distinct pairs of the data."""
    keys = inter.users * 1000 + torch.div(inter.timestamps, DAY, rounding_mode="floor")
    return torch.unique(keys, return_inverse=True)[1]


def test_day_bias_adds_a_bias_per_user_day_seen_in_training_and_nothing_elsewhere():
    train = timed_train()
    model = build("hybrid_gated", day_bias=True, implicit=True)
    model.prepare(train)
    sessions = _sessions(train)
    assert model.uses_time and len(model.day_keys) == int(sessions.max()) + 1
    with torch.no_grad():
        model.user_day_bias.weight.copy_(torch.arange(1.0, len(model.day_keys) + 1).unsqueeze(1))
    model.eval()
    u, i, t = train.users, train.items, train.timestamps
    static = model(u, i)
    assert torch.allclose(model(u, i, t) - static, sessions.float() + 1)
    assert torch.equal(model(u, i, t + 3600), model(u, i, t))  # the same day, an hour later
    assert torch.equal(model(u, i, t + 50 * DAY), static)  # a day training never saw
    new_user = torch.full_like(u, N_USERS - 1)  # never in training
    assert torch.equal(model(new_user, i, t), model(new_user, i))


def _day_model(day_bias: float, **settings) -> tuple[HybridModel, Interactions]:
    """A hybrid with day terms prepared on :func:`timed_train`, every day bias set to ``day_bias``."""
    train = timed_train()
    model = build("hybrid_sum", day_bias=True, **settings)
    model.prepare(train)
    with torch.no_grad():
        model.user_day_bias.weight.fill_(day_bias)
    return model, train


def _day_part(model, train: Interactions) -> tuple[torch.Tensor, torch.Tensor]:
    """What the times add to the training pairs' scores and penalties, in evaluation."""
    model.eval()
    u, i, t = train.users, train.items, train.timestamps
    (scores, penalty), (static, static_penalty) = model.score_with_penalty(u, i, t), model.score_with_penalty(u, i)
    return scores - static, penalty - static_penalty


def test_a_day_weighs_its_count_over_count_plus_the_id_prior():
    model, train = _day_model(1.0, id_prior=3.0, reg_day_bias=0.5)
    n = torch.bincount(_sessions(train)).float()[_sessions(train)]  # each row's day's training ratings
    score, penalty = _day_part(model, train)
    assert torch.allclose(score, n / (n + 3.0)) and torch.allclose(penalty, 0.5 * n / (n + 3.0))


def test_day_scale_multiplies_the_item_bias_per_user_day():
    model, train = _day_model(0.5, day_scale=True, reg_day_bias=0.5, reg_day_scale=0.25)
    n = len(model.day_keys)
    with torch.no_grad():
        model.user_day_scale.weight.copy_(torch.linspace(-1.0, 1.0, n).unsqueeze(1))
        model.item_bias.weight.copy_(torch.randn(N_ITEMS, 1, generator=torch.Generator().manual_seed(1)))
    scale = torch.linspace(-1.0, 1.0, n)[_sessions(train)]
    score, penalty = _day_part(model, train)
    u, i, t = train.users, train.items, train.timestamps
    assert torch.allclose(score, 0.5 + scale * model.item_side(i).bias, atol=1e-6)
    assert torch.allclose(penalty, 0.5 * 0.25 + 0.25 * scale ** 2, atol=1e-6)
    scores = model(u, i, t)
    model.train()  # training scores it alike (the sparse pair path)
    assert torch.allclose(model.training_scores(u, i, t)[0], scores, atol=1e-5)


def test_day_bias_is_in_the_views_that_keep_the_user_and_leaves_with_a_dropped_user():
    model, train = _day_model(1.0, feature_alone=0.5, reg_day_bias=0.25)
    model.train()
    u, i, t = train.users, train.items, train.timestamps
    s0, p0, v0 = model.training_scores(u, i)
    s1, p1, v1 = model.training_scores(u, i, t)
    assert torch.allclose(s1 - s0, torch.ones(len(u))) and torch.allclose(p1 - p0, torch.full((len(u),), 0.25))
    # views: both new, item new (the user's whole vector), user new
    assert [bool(torch.allclose(b - a, torch.ones(len(u)))) for (_, a), (_, b) in zip(v0, v1)] == [False, True, False]
    assert [bool(torch.equal(b, a)) for (_, a), (_, b) in zip(v0, v1)] == [True, False, True]
    model.user_id_dropout = 1.0  # every user dropped: scored as new, so no day bias
    torch.manual_seed(3)
    dropped = model.training_scores(u, i, t)
    torch.manual_seed(3)
    assert torch.equal(dropped[0], model.training_scores(u, i)[0])


def _moody_ratings(seed: int = 0) -> Interactions:
    """Every user rates every item over two days, a day's mood (+-1) shifting all of its ratings."""
    g = torch.Generator().manual_seed(seed)
    n_users, n_items = 40, 30
    u, i = (x.reshape(-1) for x in torch.meshgrid(torch.arange(n_users), torch.arange(n_items), indexing="ij"))
    day = torch.randint(0, 2, (len(u),), generator=g)
    mood = torch.randint(0, 2, (n_users, 2), generator=g).float() * 2 - 1
    quality = torch.randn(n_items, generator=g) * 0.5
    ratings = (3 + mood[u, day] + quality[i] + 0.3 * torch.randn(len(u), generator=g)).clamp(1, 5)
    return make_inter(u, i, ratings, (u * 10 + day) * DAY + 5000, n_users=n_users, n_items=n_items)


def test_day_bias_is_trained_and_evaluated_with_each_rating_time():
    inter = _moody_ratings()
    split = random_split(inter, seed=0)[0]
    rmse = {}
    for day_bias in (False, True):
        torch.manual_seed(0)
        model = HybridModel(inter.n_users, inter.n_items, embedding_dim=4, day_bias=day_bias, reg_day_bias=0.01)
        # refit: the first fit's table is resized back to empty, then to train + val's days
        Trainer(epochs=30, batch_size=256, lr=0.05, progress=False, seed=0, refit=True).fit(
            model, split.train, split.val)
        rmse[day_bias] = rating_metrics(model, split.test, split.train)["rmse"]
    assert rmse[True] < 0.6 < rmse[False]


def test_day_bias_without_timestamps_is_the_model_without_it():
    inter = full_train()  # no timestamps
    predictions = []
    for day_bias in (False, True):
        torch.manual_seed(0)
        model = build("hybrid_sum", day_bias=day_bias)
        Trainer(epochs=3, batch_size=8, lr=0.02, progress=False, seed=0).fit(model, inter)
        assert not model.uses_time
        predictions.append(model.eval()(inter.users, inter.items, inter.timestamps))
    assert torch.equal(*predictions)


# ---- the new-user item bias --------------------------------------------------------------------------
def _new_user_model(**settings) -> tuple[HybridModel, Interactions]:
    """A hybrid with ``new_user_bias`` prepared on :func:`full_train` (user 5 and item 7 unknown), its
    item biases drawn away from zero."""
    model = build("hybrid_sum", new_user_bias=True, id_prior=2.0, **settings).eval()
    train = full_train()
    model.prepare(train)
    with torch.no_grad():
        model.item_bias.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    return model, train


def test_new_user_bias_is_each_items_damped_mean_residual_under_the_new_user_score():
    model, train = _new_user_model()
    model.finish(train, RatingTask())
    as_new = copy.deepcopy(model)  # every training pair scored as if its user were new
    as_new.known_users.zero_()
    as_new.new_user_offset.zero_()
    residual = train.ratings - as_new(train.users, train.items)
    n = torch.bincount(train.items, minlength=N_ITEMS).float()
    want = torch.zeros(N_ITEMS).index_add_(0, train.items, residual) / (n + 2.0)
    assert torch.allclose(model.new_user_offset, want, atol=1e-5)
    assert model.new_user_offset[7] == 0 and model.new_user_offset.abs().min() < model.new_user_offset.abs().max()
    assert model.new_user_offset.abs().sum() > 0.5


def test_only_users_training_never_saw_get_the_new_user_bias():
    model, train = _new_user_model()
    users, items = all_pairs()
    before = model(users, items)
    model.finish(train, RatingTask())
    after, new = model(users, items), users == N_USERS - 1
    assert torch.equal(after[~new], before[~new])
    assert torch.allclose(after[new], before[new] + model.new_user_offset[items[new]], atol=1e-6)
    assert torch.allclose(model.score_all(torch.arange(N_USERS)).reshape(-1), after, atol=1e-5)
    assert torch.equal(model.new_user_item_offset(), model.new_user_offset)


def test_a_ranking_task_and_a_model_without_it_get_no_new_user_bias():
    model, train = _new_user_model()
    model.finish(train, RankingTask())
    assert not model.new_user_offset.any() and model.new_user_item_offset() is None
    plain = build("hybrid_sum", id_prior=2.0)
    plain.prepare(train)
    plain.finish(train, RatingTask())
    assert "new_user_offset" not in plain.state_dict() and plain.new_user_item_offset() is None


def test_the_trainer_sets_the_new_user_bias_from_the_data_of_the_final_fit():
    model, data = _new_user_model()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train, val = data.subset(order[:-6]), data.subset(order[-6:])
    Trainer(epochs=3, batch_size=16, progress=False, refit=True, seed=0).fit(model, train, val)
    got = model.new_user_offset.clone()
    assert got.abs().sum() > 0.1
    model.finish(train.concat(val), RatingTask())  # the refit's data, not the first fit's
    assert torch.allclose(got, model.new_user_offset)
