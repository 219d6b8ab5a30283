"""Top-N ranking: metrics by hand, masking and tie-breaks, negative sampling, BPR and sampled-softmax
training, the popularity ranking and early stopping on a validation ranking metric."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_inter
from recsys_torch import losses
from recsys_torch.data import encode
from recsys_torch.errors import ConfigError
from recsys_torch.metrics import ranking_metrics, top_k
from recsys_torch.models import MFModel, PopularityModel
from recsys_torch.models.base import FactorizationModel
from recsys_torch.splits import user_split
from recsys_torch.tasks import RankingTask
from recsys_torch.trainer import Trainer


class FixedScores(FactorizationModel):
    """A model whose scores are a given ``[n_users, n_items]`` matrix."""

    def __init__(self, scores, dtype=torch.float32) -> None:
        scores = torch.as_tensor(scores, dtype=dtype)
        super().__init__(*scores.shape)
        self.register_buffer("scores", scores)

    def score_all(self, users, items=None):
        return self.scores[users]


def inter_of(pairs, n_users, n_items):
    users, items = zip(*pairs)
    return make_inter(users, items, [1.0] * len(pairs), n_users=n_users, n_items=n_items)


def ndcg(hits, n_true):
    dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
    return dcg / sum(1 / math.log2(r + 2) for r in range(min(n_true, len(hits))))


# ---- metrics by hand ----------------------------------------------------------------------------

def test_each_metric_on_a_handmade_ranking():
    # items in score order 0..5 for both users; item 5 is the user's training item, so it is masked
    scores = [[6, 5, 4, 3, 2, 7], [6, 5, 4, 3, 2, 7]]
    model = FixedScores(scores)
    train = inter_of([(0, 5), (1, 5), (1, 0), (0, 1), (1, 1)], 2, 6)  # item counts: 0:1, 1:2, 5:2
    # user 0: ranking 0,2,3 (1 and 5 masked); targets {0, 3, 4}: hits at ranks 1 and 3
    # user 1: ranking 2,3,4 (0, 1 and 5 masked); target {4}: hit at rank 3
    test = inter_of([(0, 0), (0, 3), (0, 4), (1, 4)], 2, 6)
    m = ranking_metrics(model, test, [train], train, ks=[3], candidates=torch.ones(6, dtype=torch.bool))
    u0, u1 = [1, 0, 1], [0, 0, 1]
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx((2 / 3 + 1 / 1) / 2)
    assert m["ndcg@3"] == pytest.approx((ndcg(u0, 3) + ndcg(u1, 1)) / 2)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["map@3"] == pytest.approx(((1 / 1 + 2 / 3) / 3 + (1 / 3) / 1) / 2)
    assert m["mrr@3"] == pytest.approx((1 / 1 + 1 / 3) / 2)
    # recommended: user 0 {0, 2, 3}, user 1 {2, 3, 4}: 4 distinct items of 6
    assert m["coverage@3"] == pytest.approx(4 / 6)
    counts = {0: 1, 1: 2, 2: 0, 3: 0, 4: 0, 5: 2}
    shown = [0, 2, 3, 2, 3, 4]
    assert m["avg_popularity@3"] == pytest.approx(sum(counts[i] for i in shown) / len(shown))
    assert m["n_users"] == 2


def test_several_k_and_a_test_item_outside_the_candidates_is_a_miss():
    model = FixedScores([[5, 4, 3, 2, 1]])
    train = inter_of([(0, 4)], 1, 5)
    test = inter_of([(0, 1), (0, 3)], 1, 5)
    allowed = torch.tensor([True, False, True, True, True])  # item 1 was never seen in training
    m = ranking_metrics(model, test, [train], train, ks=[1, 2], candidates=allowed)
    # ranking 0, 2, 3: the hit is item 3 at rank 3
    assert m["recall@1"] == m["recall@2"] == 0.0
    m = ranking_metrics(model, test, [train], train, ks=[3], candidates=allowed)
    assert m["recall@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_train_and_validation_items_are_masked():
    model = FixedScores([[9, 8, 7, 6, 5, 4]])
    train = inter_of([(0, 0)], 1, 6)
    val = inter_of([(0, 1)], 1, 6)
    test = inter_of([(0, 2)], 1, 6)
    everything = torch.ones(6, dtype=torch.bool)

    def mrr(exclude):
        return ranking_metrics(model, test, exclude, train, ks=[3], candidates=everything)["mrr@3"]

    assert mrr([]) == pytest.approx(1 / 3)  # ranking 0, 1, 2
    assert mrr([train]) == pytest.approx(1 / 2)  # 1, 2, 3
    assert mrr([train, val]) == pytest.approx(1.0)  # 2, 3, 4
    idx, values = top_k(model, torch.tensor([0]), 6, exclude=torch.tensor([[True, True, False, False, False, False]]))
    assert idx[0, :4].tolist() == [2, 3, 4, 5] and bool(torch.isinf(values[0, 4:]).all())


def test_ties_go_to_the_lower_item_code():
    model = FixedScores([[1, 2, 2, 2, 1, 2], [0, 0, 0, 0, 0, 0]])
    idx, _ = top_k(model, torch.tensor([0, 1]), 4)
    assert idx.tolist() == [[1, 2, 3, 5], [0, 1, 2, 3]]
    # and whatever the rows' order in the batch
    idx, _ = top_k(model, torch.tensor([1, 0]), 4)
    assert idx.tolist() == [[0, 1, 2, 3], [1, 2, 3, 5]]


def _float64_ranking(scores, k, exclude, candidates):
    """What top_k promises: every row ranked in float64, ties to the lower item code."""
    n_items = scores.shape[1]
    s = scores.double() - torch.arange(n_items, dtype=torch.float64) * (1e-9 / n_items)
    s[exclude] = -math.inf
    s[:, ~candidates] = -math.inf
    return torch.topk(s, k, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_is_the_float64_ranking_of_every_row_near_ties_included(dtype):
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 30
    scores = torch.randn(n_users, n_items, generator=g, dtype=torch.float64)
    scores[:10] = torch.randint(0, 3, (10, n_items), generator=g).double()  # exact ties at the cut
    scores[10:20] = 0.5 + torch.randn(10, n_items, generator=g, dtype=torch.float64) * 1e-11  # below the tie-break
    exclude = torch.rand(n_users, n_items, generator=g) < 0.3
    exclude[20, 3:] = True  # fewer items left than k
    candidates = torch.rand(n_items, generator=g) < 0.9
    model = FixedScores(scores, dtype)
    users = torch.randperm(n_users, generator=g)
    for k in (1, 5, 10, n_items):
        want_values, want = _float64_ranking(model.scores[users], k, exclude[users], candidates)
        real = torch.isfinite(want_values)
        for mask in (exclude[users], exclude[users].nonzero(as_tuple=True)):  # dense, or (row, item) pairs
            idx, values = top_k(model, users, k, mask, candidates)
            assert torch.equal(values, want_values.float())
            assert torch.equal(idx[real], want[real])


def test_top_k_never_writes_into_a_models_own_scores():
    class Stored(FixedScores):
        def score_all(self, users, items=None):
            return self.scores  # hands out its own buffer

    model = Stored([[3.0, 2.0, 1.0]])
    idx, _ = top_k(model, torch.tensor([0]), 2, exclude=torch.tensor([[True, False, False]]),
                   candidates=torch.tensor([True, True, False]))
    assert int(idx[0, 0]) == 1 and model.scores.tolist() == [[3.0, 2.0, 1.0]]


@pytest.fixture(scope="module")
def implicit_split(tiny_raw):
    task = RankingTask(threshold=4.0)
    inter = task.prepare_data(encode(tiny_raw).interactions)
    return task, user_split(inter, seed=0, val=0.2, test=0.2)[0]


def test_results_do_not_depend_on_the_evaluation_batch_size(implicit_split):
    task, split = implicit_split
    torch.manual_seed(0)
    model = MFModel(split.train.n_users, split.train.n_items, embedding_dim=8)
    model.prepare(split.train)
    runs = [ranking_metrics(model, split.test, [split.train, split.val], split.train, ks=[1, 5, 10], batch_size=b)
            for b in (1, 7, 1000)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["n_users"] > 10
    # the task caps its users-per-chunk so memory stays bounded, and that changes nothing either
    assert task.evaluate(model, split.test, split.train, exclude=[split.val], batch_size=65536) == \
        task.evaluate(model, split.test, split.train, exclude=[split.val], batch_size=3)


# ---- losses -------------------------------------------------------------------------------------

def test_bpr_and_sampled_softmax_by_hand():
    pos = torch.tensor([2.0, 0.5])
    neg = torch.tensor([[1.0, 3.0], [0.0, 0.5]])
    expected = -sum(math.log(1 / (1 + math.exp(-(p - n)))) for p, row in zip([2.0, 0.5], [[1, 3], [0, 0.5]])
                    for n in row) / 4
    assert float(losses.bpr(pos, neg)) == pytest.approx(expected)
    log_q_pos = torch.log(torch.tensor([0.5, 0.1]))
    log_q_neg = torch.log(torch.tensor([[0.2, 0.3], [0.5, 0.1]]))
    got = float(losses.sampled_softmax(pos, neg, log_q_pos, log_q_neg))
    want = 0.0
    for b in range(2):
        logits = torch.cat([(pos[b] - log_q_pos[b]).view(1), neg[b] - log_q_neg[b]])
        want += float(torch.logsumexp(logits, 0) - logits[0]) / 2
    assert got == pytest.approx(want)
    # uniform sampling: the correction shifts every logit equally and changes nothing
    flat = torch.full((2,), math.log(0.25))
    assert float(losses.sampled_softmax(pos, neg, flat, flat.view(2, 1).expand(2, 2))) == \
        pytest.approx(float(losses.sampled_softmax(pos, neg)))


def test_full_softmax_is_cross_entropy_over_every_item():
    torch.manual_seed(0)
    model = MFModel(3, 6, embedding_dim=4, reg=0.1, reg_bias=0.05)
    train = inter_of([(0, 1), (1, 2), (2, 5), (0, 3)], 3, 6)
    model.prepare(train)
    task = RankingTask(loss="full_softmax")
    task.setup(train, torch.device("cpu"), torch.Generator().manual_seed(0))
    users, items = torch.tensor([0, 2]), torch.tensor([3, 5])
    with torch.no_grad():
        scores = model.score_all(users)
        u, every = model.user_side(users), model.item_side(torch.arange(6))
        want = sum(float(torch.logsumexp(scores[b], 0) - scores[b, items[b]]) for b in range(2)) / 2
        want += float(u.penalty.mean() + every.penalty[items].mean())
        assert float(task.loss(model, users, items, torch.ones(2))) == pytest.approx(want, rel=1e-5)


# ---- negative sampling --------------------------------------------------------------------------

def dense_user_task(reject: bool, sampler: str = "uniform") -> tuple[RankingTask, torch.Tensor]:
    """User 0 has 15 of 20 items as positives; user 1 has 2."""
    pairs = [(0, i) for i in range(15)] + [(1, 3), (1, 7)]
    train = inter_of(pairs, 2, 20)
    task = RankingTask(n_negatives=50, sampler=sampler, reject_positives=reject)
    task.setup(train, torch.device("cpu"), torch.Generator().manual_seed(0))
    return task, torch.tensor([0] * 200 + [1] * 200)


def test_rejection_never_returns_known_positives():
    task, users = dense_user_task(reject=True)
    neg = task.sample(users)
    assert neg.shape == (400, 50)
    assert not bool((neg[:200] < 15).any())
    assert not bool(((neg[200:] == 3) | (neg[200:] == 7)).any())
    # without rejection three quarters of user 0's draws are positives: the check above can fail
    task, users = dense_user_task(reject=False)
    assert float((task.sample(users)[:200] < 15).double().mean()) == pytest.approx(0.75, abs=0.02)


def test_popularity_sampler_follows_training_counts():
    counts = torch.tensor([40, 20, 10, 0, 30])
    pairs = [(u, i) for i, c in enumerate(counts.tolist()) for u in range(c)]
    train = inter_of(pairs, 40, 5)
    task = RankingTask(n_negatives=100, sampler="popularity", reject_positives=False)
    task.setup(train, torch.device("cpu"), torch.Generator().manual_seed(0))
    neg = task.sample(torch.zeros(1000, dtype=torch.long))
    freq = torch.bincount(neg.flatten(), minlength=5).double() / neg.numel()
    assert torch.allclose(freq, counts.double() / counts.sum(), atol=0.005)
    assert freq[3] == 0  # an item nobody chose is never drawn
    assert torch.allclose(task.log_q.exp(), (counts.double() / counts.sum()).clamp(min=1e-12).float())


def test_bad_task_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="task.loss"):
        RankingTask(loss="warp")
    with pytest.raises(ConfigError, match="task.sampler"):
        RankingTask(sampler="zipf")
    with pytest.raises(ConfigError, match="n_negatives"):
        RankingTask(n_negatives=0)


# ---- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, sampler", [("bpr", "uniform"), ("softmax", "uniform"), ("softmax", "popularity"),
                                           ("full_softmax", "uniform")])
def test_ranking_losses_decrease_and_beat_chance(implicit_split, loss, sampler):
    _, split = implicit_split
    task = RankingTask(loss=loss, n_negatives=4, sampler=sampler)
    torch.manual_seed(0)
    model = MFModel(split.train.n_users, split.train.n_items, embedding_dim=8, reg=0.001, reg_bias=0.001)
    before = task.evaluate(model.eval(), split.test, split.train, exclude=[split.val])
    fit = Trainer(epochs=8, lr=0.02, batch_size=128, patience=0, progress=False, device="cpu").fit(
        model, split.train, None, task)
    curve = [r["train/loss"] for r in fit.history]
    assert all(b < a for a, b in zip(curve, curve[1:])) and curve[-1] < curve[0] - 0.1
    after = task.evaluate(model, split.test, split.train, exclude=[split.val])
    assert after["ndcg@10"] > before["ndcg@10"]


def test_popularity_ranks_by_training_count():
    pairs = [(u, 2) for u in range(5)] + [(u, 0) for u in range(3)] + [(0, 3), (1, 3), (4, 1)]
    train = inter_of(pairs, 6, 5)  # counts: item 2: 5, 0: 3, 3: 2, 1: 1, 4: 0
    model = PopularityModel(6, 5)
    model.prepare(train)
    idx, _ = top_k(model, torch.tensor([5]), 4)
    assert idx.tolist() == [[2, 0, 3, 1]]
    # an explicit-rating ranking run gives the same order once the task keeps the positives
    rated = make_inter([u for u, _ in pairs], [i for _, i in pairs], [5.0] * len(pairs), n_users=6, n_items=5)
    model.prepare(RankingTask().prepare_data(rated))
    assert top_k(model, torch.tensor([5]), 4)[0].tolist() == [[2, 0, 3, 1]]


def test_early_stopping_watches_validation_ndcg(implicit_split):
    _, split = implicit_split
    task = RankingTask(loss="softmax", n_negatives=8)
    assert (task.monitor, task.mode) == ("ndcg@10", "max")
    torch.manual_seed(0)
    model = MFModel(split.train.n_users, split.train.n_items, embedding_dim=16, reg=0.0, reg_bias=0.0)
    # no regularization and a large step: validation NDCG peaks early, then falls as the model overfits
    fit = Trainer(epochs=40, lr=0.05, batch_size=64, patience=2, progress=False, device="cpu").fit(
        model, split.train, split.val, task)
    curve = [r["val/ndcg@10"] for r in fit.history]
    assert fit.stopped_early and len(curve) < 40
    assert fit.best_epoch == 1 + max(range(len(curve)), key=lambda e: (curve[e], -e))
    assert fit.best_metric == pytest.approx(max(curve))
    # the best weights are restored
    assert task.evaluate(model, split.val, split.train)["ndcg@10"] == pytest.approx(fit.best_metric)


# ---- the experiment configs -----------------------------------------------------------------------

@pytest.mark.parametrize("experiment", ["ranking_ml100k_mf", "ranking_ml100k_hybrid"])
def test_ranking_experiments_set_up_the_protocol_and_run(experiment, tmp_path):
    from conftest import compose_cfg
    from recsys_torch.train import train

    cfg = compose_cfg([f"experiment={experiment}", "trainer.epochs=2"])
    assert cfg.task._target_.endswith("RankingTask") and cfg.task.threshold == 4.0
    assert cfg.split._target_.endswith("user_split") and cfg.split.test == 0.2 and 0 < cfg.split.val < 0.1
    metrics = train(cfg, str(tmp_path))
    assert {"val/ndcg@10", "test/ndcg@10", "test/recall@10", "test/precision@10"} <= set(metrics)


def test_ranking_experiment_optimizes_validation_ndcg():
    from conftest import compose_cfg

    from hydra.utils import instantiate

    from recsys_torch.train import objective

    cfg = compose_cfg(["experiment=ranking_ml100k_mf"])
    assert objective(cfg, instantiate(cfg.task)) == "val/ndcg@10"  # the task's own metric, by default


# ---- whole-catalog losses at per-user cost ------------------------------------------------------------------
def _random_positives(n_users=7, n_items=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = sorted({(int(u), int(i)) for u, i in zip(torch.randint(0, n_users, (40,), generator=g),
                                                     torch.randint(0, n_items, (40,), generator=g))})
    return inter_of(pairs, n_users, n_items)


def _setup(task, inter):
    task.setup(inter, torch.device("cpu"), torch.Generator().manual_seed(0))
    return task


def test_user_softmax_gives_the_per_positive_full_softmax_gradient():
    """A batch of users under user_softmax has exactly the loss and gradients of full_softmax over those
    users' positives (each positive weighs one), whatever the order of the positives."""
    inter = _random_positives()
    users = torch.tensor([0, 3, 5, 6])
    grads = []
    for loss in ("user_softmax", "full_softmax"):
        torch.manual_seed(0)
        model = MFModel(7, 11, embedding_dim=4, reg=0.3, reg_bias=0.1)
        model.prepare(inter)
        task = _setup(RankingTask(threshold=None, loss=loss), inter)
        if loss == "user_softmax":
            value = task.loss(model, users)
        else:
            mine = torch.isin(inter.users, users)
            perm = torch.randperm(int(mine.sum()), generator=torch.Generator().manual_seed(1))
            value = task.loss(model, inter.users[mine][perm], inter.items[mine][perm], inter.ratings[mine][perm])
        value.backward()
        grads.append((value.detach(), [p.grad.to_dense() for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a, b, atol=1e-6)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6)
    assert len(RankingTask(threshold=None, loss="user_softmax").training_rows.__doc__) > 0


def test_the_gramian_loss_equals_the_brute_force_loss_over_every_pair():
    inter = _random_positives(seed=3)
    torch.manual_seed(0)
    model = MFModel(7, 11, embedding_dim=3, reg=0.05, reg_bias=0.0)
    model.prepare(inter)
    task = _setup(RankingTask(threshold=None, loss="gramian", confidence=2.5, gramian_weight=0.4, reg=0.05,
                              reg_frequency=1.0), inter)
    users = task.training_rows(inter)[0]
    got = task.loss(model, users)
    p = model.user_factors.weight.detach()
    q = model.item_factors.weight.detach() * inter.known_items()[:, None]  # an item training never saw: no vector
    s = p @ q.T  # every (user, item) pair, materialized
    observed = torch.zeros(7, 11, dtype=torch.bool)
    observed[inter.users, inter.items] = True
    fit = 2.5 * ((1 - s[observed]) ** 2).sum() + 0.4 * (s ** 2)[users].sum()
    n_u, n_i = inter.user_counts().double(), inter.item_counts().double()
    active_u, active_i = int((n_u > 0).sum()), int((n_i > 0).sum())
    reg_u = 0.05 * ((n_u + 0.4 * active_i) * (p.double() ** 2).sum(1))[users].sum()
    reg_i = 0.05 * ((n_i + 0.4 * active_u) * (q.double() ** 2).sum(1)).sum()
    want = (fit.double() + reg_u + reg_i) / len(inter)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    # a batch of half the users: its expected value over an epoch's batches is the same objective
    halves = users.split(len(users) // 2 + 1)
    shares = [len(h) / len(users) for h in halves]
    assert torch.allclose(sum(sh * task.loss(model, h) for sh, h in zip(shares, halves)).double(), want, rtol=1e-5)


def test_an_als_step_reports_the_gramian_loss_of_its_solved_batch():
    """ALS reads its batch's loss off the solve (no second pass over the positives): the task's own
    Gramian loss of the batch after the solve, weights, confidence and an unseen item included."""
    from recsys_torch.als import ALSStep

    inter = _random_positives(seed=3)
    weights = 0.5 + torch.rand(len(inter), generator=torch.Generator().manual_seed(1))
    inter = inter.__class__(**{**inter.__dict__, "weights": weights})
    torch.manual_seed(0)
    model = MFModel(7, 11, embedding_dim=8)  # more dimensions than CG steps: the solve is not exact
    model.prepare(inter)
    task = _setup(RankingTask(threshold=None, loss="gramian", confidence=2.5, gramian_weight=0.4, reg=0.05,
                              reg_frequency=1.0), inter)
    step = ALSStep(model, task, batch_size=3)
    users = task.training_rows(inter)[0]
    for batch in (users[:3], users[3:]):
        reported = step(batch)
        assert torch.allclose(reported.double(), task.loss(model, batch).double(), rtol=1e-5)
    step.end_epoch()
    first = float(task.loss(model, users).detach())
    # the items changed: the next batch is solved against them, not against what the last batch saw
    assert torch.allclose(step(users).double(), task.loss(model, users).double(), rtol=1e-5)
    step.end_epoch()
    assert float(task.loss(model, users).detach()) < first  # and the sweeps go downhill


def _with_negatives(inter, seed=5, n=12):
    """``inter`` with ``n`` explicit negatives on pairs that are not positives, one of them of a user
    without positives (user 6's positives removed)."""
    inter = inter.subset(inter.users != 6)
    g = torch.Generator().manual_seed(seed)
    taken = {(int(u), int(i)) for u, i in zip(inter.users, inter.items)}
    pairs = [(6, 0)]
    while len(pairs) < n:
        pair = (int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(0, 11, (1,), generator=g)))
        if pair not in taken and pair not in pairs:
            pairs.append(pair)
    negatives = inter_of(pairs, inter.n_users, inter.n_items)
    weights = 0.5 + torch.rand(len(pairs), generator=g)
    inter.negatives = negatives.__class__(**{**negatives.__dict__, "weights": weights})
    return inter


def test_the_gramian_loss_pushes_explicit_negatives_toward_zero():
    """With explicit negatives, the loss adds negative_weight x (row weight) x s^2 over them, brute force
    over every pair; a user or an item without positives keeps out (never solved, never ranked)."""
    inter = _with_negatives(_random_positives(seed=3))
    torch.manual_seed(0)
    model = MFModel(7, 11, embedding_dim=3)
    model.prepare(inter)
    task = _setup(RankingTask(threshold=None, loss="gramian", confidence=2.5, gramian_weight=0.4, reg=0.0,
                              negative_weight=0.7), inter)
    users = task.training_rows(inter)[0]
    neg = inter.negatives
    mine = (neg.users != 6) & inter.known_items()[neg.items]
    assert 6 not in users.tolist() and 0 < task.n_negatives_trained == int(mine.sum()) < len(neg) - 1
    p = model.user_factors.weight.detach().double()
    q = model.item_factors.weight.detach().double() * inter.known_items()[:, None]
    s = p @ q.T
    fit = 2.5 * ((1 - s[inter.users, inter.items]) ** 2).sum() + 0.4 * (s ** 2)[users].sum()
    fit = fit + 0.7 * (neg.weights.double()[mine] * s[neg.users[mine], neg.items[mine]] ** 2).sum()
    assert torch.allclose(task.loss(model, users).double(), fit / len(inter), rtol=1e-5)
    without = _setup(RankingTask(threshold=None, loss="gramian", confidence=2.5, gramian_weight=0.4, reg=0.0,
                                 negative_weight=0.0), inter)
    assert without.n_negatives_trained == 0
    assert float(without.loss(model, users).detach()) < float(task.loss(model, users).detach())


@pytest.mark.parametrize("side", ["users", "items"])
def test_als_solves_the_gramian_loss_with_explicit_negatives_exactly(side):
    """With as many CG steps as dimensions the solve is exact: the task's loss, explicit negatives and
    their weights included, has a zero gradient at the solved vectors; its reported loss is that loss."""
    from recsys_torch.als import CG_STEPS, ALSStep

    inter = _with_negatives(_random_positives(seed=3))
    torch.manual_seed(0)
    model = MFModel(7, 11, embedding_dim=CG_STEPS)
    model.prepare(inter)
    task = _setup(RankingTask(threshold=None, loss="gramian", confidence=2.5, gramian_weight=0.4, reg=0.05,
                              negative_weight=0.7), inter)
    step = ALSStep(model, task, batch_size=3)
    users = task.training_rows(inter)[0]
    if side == "users":
        reported = step(users)
        assert torch.allclose(reported.double(), task.loss(model, users).double(), rtol=1e-5)
    else:
        step.end_epoch()
    model.zero_grad()
    task.loss(model, users).backward()
    grad = (model.user_factors.weight.grad.to_dense()[users] if side == "users"
            else model.item_factors.weight.grad.to_dense()[inter.known_items()])
    assert grad.abs().max() < 1e-5


def test_explicit_negatives_lower_the_scores_of_disliked_items():
    """Trained by ALS on the same positives, a model that also sees which items each user rated low
    scores those items lower for them (relative to the rest) than a model that does not."""
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 30
    pairs = sorted({(int(u), int(i)) for u, i in zip(torch.randint(0, n_users, (400,), generator=g),
                                                     torch.randint(0, n_items, (400,), generator=g))})
    inter = inter_of(pairs, n_users, n_items)
    taken = set(pairs)
    disliked = [(u, i) for u in range(n_users) for i in range(5) if (u, i) not in taken]  # popular, disliked
    gaps = {}
    for weight in (0.0, 0.6):
        data = inter_of(pairs, n_users, n_items)
        data.negatives = inter_of(disliked, n_users, n_items)
        torch.manual_seed(0)
        model = MFModel(n_users, n_items, embedding_dim=8)
        task = RankingTask(threshold=None, loss="gramian", negative_weight=weight)
        Trainer(epochs=8, batch_size=16, optimizer="als", patience=None, progress=False, device="cpu").fit(
            model, data, None, task)
        with torch.no_grad():
            scores = model.score_all(torch.arange(n_users))
        neg = torch.tensor(disliked)
        gaps[weight] = float(scores[neg[:, 0], neg[:, 1]].mean() - scores.mean())
    assert gaps[0.6] < gaps[0.0] - 0.05


@pytest.mark.parametrize("loss", ["user_softmax", "gramian"])
def test_user_batched_losses_learn_to_rank(implicit_split, loss):
    train, test = implicit_split[1].train, implicit_split[1].test
    torch.manual_seed(0)
    model = MFModel(train.n_users, train.n_items, embedding_dim=8, reg=0.01, reg_exponent=0.0)
    task = RankingTask(threshold=None, loss=loss)
    result = Trainer(epochs=15, batch_size=16, lr=0.05, patience=None, progress=False, device="cpu").fit(
        model, train, None, task)
    losses_ = [r["train/loss"] for r in result.history]
    assert losses_[-1] < losses_[0]
    trained = ranking_metrics(model, test, [train], train, (5,))["ndcg@5"]
    torch.manual_seed(0)
    untrained = ranking_metrics(MFModel(train.n_users, train.n_items, embedding_dim=8), test, [train], train, (5,))
    assert trained > untrained["ndcg@5"]


def test_gramian_fold_in_solves_the_users_als_equation():
    """Fold-in of a new user under the Gramian loss lands where ALS would put the user: the minimum of
    confidence x sum (1 - s)^2 over the positives + gramian_weight x sum s^2 + the task's L2."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 3, generator=g, dtype=torch.float64)
    task = RankingTask(threshold=None, loss="gramian", confidence=2.0, gramian_weight=0.5, reg=0.1, reg_frequency=1.0)
    pos = torch.tensor([1, 4, 7])
    lam = task.fold_in_penalty(len(pos), 9, reg=99.0, reg_exponent=0.0)  # the model's own reg plays no part
    assert lam == pytest.approx(0.1 * (3 + 0.5 * 9), abs=1e-5)
    # the closed form: (c Q_p^T Q_p + a Q^T Q + lam I) v = c Q_p^T 1
    a = 2.0 * q[pos].T @ q[pos] + 0.5 * q.T @ q + lam * torch.eye(3, dtype=torch.float64)
    v = torch.linalg.solve(a, 2.0 * q[pos].sum(0))
    v.requires_grad_(True)
    (task.fold_in_loss(q @ v, pos) + lam * v.pow(2).sum()).backward()
    assert v.grad.abs().max() < 1e-9


def test_an_experiment_says_which_ratings_below_the_threshold_train(caplog):
    """The log counts the negatives of each part (a refit trains on train + validation), or says why
    the ratings below the threshold do not train."""
    from recsys_torch.data.synthetic import synthetic
    from recsys_torch.experiment import make_experiment

    dataset = encode(synthetic(n_users=40, n_items=30, n_ratings=600, seed=1))
    below = int((dataset.interactions.ratings < 4.0).sum())
    caplog.set_level("INFO", logger="recsys_torch")
    experiment = make_experiment(dataset, RankingTask(threshold=4.0), lambda inter, seed: user_split(inter, seed=seed),
                                 seed=0)
    split = experiment.splits[0]
    counts = [len(p.negatives) for p in (split.train, split.val, split.test)]
    assert (f"explicit negatives (ratings below 4, task.negative_weight=0.6): {below}; {counts[0]} in the training "
            f"part, {counts[1]} in validation (a refit trains on both), {counts[2]} held out") in caplog.text
    assert "(the positives: ratings >= 4)" in caplog.text
    for task, why in ((RankingTask(threshold=4.0, negative_weight=0.0), "task.negative_weight=0"),
                      (RankingTask(threshold=4.0, loss="bpr"), "task.loss=bpr trains on the positives")):
        caplog.clear()
        make_experiment(dataset, task, lambda inter, seed: user_split(inter, seed=seed), seed=0)
        assert f"the {below} ratings below 4 are not trained on ({why}" in caplog.text


def test_cold_split_warnings_say_what_a_ranking_run_does_with_unseen_ids(caplog):
    from recsys_torch.experiment import warn_about_features
    from recsys_torch.splits import Split

    inter = _random_positives()
    model, dataset = MFModel(7, 11), type("D", (), {"item_features": None, "user_features": None})()
    cases = (("cold_user", "each gets the same ranking", "global mean plus the item's bias"),
             ("cold_item", "each test positive counts as a miss", "global mean plus the user's bias"))
    for name, ranking, rating in cases:
        caplog.clear()
        warn_about_features(model, dataset, Split(inter, inter, inter, name=name), RankingTask(threshold=None))
        assert ranking in caplog.text and rating not in caplog.text
        caplog.clear()
        warn_about_features(model, dataset, Split(inter, inter, inter, name=name))
        assert rating in caplog.text


def test_an_experiment_trains_on_the_negatives_of_its_training_part_only():
    """make_experiment (every script's and rt.fit's way in) gives each split part its own explicit
    negatives; the refit's train + val joins theirs; the test part's never reach training. A loss other
    than gramian, negative_weight 0 or no threshold: no negatives at all."""
    from recsys_torch.data.synthetic import synthetic
    from recsys_torch.experiment import make_experiment

    dataset = encode(synthetic(n_users=40, n_items=30, n_ratings=600, seed=1))
    below = int((dataset.interactions.ratings < 4.0).sum())
    experiment = make_experiment(dataset, RankingTask(threshold=4.0, loss="gramian"),
                                 lambda inter, seed: [user_split(inter, seed=seed, val=0.1, test=0.2)[0]], seed=0)
    split = experiment.splits[0]
    parts = [split.train.negatives, split.val.negatives, split.test.negatives]
    assert sum(len(p) for p in parts) == below and all(len(p) for p in parts)
    assert (torch.cat([p.ratings for p in parts]) < 4.0).all()
    cells = [set(zip(p.users.tolist(), p.items.tolist())) for p in parts]
    assert not (cells[0] & cells[2]) and not (cells[0] & cells[1])
    refit = split.train.concat(split.val)
    assert len(refit.negatives) == len(parts[0]) + len(parts[1])
    assert len(experiment.interactions.negatives) == below  # a final fit trains on every rating
    assert split.train.fingerprint() != split.train.subset(torch.arange(len(split.train))).fingerprint()
    for task in (RankingTask(threshold=4.0, loss="bpr"), RankingTask(threshold=4.0, negative_weight=0.0),
                 RankingTask(threshold=None)):
        plain = make_experiment(dataset, task, lambda inter, seed: user_split(inter, seed=seed), seed=0)
        assert plain.splits[0].train.negatives is None


def test_gramian_fold_in_weighs_a_new_users_explicit_negatives_as_training_did():
    """Fold-in under the Gramian loss adds negative_weight x s^2 over the user's ratings below the
    threshold: the minimum is the ALS closed form with those items' extra weight; a task rebuilt from
    a checkpoint written before explicit negatives existed keeps them out, as its training did."""
    from recsys_torch.checkpoint import task_from_config

    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 3, generator=g, dtype=torch.float64)
    task = RankingTask(threshold=4.0, loss="gramian", confidence=2.0, gramian_weight=0.5, reg=0.1,
                       negative_weight=0.8)
    pos, neg = torch.tensor([1, 4, 7]), torch.tensor([0, 5])
    lam = task.fold_in_penalty(len(pos), 9, reg=0.0, reg_exponent=0.0)
    a = 2.0 * q[pos].T @ q[pos] + 0.8 * q[neg].T @ q[neg] + 0.5 * q.T @ q + lam * torch.eye(3, dtype=torch.float64)
    v = torch.linalg.solve(a, 2.0 * q[pos].sum(0)).requires_grad_(True)
    (task.fold_in_loss(q @ v, pos, neg) + lam * v.pow(2).sum()).backward()
    assert v.grad.abs().max() < 1e-9
    old = {k: v for k, v in task.config().items() if k != "negative_weight"}
    assert task_from_config(old).negative_weight == 0.0 and task_from_config(task.config()).negative_weight == 0.8

