"""recsys_torch.tools.benchmark and scripts/benchmark.py on tiny data: rows, peers on the same split,
their predictions, the pairing of times, per-process peak RSS and the written outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

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
