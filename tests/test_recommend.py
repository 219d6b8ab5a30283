"""Recommending from a trained run: top-N with rated items excluded and reasons, similar items,
fold-in of a new user (ratings and user features), and the command line with its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from recsys_torch import cli as cli_errors
import torch

from conftest import REPO, compose_cfg, run_script_reporting_imports
from recsys_torch.data.features import Features
from recsys_torch.errors import CheckpointError, ConfigError, UnknownIdError
from recsys_torch.models import HybridModel, MFModel, PopularityModel
from recsys_torch.recommend import Recommender
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.train import train

SCRIPT = str(REPO / "scripts" / "recommend.py")


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rating_run")
    train(compose_cfg(["trainer.epochs=3"]), str(out))
    return out


# against the hybrid's ranking preset: the user tower on (for the features queries) and no refit (on
# train + val, a user of the tiny data would have fewer than 5 items left to recommend)
RANKING_RUN = ["task=ranking", "task.loss=softmax", "task.n_negatives=4", "split=user", "model=hybrid",
               "model.use_user_features=true", "trainer.refit=false", "trainer.epochs=3"]


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranking_run")
    train(compose_cfg(RANKING_RUN), str(out))
    return out


def cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def busiest_user(rec: Recommender) -> str:
    counts = [len(rec.history(c)[0]) for c in range(len(rec.user_ids))]
    return rec.user_ids[max(range(len(counts)), key=counts.__getitem__)]


# ---- top-N for a user of the run ----------------------------------------------------------------

@pytest.mark.parametrize("run", ["rating_run", "ranking_run"])
def test_top_k_is_the_model_ranking_without_rated_items(run, request):
    rec = Recommender.load(str(request.getfixturevalue(run)))
    user = busiest_user(rec)
    code = rec.user_code(user)
    rated = set(rec.rated(code).tolist())
    scores = rec.model.score_all(torch.tensor([code]))[0]
    allowed = [c for c in range(len(rec.item_ids)) if rec.candidates[c]]
    by_score = sorted(allowed, key=lambda c: (-float(scores[c]), c))

    recs = rec.recommend(user, k=5)
    assert [r.item for r in recs] == [rec.item_ids[c] for c in by_score if c not in rated][:5]
    assert not rated & {rec.item_code(r.item) for r in recs}
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert all(r.title == f"Item {r.item}" for r in recs)  # the synthetic data's titles
    everything = rec.recommend(user, k=5, exclude_rated=False)
    assert [r.item for r in everything] == [rec.item_ids[c] for c in by_score][:5]
    assert rated & {rec.item_code(r.item) for r in everything}  # a busy user's rated items rank high


def test_a_ranking_run_also_leaves_out_what_users_rated_below_its_threshold(ranking_run):
    from recsys_torch.train import load_data

    rec = Recommender.load(str(ranking_run))
    inter = load_data(compose_cfg(RANKING_RUN)).interactions
    low = inter.subset(inter.ratings < 4.0)  # no training rows in a ranking run, but seen all the same
    code = int(torch.bincount(low.users).argmax())
    mine = set(low.items[low.users == code].tolist())
    assert mine and set(rec.rated(code).tolist()) == mine | set(rec.history(code)[0].tolist())
    user = rec.user_ids[code]
    n_left = int(rec.candidates.sum()) - int(rec.candidates[rec.rated(code)].sum())
    assert mine.isdisjoint(rec.item_code(r.item) for r in rec.recommend(user, k=n_left))
    assert mine & {rec.item_code(r.item) for r in rec.recommend(user, k=n_left, exclude_rated=False)}
    assert rec._model is None  # the low ratings travel in recommend.npz too


def test_reasons_name_the_liked_items_closest_to_each_recommendation(rating_run):
    rec = Recommender.load(str(rating_run))
    user = busiest_user(rec)
    items, ratings = rec.history(rec.user_code(user))
    liked = items[(ratings >= ratings.mean()) & (ratings > 3)]
    vectors = unit_rows(rec.item_vectors)
    for r in rec.recommend(user, k=4):
        sim = vectors[liked] @ vectors[rec.item_code(r.item)]
        best = [rec.title(int(liked[j])) for j in np.argsort(-sim, kind="stable")[:2] if float(sim[j]) > 0]
        assert r.reason == ("because you liked " + " and ".join(best) if best else None)


def test_similar_items_by_cosine(ranking_run):
    rec = Recommender.load(str(ranking_run))
    item = rec.item_ids[int(np.flatnonzero(rec.candidates)[0])]
    vectors = unit_rows(rec.item_vectors)
    cos = vectors @ vectors[rec.item_code(item)]
    others = [c for c in range(len(rec.item_ids)) if rec.candidates[c] and rec.item_ids[c] != item]
    want = sorted(others, key=lambda c: (-float(cos[c]), c))[:3]
    got = rec.similar_items(item, k=3)
    assert [r.item for r in got] == [rec.item_ids[c] for c in want]
    assert [r.score for r in got] == pytest.approx([float(cos[c]) for c in want])


@pytest.mark.parametrize("run", ["rating_run", "ranking_run"])
def test_the_saved_tables_serve_what_the_checkpoint_serves(run, request):
    folder = request.getfixturevalue(run)
    fast = Recommender.load(str(folder))
    slow = Recommender._from_checkpoint(str(folder / "checkpoint.pt"))
    user, item = busiest_user(slow), slow.item_ids[int(np.flatnonzero(slow.candidates)[0])]
    for query in (lambda r: r.recommend(user, k=5), lambda r: r.recommend(user, k=5, exclude_rated=False),
                  lambda r: r.similar_items(item, k=4)):
        got, want = query(fast), query(slow)
        assert [(r.item, r.title, r.reason) for r in got] == [(r.item, r.title, r.reason) for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert fast._model is None  # served from recommend.npz: the model was never rebuilt
    folded = fast.fold_in([(item, 5.0)])  # fold-in still works, rebuilding the model when it must
    assert [r.item for r in fast.recommend_for(folded, k=3)] == [r.item for r in slow.recommend_for(folded, k=3)]


def test_a_stale_or_broken_index_falls_back_to_the_checkpoint(tmp_path, rating_run):
    import shutil

    from recsys_torch.checkpoint import load_checkpoint
    from recsys_torch.io import atomic_torch_save

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("checkpoint.pt", "recommend.npz", "run.json"):
        shutil.copy(rating_run / name, folder / name)  # a plain copy: new modification times
    user = busiest_user(Recommender.load(str(folder)))
    want = [r.item for r in Recommender.load(str(folder)).recommend(user, k=5)]
    assert Recommender.load(str(folder))._model is None  # matched by content, not by size and mtime
    checkpoint = folder / "checkpoint.pt"
    state = load_checkpoint(str(checkpoint))
    state["note"] = "replaced"  # another file in the checkpoint's place: the index is not its own
    atomic_torch_save(str(checkpoint), state)
    stale = Recommender.load(str(folder))
    assert stale._model is not None and [r.item for r in stale.recommend(user, k=5)] == want
    index = folder / "recommend.npz"
    for junk in (b"not a zip file", index.read_bytes()[:2000]):  # foreign bytes; a truncated copy
        index.write_bytes(junk)
        broken = Recommender.load(str(folder))
        assert broken._model is not None and [r.item for r in broken.recommend(user, k=5)] == want


def test_recommend_serves_only_a_complete_run(tmp_path, rating_run):
    import json
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(rating_run, folder)
    manifest = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**manifest, "status": "failed", "run_id": "other"}))
    with pytest.raises(CheckpointError, match=r"did not finish \(run.json says 'failed'\)"):
        Recommender.load(str(folder))
    (folder / "run.json").write_text(json.dumps({**manifest, "run_id": "someone-else"}))
    with pytest.raises(CheckpointError, match="belongs to another run"):
        Recommender.load(str(folder))


def test_cli_answers_a_user_query_without_importing_torch(rating_run):
    out = run_script_reporting_imports(SCRIPT, [f"run_dir={rating_run}", "user=0", "k=3"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("torch imported: False") and "top 3 for user 0" in out.stdout


def test_errors_for_unknown_ids_k_and_missing_parts(rating_run, tmp_path):
    rec = Recommender.load(str(rating_run))
    with pytest.raises(UnknownIdError, match="unknown user 'nobody'"):
        rec.recommend("nobody")
    with pytest.raises(UnknownIdError, match="unknown item 'nothing'"):
        rec.similar_items("nothing")
    with pytest.raises(ConfigError, match="k=41 is more than the 40 items"):
        rec.recommend(rec.user_ids[0], k=41)
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        rec.recommend(rec.user_ids[0], k=0)
    with pytest.raises(CheckpointError, match="no user feature tower"):
        rec.fold_in([], {"segment": "seg1"})
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        Recommender.load(str(tmp_path))
    pop = Recommender(_prepared(PopularityModel(2, 3)), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(CheckpointError, match="no item vectors"):
        pop.similar_items("x")
    with pytest.raises(CheckpointError, match="no training interactions"):
        pop.recommend("a")
    assert [r.item for r in pop.recommend("a", k=2, exclude_rated=False)] == ["y", "x"]


def _prepared(model):
    from conftest import make_inter

    model.prepare(make_inter([0, 1, 1], [1, 1, 0], [1.0, 1.0, 1.0], n_users=model.n_users, n_items=model.n_items))
    return model


# ---- fold-in --------------------------------------------------------------------------------------

def planted_mf(n_items: int = 12, dim: int = 3, reg: float = 0.0) -> MFModel:
    """An MF model with hand-set item vectors: items 0-5 point along e0, items 6-11 along e1, and the
    second group has the larger biases (so popularity prefers it)."""
    model = MFModel(2, n_items, embedding_dim=dim, reg=reg, reg_bias=reg)
    with torch.no_grad():
        q = torch.zeros(n_items, dim)
        q[:6, 0] = 1.0 + 0.1 * torch.arange(6)
        q[6:, 1] = 1.0 + 0.1 * torch.arange(6)
        q[:, 2] = 0.3 * torch.randn(n_items, generator=torch.Generator().manual_seed(0))
        model.item_factors.weight.copy_(q)
        model.item_bias.weight.copy_(torch.where(torch.arange(n_items) >= 6, 0.5, 0.0).view(-1, 1))
        model.global_bias.fill_(3.0)
    return model


def test_rating_fold_in_recovers_a_planted_user():
    model = planted_mf(reg=0.0)
    rec = Recommender(model, ["u0", "u1"], [str(i) for i in range(12)], rating_scale=(-10, 10))
    p, b = torch.tensor([1.5, -0.5, 2.0]), 0.25
    with torch.no_grad():
        scores = 3.0 + b + model.item_bias.weight[:, 0] + model.item_factors.weight @ p
    user = rec.fold_in([(str(i), float(scores[i])) for i in range(0, 12, 2)])
    assert np.allclose(user.vector, p.numpy(), atol=1e-3) and user.bias == pytest.approx(b, abs=1e-3)
    # with the model's L2 the solution is the ridge one: the gradient of the objective vanishes
    ridge = Recommender(planted_mf(reg=0.5), ["u0", "u1"], [str(i) for i in range(12)], rating_scale=(-10, 10))
    given = list(range(0, 12, 2))
    u = ridge.fold_in([(str(i), float(scores[i])) for i in given])
    x = torch.cat([model.item_factors.weight.detach()[given], torch.ones(len(given), 1)], 1).double()
    w = torch.cat([torch.from_numpy(u.vector), torch.tensor([u.bias])]).double()
    resid = scores[given].double() - 3.0 - model.item_bias.weight.detach()[given, 0].double() - x @ w
    grad = -x.T @ resid + 0.5 * len(given) * w
    assert grad.abs().max() < 1e-3


def test_ranking_fold_in_follows_the_given_positives():
    model = planted_mf(reg=0.01)
    task = RankingTask(threshold=4.0, loss="softmax")
    rec = Recommender(model, ["u0", "u1"], [str(i) for i in range(12)], task=task, rating_scale=(1, 5))
    user = rec.fold_in([("0", 5), ("1", 4), ("7", 1)])  # likes two of the first group, dislikes one of the second
    recs = rec.recommend_for(user, k=4)
    assert all(int(r.item) < 6 for r in recs)  # the first group, although popularity prefers the second
    assert {"0", "1", "7"}.isdisjoint(r.item for r in recs)
    assert all(r.reason and r.reason.startswith("because you liked") for r in recs)
    assert set(user.liked.tolist()) == {0, 1}
    # without fold-in the same user would get the second group
    blank = rec.recommend_for(type(user)(np.zeros(3, dtype=np.float32), 0.0, user.rated, user.liked), k=4)
    assert all(int(r.item) >= 6 for r in blank)
    with pytest.raises(UnknownIdError, match="unknown item '99'"):
        rec.fold_in([("99", 5)])
    # an item training never saw carries no vector: it is left out of the fit, and still not recommended
    model.known_items[11] = False
    rec = Recommender(model, ["u0", "u1"], [str(i) for i in range(12)], task=task, rating_scale=(1, 5))
    with_unseen = rec.fold_in([("0", 5), ("1", 4), ("11", 5)])
    assert np.allclose(with_unseen.vector, rec.fold_in([("0", 5), ("1", 4)]).vector)
    assert "11" not in {r.item for r in rec.recommend_for(with_unseen, k=9)}
    with pytest.raises(ConfigError, match="outside this run's rating scale"):
        rec.fold_in([("1", 9)])


def test_gramian_fold_in_counts_a_low_rating_as_an_explicit_negative():
    """Under the Gramian loss a new user's rating below the threshold pushes that item's score toward 0,
    as training's explicit negatives do (task.negative_weight); with the weight 0 it changes nothing."""
    model = planted_mf()
    with torch.no_grad():
        model.item_bias.weight.zero_()  # as a Gramian run has them

    def folded(weight, ratings):
        task = RankingTask(threshold=4.0, loss="gramian", negative_weight=weight)
        rec = Recommender(model, ["u0", "u1"], [str(i) for i in range(12)], task=task, rating_scale=(1, 5))
        return rec.fold_in(ratings).vector

    liked = [("0", 5), ("1", 4), ("7", 5)]
    q = model.item_factors.weight.detach().numpy()
    plain, with_low = folded(0.6, liked), folded(0.6, liked + [("3", 1)])
    assert q[3] @ with_low < q[3] @ plain - 0.05  # the disliked item's score drops toward 0
    assert np.allclose(folded(0.0, liked + [("3", 1)]), folded(0.0, liked))


