"""recsys_torch.tools.benchmark and scripts/benchmark.py on tiny data: rows, peers on the same split,
their predictions, the pairing of times, per-process peak RSS and the written outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from recsys_torch.tools import benchmark as bench
from recsys_torch import splits
from recsys_torch.errors import ConfigError

HAS_SURPRISE = bench.peer_available("surprise")
HAS_CORNAC = bench.peer_available("cornac")


def _tiny(protocol="holdout", n_ratings=2000):
    data, inter = bench.prepare(bench.experiment_overrides("synthetic", protocol, 42, n_users=200, n_items=100,
                                                           n_ratings=n_ratings))
    return inter, data


def _with_unknowns():
    """Test rows whose user, item or both training never saw (codes 40 and 25)."""
    rng = np.random.default_rng(0)
    users = np.r_[rng.integers(0, 40, 400), [40, 40, 3, 40]].astype(np.int32)
    items = np.r_[rng.integers(0, 25, 400), [1, 25, 25, 2]].astype(np.int32)
    ratings = rng.integers(1, 6, len(users)).astype(np.float32)
    assign = np.zeros((1, len(users)), dtype=np.int8)
    assign[0, 380:] = 2
    return bench.BenchData(users, items, ratings, 41, 26, (1.0, 5.0), assign)


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_parts_are_the_library_splits():
    inter, data = _tiny("kfold")
    folds = splits.kfold(inter, seed=42, folds=5, val=0.02)
    assert data.assign.shape == (5, len(inter))
    assert ((data.assign == 2).sum(0) == 1).all()  # every rating tests exactly once
    for k, fold in enumerate(folds):
        for code, part in ((0, fold.train), (1, fold.val), (2, fold.test)):
            u, i, r = data.take(data.assign[k] == code)
            got = sorted(zip(u.tolist(), i.tolist(), r.tolist()))
            assert got == sorted(zip(part.users.tolist(), part.items.tolist(), part.ratings.tolist()))
    _, holdout = _tiny("holdout")
    assert holdout.assign.shape[0] == 1 and not (holdout.assign == 1).any()
    assert (holdout.assign == 2).sum() == 200


def test_rows_carry_the_keys_and_consistent_figures(tmp_path):
    _, data = _tiny()
    entries = [bench.CATALOG["mf-pytorch"].override(epochs=2, embedding_dim=8)]
    if HAS_SURPRISE:
        entries.append(bench.CATALOG["surprise-svd"].override(epochs=2, embedding_dim=8))
    if HAS_CORNAC:
        entries.append(bench.CATALOG["cornac-mf"].override(epochs=2, embedding_dim=8))
    rows = bench.run(entries, [1], data, "tiny", str(tmp_path), isolate=False)
    assert [r["library"] for r in rows] == [e.library for e in entries]
    for row in rows:
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["embedding_dim"] == 8 and row["epochs"] == 2 and row["threads"] == 1
        assert 0.3 < row["rmse"] < 2.0 and row["fit_seconds"] > 0 and row["peak_rss_mb"] > 10
        assert row["n_train"] == 1800 and row["n_test"] == 200  # the same split for every library
        assert row["ratings_per_second"] == pytest.approx(1800 * 2 / row["fit_seconds"])


def test_fused_entry_runs_when_the_kernel_builds():
    fused = pytest.importorskip("recsys_torch.fused")
    if fused.load_extension() is None:
        pytest.skip("no C++ toolchain for the fused kernel")
    _, data = _tiny()
    fitted = bench._fit_ours(bench.CATALOG["mf"].override(epochs=2, embedding_dim=8).params, data, 0, 1, 0, "cpu")
    u, i, r = data.take(data.assign[0] == 2)
    assert fitted.epochs_run == 2 and math.sqrt(np.mean((fitted.predict(u, i) - r) ** 2)) < 1.5


@pytest.mark.skipif(not HAS_SURPRISE, reason="scikit-surprise not installed")
@pytest.mark.parametrize("name", ["surprise-svd", "surprise-baseline"])
def test_surprise_predictions_are_its_own(name):
    data = _with_unknowns()
    fitted = bench.peers.fit_surprise(bench.CATALOG[name].override(epochs=3).params, data, 0, 1, 0, "cpu")
    u, i, _ = data.take(data.assign[0] == 2)
    own = [fitted.model.predict(int(a), int(b)).est for a, b in zip(u, i)]
    np.testing.assert_allclose(fitted.predict(u, i), own, rtol=1e-6)


@pytest.mark.skipif(not HAS_CORNAC, reason="cornac not installed")
def test_cornac_predictions_are_its_own():
    data = _with_unknowns()
    fitted = bench.peers.fit_cornac(bench.CATALOG["cornac-mf"].override(epochs=3).params, data, 0, 1, 0, "cpu")
    model = fitted.model
    u, i, _ = data.take(data.assign[0] == 2)
    # cornac's own evaluation gives an id unseen in training an index past the trained ones
    own = [model.rate(model.uid_map.get(int(a), model.num_users), model.iid_map.get(int(b), model.num_items),
                      clipping=False) for a, b in zip(u, i)]
    np.testing.assert_allclose(fitted.predict(u, i), np.clip(np.asarray(own, dtype=float), 1, 5), rtol=1e-5)


def _row(library, name, threads, fit, rmse=0.9, dim=100, **extra):
    return {"dataset": "d", "library": library, "model": name, "embedding_dim": dim, "epochs": 20,
            "threads": threads, "rmse": rmse, "fit_seconds": fit, "ratings_per_second": 1.0, "peak_rss_mb": 1.0,
            "name": name, **extra}


def test_compare_pairs_like_with_like():
    rows = [
        _row("recsys_torch", "mf", 2, 1.0), _row("recsys_torch", "mf", 1, 2.0),
        _row("recsys_torch", "baseline", 1, 0.5, dim=0),
        _row("surprise", "surprise-svd", 1, 8.0), _row("surprise", "surprise-baseline", 1, 0.25, dim=0),
        _row("cornac", "cornac-mf", 2, 4.0), _row("cornac", "cornac-mf", 1, 5.0),
        _row("cornac", "cornac-mf-tuned", 2, 0.1, rmse=0.8),
    ]
    bench.compare(rows, pairs={"mf": ("surprise-svd", "cornac-mf")})
    mf2, mf1, base = rows[:3]
    assert mf2["time_vs_cornac"] == pytest.approx(1.0 / 4.0) and mf2["paired_cornac"] == "cornac-mf"
    assert mf1["time_vs_cornac"] == pytest.approx(2.0 / 5.0)  # same thread count
    assert mf2["time_vs_surprise"] == pytest.approx(1.0 / 8.0)  # Surprise has one thread only
    assert base["time_vs_surprise"] == pytest.approx(2.0) and "time_vs_cornac" not in base  # bias-only pairs
    assert not any("time_vs_surprise" in r for r in rows[3:])


def test_time_to_target_and_the_table():
    rows = [
        _row("recsys_torch", "mf-fast", 1, 0.5, rmse=0.904, fit_seconds_total=2.5, rmse_std=0.005, n_folds=5),
        _row("recsys_torch", "mf-defaults", 1, 0.3, rmse=0.91, fit_seconds_total=1.5),
        _row("cornac", "cornac-mf-tuned", 1, 1.0, rmse=0.9049, fit_seconds_total=5.0),
        _row("surprise", "surprise-svd-tuned", 1, 2.0, rmse=0.915, fit_seconds_total=10.0),
        {**_row("surprise", "surprise-svd", 1, None, rmse=None), "notes": "failed (exit 1): boom"},
    ]
    bench.compare(rows, target=0.905)
    assert rows[0]["time_to_target_seconds"] == 2.5 and rows[1]["time_to_target_seconds"] is None
    assert rows[0]["time_to_target_vs_cornac"] == pytest.approx(0.5)
    assert "time_to_target_vs_surprise" not in rows[0]
    table = bench.markdown_table(rows, 0.905).splitlines()
    assert len(table) == 2 + len(rows)
    head = table[0]
    assert "time vs surprise" in head and "time vs cornac" in head and "time to RMSE ≤ 0.905 s" in head
    assert "0.9040 ± 0.0050" in table[2] and "2.50" in table[2] and "0.50 (cornac-mf-tuned)" in table[2]
    assert "not reached" in table[3] and "failed (exit 1): boom" in table[6]
    summary = bench.target_summary(rows, 0.905)
    assert len(summary) == 1 and "cornac-mf-tuned 5.00 s (ours / theirs 0.50)" in summary[0]
    assert "surprise: no row reaches it" in summary[0]


def _vm_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not HAS_SURPRISE or sys.platform != "linux", reason="needs scikit-surprise and /proc")
def test_isolated_rows_measure_their_own_process(tmp_path):
    ballast = np.ones(256 * 2**20 // 8)  # makes this process far bigger than a tiny Surprise worker
    _, data = _tiny()
    path = str(tmp_path / "data.npz")
    data.save(path)
    entry = bench.CATALOG["surprise-svd"].override(epochs=2, embedding_dim=4)
    row = bench.run_isolated(bench.Spec(entry, path, "tiny"))
    assert row["rmse"] < 2 and row["n_test"] == 200
    # its own high-water mark, not this parent's size (which getrusage carries across fork and exec)
    assert 10 < row["peak_rss_mb"] < 0.5 * _vm_rss_mb()
    del ballast
    broken = bench.Entry("x", "surprise", "KNN", {"algo": "KNN", "kwargs": {}})
    failed = bench.run_isolated(bench.Spec(broken, path, "tiny"))
    assert failed["rmse"] is None and set(bench.ROW_KEYS) <= set(failed)
    assert "failed (exit 2)" in failed["notes"] and "KNN" in failed["notes"]


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    script = _script()
    out = tmp_path / "out"
    code = script.main(["--data", "synthetic", "--n-users", "200", "--n-items", "100", "--n-ratings", "2000",
                        "--models", "mf-pytorch", "surprise-svd", "cornac-mf", "--epochs", "2", "--embedding-dim", "8",
                        "--target", "1.5", "--in-process", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "benchmark.json").read_text())
    peers = [name for name, ok in (("surprise-svd", HAS_SURPRISE), ("cornac-mf", HAS_CORNAC)) if ok]
    assert [r["name"] for r in rows] == ["mf-pytorch", *peers]
    assert all(set(bench.ROW_KEYS) <= set(r) for r in rows) and rows[0]["dataset"] == "synthetic-2k"
    md = (out / "benchmark.md").read_text()
    assert "--models mf-pytorch surprise-svd cornac-mf" in md
    for library, ok in (("surprise", HAS_SURPRISE), ("cornac", HAS_CORNAC)):
        assert (f"| time vs {library} |" in md) == ok
        assert (f"not run: {library} is not installed" in md) != ok
    assert md in capsys.readouterr().out + "\n"


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    for argv, message in ((["--data", "csv"], "--data csv needs --ratings PATH"),
                          (["--data", "synthetic", "--models", "nope"], "--models: unknown ['nope']"),
                          ([], "say what to benchmark")):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *argv, "--out", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
        assert message in proc.stderr
    assert not out.exists()


def test_shipped_entries_follow_the_configs():
    script = _script()
    entries = script.catalog()
    import yaml

    mf = yaml.safe_load((REPO / "configs" / "model" / "mf.yaml").read_text())
    trainer = yaml.safe_load((REPO / "configs" / "trainer" / "default.yaml").read_text())
    shipped = entries["mf-defaults"]
    assert shipped.embedding_dim == mf["embedding_dim"] and shipped.epochs == trainer["epochs"]
    assert shipped.params["trainer"]["lr"] == trainer["lr"] and "device" not in shipped.params["trainer"]
    with pytest.raises(ConfigError, match="unknown"):
        script.choose_entries({"models": ["mf", "nope"], "epochs": None, "embedding_dim": None}, True)
    no_peers, _ = script.choose_entries({"models": ["mf", "cornac-mf"], "epochs": 3, "embedding_dim": None}, False)
    assert [e.name for e in no_peers] == ["mf"] and no_peers[0].epochs == 3


def test_each_model_runs_at_each_thread_count_but_surprise_once():
    entries = [bench.CATALOG[n] for n in ("mf", "surprise-svd", "cornac-mf")]
    specs = list(bench.iter_specs(entries, [2, 1], data_path="x.npz", dataset="d"))
    assert [(s.entry.name, s.threads) for s in specs] == [
        ("mf", 2), ("mf", 1), ("surprise-svd", 1), ("cornac-mf", 2), ("cornac-mf", 1)]
    again = bench.Spec.from_json(specs[0].to_json())
    assert again == specs[0]


def test_our_shipped_rows_run_without_the_peers(tmp_path):
    """`make benchmark`'s own rows (the models as shipped) run whether or not a peer is installed."""
    script = _script()
    entries = script.catalog()
    _, data = _tiny()
    rows = bench.run([entries[name].override(epochs=2) for name in ("mf-defaults", "baseline")], [1], data, "tiny",
                     str(tmp_path), isolate=False)
    assert [r["name"] for r in rows] == ["mf-defaults", "baseline"]
    assert all(r["rmse"] is not None and 0.3 < r["rmse"] < 2.0 for r in rows), rows


