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

from conftest import REPO, compose_cfg
from recsys_torch.data.features import Features
from recsys_torch.errors import CheckpointError, ConfigError, UnknownIdError
from recsys_torch.models import HybridModel, MFModel, PopularityModel
from recsys_torch.recommend import Recommender
from recsys_torch.tasks import RankingTask
from recsys_torch.train import train

SCRIPT = str(REPO / "scripts" / "recommend.py")


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rating_run")
    train(compose_cfg(["trainer.epochs=3"]), str(out))
    return out


RANKING_RUN = ["task=ranking", "task.loss=softmax", "task.n_negatives=4", "split=user", "model=hybrid",
               "trainer.epochs=3"]


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
    code = ("import runpy, sys\n"
            f"sys.argv = [{SCRIPT!r}, 'run_dir={rating_run}', 'user=0', 'k=3']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
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