def categorical_user_features(n_users: int) -> Features:
    vocab = ["<pad>", "gender=F", "gender=M", "job=a", "job=b"]
    index = torch.tensor([[1, 3], [2, 4], [1, 4]])[:n_users]
    return Features(index, torch.ones(n_users, 2), torch.zeros(n_users, 0), vocab, [], torch.ones(n_users, dtype=torch.bool))


@pytest.mark.parametrize("fusion", ["sum", "gated", "concat"])
def test_features_fold_in_matches_the_model_on_an_unseen_user(fusion):
    torch.manual_seed(0)
    users = categorical_user_features(3)
    model = HybridModel(3, 5, user_features=users, embedding_dim=4, fusion=fusion)
    _prepared(model)  # user 2 has no training rows: the model scores it from its features alone
    rec = Recommender(model, ["a", "b", "c"], [str(i) for i in range(5)], user_vocab=users.vocab, user_dense=[])
    folded = rec.fold_in([], {"gender": "F", "job": "b"})  # user c's features
    with torch.no_grad():
        side = model.user_side(torch.tensor([2]))
    assert np.allclose(folded.vector, side.vector[0].numpy(), atol=1e-6)
    assert folded.bias == pytest.approx(float(side.bias[0]), abs=1e-6)
    other = rec.fold_in([], {"gender": "M", "job": "b"})
    assert not np.allclose(other.vector, folded.vector)
    with pytest.raises(UnknownIdError, match="unknown value 'X' for user feature 'gender'"):
        rec.fold_in([], {"gender": "X"})
    with pytest.raises(UnknownIdError, match="unknown user feature 'age'"):
        rec.fold_in([], {"age": "30"})