# ---- --suite ranking --------------------------------------------------------------------------------
from recsys_torch.tools import ranking_bench as rank  # noqa: E402

HAS_IMPLICIT = rank.available("implicit")
TINY_RANKING = ["--datasets", "synthetic", "--n-users", "60", "--n-items", "40", "--n-ratings", "1200"]


@pytest.fixture(scope="module")
def tiny_ranking():
    """The tiny synthetic implicit set (every interaction a positive, per-user 75/5/20), built like a run."""
    spec = rank.synthetic_spec(60, 40, 1200, eval_users=20)
    return spec, rank.prepare(spec)


def test_ranking_data_is_the_runs_split(tiny_ranking):
    from recsys_torch.cli import compose
    from recsys_torch.train import build

    spec, data = tiny_ranking
    split = build(compose([*spec.overrides, "logger=none"])).splits[0]
    for part, inter in enumerate((split.train, split.val, split.test)):
        u, i = data.arrays(part)
        assert sorted(zip(u.tolist(), i.tolist())) == sorted(zip(inter.users.tolist(), inter.items.tolist()))
    assert len(data.eval_users) == 20 and set(data.eval_users) <= set(split.test.users.tolist())


def test_ranking_data_carries_the_runs_explicit_negatives(tmp_path, tiny_ranking):
    """With a threshold, the suite's data holds each part's explicit negatives as the run has them; our
    rows train on those of their parts, and implicit-als-neg feeds them to implicit as negative
    confidences (a peer without them runs as before; data without them skips the entry)."""
    from recsys_torch.cli import compose
    from recsys_torch.train import build

    overrides = ("data=synthetic", "data.n_users=60", "data.n_items=40", "data.n_ratings=1200", "task=ranking",
                 "task.threshold=4", "split=user", "split.val=0.05", "split.test=0.2", "seed=42")
    spec = rank.DataSpec("tiny-neg", overrides, (*rank.ML100K, *overrides))
    data = rank.prepare(spec)
    split = build(compose([*spec.overrides, "logger=none"])).splits[0]
    for part, inter in enumerate((split.train, split.val, split.test)):
        u, i = data.negative_arrays(part)
        assert sorted(zip(u.tolist(), i.tolist())) == sorted(zip(inter.negatives.users.tolist(),
                                                                 inter.negatives.items.tolist()))
    path = str(tmp_path / "data.npz")
    data.save(path)
    again = rank.RankData.load(path)
    assert all((a == b).all() for a, b in zip(again.negatives, data.negatives))
    fit_on = again.interactions(0, 1)
    assert len(fit_on.negatives) == len(data.negative_arrays(0, 1)[0]) > 0
    assert "explicit negatives" in data.describe()
    _, plain = tiny_ranking
    assert plain.negatives is None and rank.RankData.load(_saved(plain, tmp_path)).negatives is None
    assert "no explicit negatives" in rank.skip_reason(rank.CATALOG["implicit-als-neg"], plain)
    if HAS_IMPLICIT:
        entry = rank.CATALOG["implicit-als-neg"].override(epochs=3, embedding_dim=4)
        with_neg = rank.fit_peer(entry.params, "implicit", data, (0,), 1, 0)
        without = dict(entry.params, kwargs={k: v for k, v in entry.params["kwargs"].items() if k != "negative_value"})
        users = np.arange(data.n_users)
        plain_fit = rank.fit_peer(without, "implicit", data, (0,), 1, 0)
        assert not np.allclose(with_neg.scores(users), plain_fit.scores(users))
        bpr = {"algo": "BPR", "kwargs": {"factors": 4, "iterations": 2, "negative_value": 0.5}}
        with pytest.raises(ConfigError, match="in ALS only"):
            rank.fit_peer(bpr, "implicit", data, (0,), 1, 0)