def test_features_of_a_hybrid_without_its_user_tower_name_the_setting():
    features = categorical_user_features(3)
    model = _prepared(HybridModel(3, 5, user_features=features, embedding_dim=4, use_user_features=False))
    rec = Recommender(model, ["a", "b", "c"], [str(i) for i in range(5)], user_vocab=features.vocab, user_dense=[])
    with pytest.raises(CheckpointError, match="trained with model.use_user_features=false"):
        rec.fold_in([], {"gender": "F"})


def test_users_training_never_saw_are_served_with_the_new_user_item_bias(tmp_path):
    """The hybrid's new_user_bias: a user of the run scored from features, and a folded-in user, get
    the model's new-user item biases in every serving path; a trained user gets the plain ones."""
    from conftest import make_inter

    torch.manual_seed(0)
    features = categorical_user_features(3)
    model = HybridModel(3, 6, user_features=features, embedding_dim=4, new_user_bias=True, id_prior=1.0)
    users, items = [0] * 5 + [1] * 4, [0, 1, 2, 3, 4, 1, 2, 3, 5]
    ratings = [5.0, 1.0, 4.0, 2.0, 3.0, 1.0, 5.0, 2.0, 4.0]
    train_rows = make_inter(users, items, ratings, n_users=3, n_items=6)  # user c (2) never rated
    model.prepare(train_rows)
    model.finish(train_rows, RatingTask())
    model.eval()
    assert model.new_user_item_offset() is not None
    table = model.score_all(torch.arange(3)).numpy()
    rec = Recommender(model, ["a", "b", "c"], [str(i) for i in range(6)], None, torch.tensor(users),
                      torch.tensor(items), torch.tensor(ratings), user_vocab=features.vocab, user_dense=[])
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"stands in for the run's checkpoint")
    rec.save_index(str(tmp_path / "recommend.npz"), str(checkpoint))
    saved = Recommender._from_index(str(tmp_path / "recommend.npz"), str(checkpoint))
    folded = rec.fold_in([], {"gender": "F", "job": "b"})  # user c's features
    assert rec.is_new(2) and not rec.is_new(0)
    for served in (rec, saved):
        for code, user in enumerate("abc"):
            got = {int(r.item): r.score for r in served.recommend(user, k=6, exclude_rated=False)}
            assert np.allclose([got[i] for i in range(6)], table[code], atol=1e-5), user
        pairs = served.score_pairs(np.repeat(np.arange(3), 6), np.tile(np.arange(6), 3))
        assert np.allclose(pairs, table.reshape(-1), atol=1e-5)
        for k in (1, 2, 3, 6):
            every = rows_by_user(served.recommend_all(k, exclude_rated=False))
            assert all(every[code] == single(served, code, k, exclude_rated=False) for code in range(3))
        got = {int(r.item): r.score for r in served.recommend_for(folded, 6, exclude_rated=False)}
        assert np.allclose([got[i] for i in range(6)], table[2], atol=1e-5)
    # ratings that are exactly what the model predicts for c leave fold-in nothing to correct
    again = rec.fold_in([(str(i), float(table[2, i])) for i in range(6)], {"gender": "F", "job": "b"})
    assert np.allclose(again.vector, folded.vector, atol=1e-4) and again.bias == pytest.approx(folded.bias, abs=1e-4)


# ---- the command line -----------------------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("recommend_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_process(capsys, *args):
    code = cli_errors.run(load_script().main, list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_titles_and_json(ranking_run, capsys):
    rec = Recommender.load(str(ranking_run))
    user = busiest_user(rec)
    want = rec.recommend(user, k=3)
    text = cli(f"run_dir={ranking_run}", f"user={user}", "k=3")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert lines[0] == f"top 3 for user {user}" and len(lines) == 4
    assert all(line.split()[1] == r.title.split()[0] and r.title in line and r.reason in line
               for r, line in zip(want, lines[1:]))
    got = json.loads(cli(f"run_dir={ranking_run}", f"user={user}", "k=3", "format=json").stdout)
    assert [g["item"] for g in got] == [r.item for r in want]
    assert all(set(g) == {"item", "title", "score", "reason"} for g in got)
    assert [g["score"] for g in got] == pytest.approx([r.score for r in want])

    code, out, _ = in_process(capsys, f"run_dir={ranking_run}", f"item={want[0].item}", "k=2", "format=json")
    assert code == 0 and [s["item"] for s in json.loads(out)] == [r.item for r in rec.similar_items(want[0].item, 2)]
    code, out, _ = in_process(capsys, f"run_dir={ranking_run}", "ratings=1:5,2:4,3", "k=4", "format=json")
    folded = json.loads(out)
    assert code == 0 and len(folded) == 4 and {"1", "2", "3"}.isdisjoint(f["item"] for f in folded)
    code, out, err = in_process(capsys, f"run_dir={ranking_run}", "features=segment:seg1", "k=2")
    assert code == 0 and out.startswith("top 2 for a new user"), err


@pytest.mark.parametrize("args, message", [
    (["user=nobody"], "error: unknown user 'nobody'"),
    (["item=nothing"], "error: unknown item 'nothing'"),
    (["user=0", "k=1000"], "error: k=1000 is more than the 40 items"),
])
def test_cli_errors_are_one_line_with_exit_2(rating_run, args, message):
    out = cli(f"run_dir={rating_run}", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(message) and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["user=0", "k=ten"], "error: k must be an integer"),
    (["ratings=1:5", "user=0"], "error: give exactly one of"),
    (["ratings=1:five"], "error: ratings: '1:five' is not ITEM:RATING"),
    (["features=segment"], "error: features: 'segment' is not COLUMN:VALUE"),
    (["user=0", "colour=red"], "error: unknown argument 'colour'"),
    (["user=0", "format=xml"], "error: format must be text or json"),
])
def test_cli_argument_errors(rating_run, capsys, args, message):
    code, out, err = in_process(capsys, f"run_dir={rating_run}", *args)
    assert code == 2 and out == "" and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_cli_names_a_missing_run(tmp_path, capsys):
    code, _, err = in_process(capsys, f"run_dir={tmp_path}", "user=1")
    assert code == 2 and err.startswith(f"error: no checkpoint.pt in {tmp_path}")