def _saved(data, tmp_path) -> str:
    path = str(tmp_path / "plain.npz")
    data.save(path)
    return path


def test_ranking_suite_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = _script().main(["--suite", "ranking", *TINY_RANKING, "--epochs", "3", "--eval-users", "20",
                           "--speed-threads", "1", "--speed-epochs", "2", "--in-process", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "benchmark.json").read_text())
    results = [r for r in rows if r["kind"] == "row"]
    assert [r["name"] for r in results] == list(rank.DEFAULT_MODELS)
    for row in results:
        assert set(rank.ROW_KEYS) <= set(row), row
        if row["name"] == "implicit-als-neg":  # this data has no ratings below a threshold
            assert row["ndcg"] is None and "not run" in row["notes"]
        elif rank.available(row["library"]):
            assert 0 <= row["ndcg"] <= 1 and 0 <= row["recall"] <= 1 and row["fit_seconds"] > 0, row
            assert row["seconds_per_epoch"] > 0 and row["peak_rss_mb"] >= row["fit_peak_rss_mb"] > 10
            assert row["n_test_users"] == 20  # the fixed seeded sample of test users
        else:
            assert row["ndcg"] is None and "not installed" in row["notes"]
    ours = {r["name"]: r for r in results if r["library"] == "recsys_torch"}
    assert ours["ours-als"]["epochs"].count("+") == 1  # early stopping, then the refit
    assert ours["ours-user-softmax"]["epochs"] == "3"  # large data: a fixed number of epochs, --epochs wins
    speed = [r for r in rows if r["kind"] == "speed"]
    assert {r["name"] for r in speed} == set(rank.SPEED_MODELS)  # implicit's says "not installed" without it
    assert all(len(r["epoch_seconds"]) == 2 and r["seconds_per_epoch"] > 0 for r in speed if not r.get("notes"))
    md = (out / "benchmark.md").read_text()
    for column in ("NDCG@10", "Recall@10", "fit s", "s / epoch", "peak RSS MB", "settings"):
        assert f"| {column} |" in md
    # the speed lines compare with implicit's ALS only when it ran ("iterations" also contains "ratio")
    assert bool(re.search(r": ratio \d", md)) == HAS_IMPLICIT and "Data `synthetic-1.2k`" in md
    assert md in capsys.readouterr().out + "\n"


def test_ranking_tuning_picks_the_best_point(tmp_path, tiny_ranking):
    from dataclasses import replace

    spec, data = tiny_ranking
    path = str(tmp_path / "data.npz")
    data.save(path)
    entries = [replace(rank.CATALOG["ours-gramian-adam"].override(epochs=20), grid=(rank.axis("trainer.lr", [0.01, 0.1]),))]
    if HAS_IMPLICIT:
        entries.append(replace(rank.CATALOG["implicit-als"].override(epochs=3),
                               grid=(rank.axis("factors", [4, 8]), rank.axis("alpha", [1.0, 5.0]))))
    specs = [rank.Spec(e, path, spec.label, list(spec.ours), spec.large, kind="tune") for e in entries]
    rows = rank.run_specs(specs, data, isolate=False)
    assert [len(r["points"]) for r in rows] == [2, 4][:len(rows)]
    for row in rows:
        assert row["best"]["val_ndcg"] == max(p["val_ndcg"] for p in row["points"]) > 0
        assert all(p["epochs"] >= 1 for p in row["points"])
    assert rows[0]["points"][0]["settings"] == {"trainer.lr": 0.01}
    md = rank.markdown_report(rows, "t", [])
    assert "| ours-gramian-adam | trainer.lr {0.01, 0.1} (2 points) |" in md