# ---- fold-in evaluation script ----------------------------------------------------------------------

def load_foldin_eval():
    spec = importlib.util.spec_from_file_location("foldin_eval", str(REPO / "scripts" / "foldin_eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_foldin_eval_scores_held_out_users(tmp_path, ranking_run):
    from recsys_torch.tools import foldin as script

    args = {"n_given": 3, "k": 10, "seed": 0}
    with pytest.raises(ConfigError, match="holds no user out of training"):
        script.evaluate({**args, "run_dir": str(ranking_run)})
    train(compose_cfg(["task=ranking", "split=cold_user", "split.val=0", "trainer.epochs=3", "optimized_metric=null"]),
          str(tmp_path))
    result = script.evaluate({**args, "run_dir": str(tmp_path), "k": 5})
    assert result["n_users"] > 5 and result["n_given"] == 3
    for row in ("fold-in", "most popular", "no fold-in"):
        assert 0 <= result[row]["ndcg@5"] <= 1 and 0 < result[row]["hr@5"] <= 1
    assert script.render(result, 5).splitlines()[2].startswith("fold-in")


def test_foldin_eval_reports_a_config_error_in_one_line(tmp_path, ranking_run, capsys):
    import shutil

    from recsys_torch.checkpoint import load_checkpoint
    from recsys_torch.io import atomic_torch_save

    run = tmp_path / "run"
    shutil.copytree(ranking_run, run)
    state = load_checkpoint(str(run / "checkpoint.pt"))
    state["config"]["task"]["loss"] = "warp"  # e.g. a run written by another version
    atomic_torch_save(str(run / "checkpoint.pt"), state)
    assert cli_errors.run(load_foldin_eval().main, [f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "task.loss must be one of" in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ---- top-N for every user (all_users=true) ----------------------------------------------------------

def tied_recommender(n_users: int = 9, n_items: int = 14, dim: int = 3) -> Recommender:
    """An MF run with exact ties: items 1, 5, 9 and 13 share one vector and bias, as do 2 and 6, and
    users 3 and 4 have zero vectors (they see only the biases); user 7 has no training data (it
    cannot be scored) and user 8 rated all but two items (it has fewer than k left)."""
    from conftest import make_inter

    gen = torch.Generator().manual_seed(3)
    model = MFModel(n_users, n_items, embedding_dim=dim)
    users = [u for u in range(7) for _ in range(3)] + [8] * (n_items - 2)
    items = [(5 * u + j) % n_items for u in range(7) for j in range(3)] + list(range(2, n_items))
    model.prepare(make_inter(users, items, [4.0] * len(users), n_users=n_users, n_items=n_items))
    with torch.no_grad():
        q = torch.randn(n_items, dim, generator=gen)
        b = torch.randn(n_items, generator=gen)
        for i in (5, 9, 13):
            q[i], b[i] = q[1].clone(), b[1].clone()
        q[6], b[6] = q[2].clone(), b[2].clone()
        p = torch.randn(n_users, dim, generator=gen)
        p[3:5] = 0.0
        model.item_factors.weight.copy_(q)
        model.item_bias.weight.copy_(b.view(-1, 1))
        model.user_factors.weight.copy_(p)
    return Recommender(model, [f"u{u}" for u in range(n_users)], [f"i{i}" for i in range(n_items)], None,
                       torch.tensor(users), torch.tensor(items), torch.full((len(users),), 4.0))


def rows_by_user(blocks) -> dict[int, list[tuple[int, float, int]]]:
    out: dict[int, list] = {}
    for block in blocks:
        for u, r, i, s in zip(block.users.tolist(), block.ranks.tolist(), block.items.tolist(), block.scores.tolist()):
            out.setdefault(u, []).append((i, s, r))
    return out


def single(rec: Recommender, code: int, k: int, **kwargs) -> list[tuple[int, float, int]]:
    return [(rec.item_code(r.item), r.score, rank) for rank, r in enumerate(rec.recommend(rec.user_ids[code], k, **kwargs), 1)]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_recommend_all_equals_single_user_queries_with_ties(chunk):
    rec = tied_recommender()
    cut_ties = 0
    for k in (1, 2, 3, 4, 6):
        blocks = list(rec.recommend_all(k, chunk=chunk))
        got = rows_by_user(blocks)
        assert sum(b.n_users for b in blocks) == 9 and sum(b.skipped for b in blocks) == 1 and 7 not in got
        for code in range(7):
            assert got[code] == single(rec, code, k), (k, code)
            last = got[code][-1][1]
            everything = rec.scores_for(rec.user_vectors[code], float(rec.user_bias[code]))
            cut_ties += int((everything == last).sum() > sum(s == last for _, s, _ in got[code]))
        assert sum(b.short for b in blocks) == (k > 2)
        assert got[8] == single(rec, 8, min(k, 2))  # user 8 gets what is left
    assert cut_ties >= 3  # the k-th place often splits a tie: the lower item code goes first
    everything = rows_by_user(rec.recommend_all(k, chunk=chunk, exclude_rated=False))
    for code in range(7):
        assert everything[code] == single(rec, code, k, exclude_rated=False)


@pytest.mark.parametrize("run", ["rating_run", "ranking_run"])
def test_recommend_all_equals_single_user_queries_of_a_trained_run(run, request):
    """The ranking run also leaves out what users rated below its threshold; the hybrid model's
    vectors go through the same exact re-scoring."""
    rec = Recommender.load(str(request.getfixturevalue(run)))
    got = rows_by_user(rec.recommend_all(10, chunk=7))
    scorable = np.flatnonzero(rec.user_scorable)
    assert set(got) == set(scorable.tolist())
    for code in scorable.tolist():
        left = int(rec.candidates.sum() - rec.candidates[np.unique(rec.rated(code))].sum())
        assert got[code] == single(rec, code, min(10, left))


def test_recommend_all_of_a_bias_only_model_with_ties():
    rec = Recommender(_prepared(PopularityModel(3, 6)), ["a", "b", "c"], list("uvwxyz"), None, torch.tensor([0, 1, 1]),
                      torch.tensor([1, 1, 0]), torch.ones(3))
    rec.candidates[:] = True
    rec.item_bias[:] = [0.5, 1.0, 0.5, 1.0, 0.5, 0.2]
    got = rows_by_user(rec.recommend_all(4, chunk=2))
    assert [i for i, _, _ in got[0]] == [3, 0, 2, 4]  # item 1 rated; equal biases in item-code order
    for code in got:
        assert got[code] == single(rec, code, 4)


def test_recommend_all_errors(rating_run):
    rec = Recommender.load(str(rating_run))
    with pytest.raises(ConfigError, match="k=41 is more than the 40 items"):
        next(rec.recommend_all(41))
    with pytest.raises(ConfigError, match="chunk must be a positive integer"):
        next(rec.recommend_all(5, chunk=0))
    pop = Recommender(_prepared(PopularityModel(2, 3)), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(CheckpointError, match="no training interactions"):
        next(pop.recommend_all(2))
    assert [b.items.tolist() for b in pop.recommend_all(2, exclude_rated=False)] == [[1, 0, 1, 0]]


def test_recommend_all_refuses_a_diverged_model():
    rec = tied_recommender()
    rec.user_vectors[2, 0] = np.nan
    with pytest.raises(CheckpointError, match="not a finite number for user u2"):
        list(rec.recommend_all(3))


def read_rows(path) -> list[tuple[str, int, str, float]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if str(path).endswith(".csv"):
        types = {"user": "string", "item": "string", "score": "float32", "title": "string"}
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    else:
        table = pq.read_table(path)
    return table


@pytest.mark.parametrize("name", ["recs.parquet", "recs.csv"])
def test_cli_all_users_writes_every_user_top_k(ranking_run, tmp_path, capsys, name):
    rec = Recommender.load(str(ranking_run))
    out = tmp_path / name
    code, stdout, err = in_process(capsys, f"run_dir={ranking_run}", "all_users=true", "k=5", f"out={out}", "chunk=16")
    assert code == 0, err
    n = int(rec.user_scorable.sum())
    assert stdout.strip() == f"wrote {5 * n:,} rows (top 5 for {n:,} users) to {out}"
    table = read_rows(out)
    assert table.column_names == ["user", "rank", "item", "score", "title"]
    rows = table.to_pylist()
    by_user: dict[str, list] = {}
    for row in rows:
        by_user.setdefault(row["user"], []).append(row)
    assert len(by_user) == n
    for user, got in by_user.items():
        want = rec.recommend(user, 5)
        assert [(g["rank"], g["item"], g["title"], g["score"]) for g in got] == \
            [(i, r.item, r.title, pytest.approx(r.score, abs=0) if name.endswith("parquet") else r.score)
             for i, r in enumerate(want, 1)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cli_all_users_counts_the_users_it_skips(tmp_path, capsys, rating_run):
    rec = Recommender.load(str(rating_run))
    rec.user_scorable[[0, 3]] = False  # as a run whose users 0 and 3 had no training rows
    from recsys_torch.export import summary, write_top_n

    counts = write_top_n(rec, rec.recommend_all(3), str(tmp_path / "r.parquet"))
    assert counts["skipped"] == 2 and counts["users"] == len(rec.user_ids) - 2
    lines = summary(counts, 3, "r.parquet")
    assert lines[1] == "skipped 2 user(s) that cannot be scored (no training data and no user features)"


@pytest.mark.parametrize("name", ["recs.parquet", "recs.csv"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_all_users_leaves_no_half_written_file(rating_run, tmp_path, name, error):
    from recsys_torch.export import write_top_n

    rec = Recommender.load(str(rating_run))
    out = tmp_path / name
    out.write_text("the previous file\n")

    def failing():
        blocks = rec.recommend_all(3, chunk=5)
        yield next(blocks)
        yield next(blocks)
        raise error("killed mid-way")

    with pytest.raises(error):
        write_top_n(rec, failing(), str(out))
    assert out.read_text() == "the previous file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    out.unlink()
    with pytest.raises(error):
        write_top_n(rec, failing(), str(out))
    assert list(tmp_path.iterdir()) == []


def test_cli_all_users_stops_cleanly_on_sigterm(rating_run, tmp_path, capsys, monkeypatch):
    import os
    import signal

    original = Recommender.recommend_all

    def signalled(self, *args, **kwargs):
        for n, block in enumerate(original(self, *args, **kwargs)):
            if n == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # recorded by the script, which stops before the next block
            yield block

    monkeypatch.setattr(Recommender, "recommend_all", signalled)
    out = tmp_path / "recs.parquet"
    code, stdout, err = in_process(capsys, f"run_dir={rating_run}", "all_users=true", "k=3", "chunk=7", f"out={out}",
                                   "progress=false")
    assert code == 128 + signal.SIGTERM and stdout == ""
    assert err == f"error: stopped by SIGTERM: {out} was not written\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_all_users_without_importing_torch(rating_run, tmp_path):
    out = tmp_path / "recs.parquet"
    proc = run_script_reporting_imports(SCRIPT, [f"run_dir={rating_run}", "all_users=true", "k=3", f"out={out}"],
                                        ("torch", "pandas"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("torch imported: False pandas imported: False") and out.exists()
    assert "60/60" in proc.stderr  # the progress bar


@pytest.mark.parametrize("args, message", [
    (["all_users=true"], "error: all_users=true needs out=FILE.parquet or out=FILE.csv"),
    (["all_users=true", "out=recs.txt"], "error: out=recs.txt: the file name must end in .parquet or .csv"),
    (["user=0", "out=recs.csv"], "error: out= is for all_users=true"),
    (["user=0", "all_users=true", "out=recs.csv"], "error: give exactly one of"),
    (["all_users=yes please", "out=recs.csv"], "error: all_users must be true or false"),
    (["ratings=1:5", "ann=true"], "error: ann=true serves user=, item= and all_users=true queries"),
])
def test_cli_all_users_argument_errors(rating_run, capsys, args, message):
    code, out, err = in_process(capsys, f"run_dir={rating_run}", *args)
    assert code == 2 and out == "" and err.startswith(message) and len(err.strip().splitlines()) == 1


# ---- approximate search (ann=true) ------------------------------------------------------------------

@pytest.fixture
def faiss_one_thread():
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield faiss
    faiss.omp_set_num_threads(threads)


def random_catalog_recommender(n_users: int = 25, n_items: int = 300, dim: int = 8) -> Recommender:
    from conftest import make_inter

    gen = torch.Generator().manual_seed(5)
    model = MFModel(n_users, n_items, embedding_dim=dim)
    users = torch.arange(n_users).repeat_interleave(n_items // n_users)  # every item rated once
    items = torch.randperm(n_items, generator=gen)
    model.prepare(make_inter(users, items, torch.full((len(users),), 4.0), n_users=n_users, n_items=n_items))
    with torch.no_grad():
        model.item_factors.weight.copy_(torch.randn(n_items, dim, generator=gen))
        model.item_bias.weight.copy_(2 * torch.randn(n_items, 1, generator=gen))  # biases matter in the ranking
        model.user_factors.weight.copy_(torch.randn(n_users, dim, generator=gen))
    rec = Recommender(model, [str(u) for u in range(n_users)], [str(i) for i in range(n_items)], None, users, items,
                      torch.full((len(users),), 4.0))
    rec.run_id = "test-run"
    return rec


def test_ann_with_an_exact_index_ranks_exactly_as_the_model(faiss_one_thread):
    from recsys_torch.ann import AnnSettings, FaissIndex

    rec = random_catalog_recommender()
    index = FaissIndex(rec, AnnSettings(kind="flat"))
    for user in rec.user_ids:
        assert [(r.item, r.score, r.reason) for r in rec.recommend(user, 10, index=index)] == \
            [(r.item, r.score, r.reason) for r in rec.recommend(user, 10)]
    for item in ("0", "17", "299"):
        got, want = rec.similar_items(item, 8, index=index), rec.similar_items(item, 8)
        assert [r.item for r in got] == [r.item for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-6)
    assert rows_by_user(rec.recommend_all(10, chunk=7, index=index)) == rows_by_user(rec.recommend_all(10, chunk=7))
    # without the folded bias, the inner product alone would rank differently
    plain = rec.user_vectors @ rec.item_vectors.T
    assert any(np.argsort(-plain[u])[0] != rec.item_code(rec.recommend(rec.user_ids[u], 1, exclude_rated=False)[0].item)
               for u in range(len(rec.user_ids)))


def test_ann_proposes_the_candidates_of_users_training_never_saw_under_their_own_item_biases(faiss_one_thread,
                                                                                              tmp_path):
    """A run with new-user item biases (the hybrid's new_user_bias): an exact index must rank the
    users scored as new exactly as the model does, not propose them the items of the plain biases."""
    from recsys_torch.ann import AnnSettings, FaissIndex

    rec = random_catalog_recommender()
    gen = np.random.default_rng(3)
    rec.new_user_item_bias = (rec.item_bias + 3.0 * gen.standard_normal(len(rec.item_bias))).astype(np.float32)
    rec.user_trained = np.arange(len(rec.user_ids)) % 2 == 0  # odd users are scored as new
    index = FaissIndex(rec, AnnSettings(kind="flat"), cache=str(tmp_path))
    for user in rec.user_ids:
        assert [(r.item, r.score) for r in rec.recommend(user, 5, index=index)] == \
            [(r.item, r.score) for r in rec.recommend(user, 5)], user
    assert rows_by_user(rec.recommend_all(5, chunk=7, index=index)) == rows_by_user(rec.recommend_all(5, chunk=7))
    # the two kinds of user get different items: the new-user biases matter in this catalog
    new = [rec.recommend(u, 5) for u in rec.user_ids[1::2]]
    rec.new_user_item_bias = None
    assert new != [rec.recommend(u, 5) for u in rec.user_ids[1::2]]
    # an index saved without the new-user column (another version's) is built again, not misread
    plain = FaissIndex(rec, AnnSettings(kind="flat"), cache=str(tmp_path))
    assert plain.index("user").d == rec.item_vectors.shape[1] + 1 and plain.build_seconds > 0


def test_ann_hnsw_finds_nearly_all_of_the_exact_top_k(faiss_one_thread, tmp_path):
    from recsys_torch.ann import AnnSettings, FaissIndex, benchmark, recall_at_k

    assert recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, 7]])) == pytest.approx(0.5)
    result = benchmark(n_items=2000, dim=16, n_queries=50, k=10, settings=AnnSettings(m=16, ef_construction=64),
                       ef_search=[64])
    assert result["rows"][0]["recall"] >= 0.9
    rec = random_catalog_recommender()
    index = FaissIndex(rec, AnnSettings(m=8, ef_construction=40, ef_search=40), cache=str(tmp_path))
    got = rows_by_user(rec.recommend_all(5, index=index))
    want = rows_by_user(rec.recommend_all(5))
    hits = sum(len({i for i, _, _ in got[u]} & {i for i, _, _ in want[u]}) for u in want)
    assert hits >= 0.9 * 5 * len(want)
    for u in got:  # what it finds is scored exactly, rated items left out
        assert [s for _, s, _ in got[u]] == rec.score_pairs(np.full(len(got[u]), u), [i for i, _, _ in got[u]]).tolist()
        assert not set(rec.rated(u).tolist()) & {i for i, _, _ in got[u]}
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["ann-user-hnsw8-40-test-run.faiss"]
    again = FaissIndex(rec, AnnSettings(m=8, ef_construction=40, ef_search=40), cache=str(tmp_path))
    assert rows_by_user(rec.recommend_all(5, index=again)) == got and again.build_seconds == 0.0


def test_cli_ann_answers_user_item_and_all_users_queries(faiss_one_thread, rating_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rating_run, run)
    rec = Recommender.load(str(run))
    for query in ("user=0", "item=3"):
        code, out, err = in_process(capsys, f"run_dir={run}", query, "k=4", "format=json", "ann=true", "ann_kind=flat")
        exact = in_process(capsys, f"run_dir={run}", query, "k=4", "format=json")[1]
        assert code == 0, err
        assert [r["item"] for r in json.loads(out)] == [r["item"] for r in json.loads(exact)]
    code, _, err = in_process(capsys, f"run_dir={run}", "all_users=true", "k=4", f"out={tmp_path / 'r.parquet'}",
                              "ann=true", "ann_m=8", "progress=false")
    assert code == 0, err
    assert read_rows(tmp_path / "r.parquet").num_rows == 4 * int(rec.user_scorable.sum())
    assert {p.name.split("-")[1] for p in run.glob("ann-*.faiss")} == {"user", "item"}


def test_cli_ann_without_faiss_is_one_error_line(rating_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    for query in (["user=0"], ["item=1"], ["all_users=true", "out=never.parquet"]):
        code, out, err = in_process(capsys, f"run_dir={rating_run}", *query, "ann=true")
        assert code == 2 and out == "" and err == "error: ann=true needs faiss: pip install -e '.[ann]'\n"


def test_a_reader_that_goes_away_is_no_traceback(rating_run):
    """``recommend.py ... | head``: the reader closes the pipe before the answer is written. Was a
    BrokenPipeError traceback; now the script stops quietly with the shell's SIGPIPE status."""
    import subprocess
    import sys

    from conftest import REPO

    user = Recommender.load(str(rating_run)).user_ids[0]
    proc = subprocess.Popen([sys.executable, "scripts/recommend.py", f"run_dir={rating_run}", f"user={user}", "k=5",
                             "format=json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""