def test_ranking_tune_cli_writes_tuning_files(tmp_path):
    out = tmp_path / "tune"
    models = ["ours-als", *(["cornac-ease"] if HAS_CORNAC else [])]
    assert _script().main(["--suite", "ranking", "--tune", *TINY_RANKING, "--models", *models, "--in-process",
                           "--out", str(out)]) == 0
    rows = json.loads((out / "tuning.json").read_text())
    assert [r["name"] for r in rows] == models and len(rows[0]["points"]) == 1  # ours-als: the experiment as is
    if HAS_CORNAC:
        assert len(rows[1]["points"]) == len(rank.CATALOG["cornac-ease"].grid[0])
    assert "Tuning on the ML-100k validation split" in (out / "tuning.md").read_text()


def test_ranking_entries_replace_settings_and_skip_what_cannot_run():
    entry = rank.CATALOG["ours-gramian-adam"].override(epochs=7, embedding_dim=16)
    assert entry.params["overrides"].count("trainer.epochs=7") == 1 and "trainer.epochs=400" not in entry.settings
    assert entry.params["large"] == ["trainer.epochs=7"] and entry.embedding_dim == 16
    peer = rank.CATALOG["implicit-als"].override(epochs=3, embedding_dim=8)
    assert peer.params["kwargs"]["iterations"] == 3 and peer.embedding_dim == 8
    assert rank.CATALOG["cornac-ease"].override(epochs=3, embedding_dim=8).params == rank.CATALOG["cornac-ease"].params
    wide = rank.RankData(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int8), 1, 30_000)
    reason = rank.skip_reason(rank.CATALOG["cornac-ease"], wide)
    assert reason is not None and ("Gram matrix" in reason or "not installed" in reason)
    assert rank.skip_reason(rank.CATALOG["ours-als"], wide) is None
    again = rank.Spec.from_json(rank.Spec(entry, "x.npz", "d", ["a=b"], True, 2, kind="speed").to_json())
    assert again.entry == entry and again.ours == ["a=b"] and again.kind == "speed"


def _train_mask(data, users):
    u, i = data.arrays(0, 1)
    mask = torch.zeros(len(users), data.n_items, dtype=torch.bool)
    for row, user in enumerate(users.tolist()):
        mask[row, i[u == user]] = True
    return mask


def _same_ranking(ours, theirs, own_scores):
    """The same top-k: equal scores (by the peer's own rule) at every rank, and equal items where
    the scores do not tie."""
    np.testing.assert_allclose(own_scores[ours], own_scores[theirs], rtol=1e-5, atol=1e-6)
    distinct = np.diff(np.sort(own_scores[theirs])).min() > 1e-6 if len(theirs) > 1 else True
    if distinct:
        assert list(ours) == list(theirs)


@pytest.mark.skipif(not HAS_IMPLICIT, reason="implicit not installed")
@pytest.mark.parametrize("algo", ["ALS", "BPR"])
def test_implicit_wrapper_ranks_as_its_recommend(tiny_ranking, algo):
    from recsys_torch.metrics import top_k

    _, data = tiny_ranking
    u, i = data.arrays(0, 1)
    fitted = rank.peers.fit_implicit({"algo": algo, "kwargs": {"factors": 8, "iterations": 5}}, u, i, data.n_users,
                                     data.n_items, 1, 0)
    users = torch.tensor([0, 3, 7, 11])
    ours, _ = top_k(rank.peer_model(fitted, data.n_users, data.n_items), users, 10, _train_mask(data, users))
    X = rank.peers._user_items(u, i, data.n_users, data.n_items)
    for row, user in enumerate(users.tolist()):
        theirs, _ = fitted.model.recommend(user, X[user], N=10, filter_already_liked_items=True)
        own = fitted.model.user_factors[user] @ fitted.model.item_factors.T
        _same_ranking(ours[row].numpy(), np.asarray(theirs), own)


@pytest.mark.skipif(not HAS_CORNAC, reason="cornac not installed")
@pytest.mark.parametrize("algo,kwargs", [("BPR", {"k": 8, "max_iter": 20}), ("EASE", {"lamb": 50.0})])
def test_cornac_wrapper_ranks_as_its_recommend(tiny_ranking, algo, kwargs):
    from recsys_torch.metrics import top_k

    _, data = tiny_ranking
    u, i = data.arrays(0, 1)
    fitted = rank.peers.fit_cornac_ranking({"algo": algo, "kwargs": kwargs}, u, i, data.n_users, data.n_items, 1, 0)
    model = fitted.model
    users = torch.tensor([0, 3, 7, 11])
    ours, _ = top_k(rank.peer_model(fitted, data.n_users, data.n_items), users, 10, _train_mask(data, users))
    dataset, _, known_i = rank.peers.cornac_dataset(u, i, np.ones(len(u), dtype=np.float32))
    for row, user in enumerate(users.tolist()):
        theirs = model.recommend(user, k=10, remove_seen=True, train_set=dataset)  # raw ids: our codes
        own = np.full(data.n_items, -np.inf)
        own[known_i] = model.score(model.uid_map[user])
        _same_ranking(ours[row].numpy(), np.asarray(theirs), own)
