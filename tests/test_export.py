"""Embeddings out of a run (scripts/export.py): parquet and npy round trips against the Recommender's
tables, the README's reading snippets, and the script's one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, compose_cfg, make_inter, run_script_reporting_imports
from recsys_torch import cli
from recsys_torch.export import export_embeddings
from recsys_torch.models import MFModel, PopularityModel
from recsys_torch.recommend import Recommender
from recsys_torch.train import train

SCRIPT = str(REPO / "scripts" / "export.py")

# The README's snippets, read from README.md and run as they are written (from the folder holding exports/).
def readme_snippet(name: str) -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- export-{name}:start -->\s*```python\n(.*?)```\s*<!-- export-{name}:end -->", text, re.S)
    assert block, f"README has no export-{name} snippet"
    return block.group(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    train(compose_cfg(["trainer.epochs=2"]), str(out))
    return out


def readme_recommender() -> Recommender:
    """A run with the README's user "196" among its users, titles, and an item nobody rated."""
    n_users, n_items = 5, 30
    torch.manual_seed(0)
    model = MFModel(n_users, n_items, embedding_dim=6)
    users = torch.arange(n_users).repeat_interleave(6)
    items = torch.arange(n_users * 6) % (n_items - 1)  # the last item has no ratings
    model.prepare(make_inter(users, items, torch.full((len(users),), 4.0), n_users=n_users, n_items=n_items))
    with torch.no_grad():
        model.item_bias.weight.normal_()
        model.user_bias.weight.normal_()
    titles = [f"Movie, {i}" for i in range(n_items)]
    return Recommender(model, ["7", "196", "12", "x y", "ü"], [str(100 + i) for i in range(n_items)], titles,
                       users, items, torch.full((len(users),), 4.0))


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_round_trip_equals_the_recommender_tables(tmp_path, fmt):
    import pyarrow.parquet as pq

    rec = readme_recommender()
    paths = export_embeddings(rec, str(tmp_path / "out"), fmt)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["global_bias"] == rec.global_bias and meta["dim"] == 6 and str(tmp_path / "out" / "meta.json") in paths
    sides = {"user": (rec.user_ids, None, rec.user_scorable, rec.user_bias, rec.user_vectors),
             "item": (rec.item_ids, rec.titles, rec.candidates, rec.item_bias, rec.item_vectors)}
    for side, (ids, titles, known, bias, vectors) in sides.items():
        if fmt == "parquet":
            table = pq.read_table(tmp_path / "out" / f"{side}s.parquet")
            got_ids, got_known = table.column("id").to_pylist(), table.column("known").to_numpy(zero_copy_only=False)
            got_bias = table.column("bias").to_numpy()
            got_vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
            got_titles = table.column("title").to_pylist() if titles else None
        else:
            load = lambda name: np.load(tmp_path / "out" / f"{side}_{name}.npy", allow_pickle=False)  # noqa: E731
            got_ids, got_known, got_bias, got_vectors = load("ids").tolist(), load("known"), load("bias"), load("vectors")
            got_titles = load("titles").tolist() if titles else None
        assert got_ids == list(ids) and got_titles == (list(titles) if titles else None)
        np.testing.assert_array_equal(got_known, known)
        np.testing.assert_array_equal(got_bias, bias)
        np.testing.assert_array_equal(got_vectors, vectors)
        assert got_vectors.dtype == np.float32
    assert not rec.candidates[-1] and rec.candidates[0]


@pytest.mark.parametrize("fmt, snippet", [("parquet", "pandas"), ("npy", "numpy")], ids=["pandas", "numpy"])
def test_the_readme_snippet_reads_an_export(tmp_path, monkeypatch, fmt, snippet):
    snippet = readme_snippet(snippet)
    rec = readme_recommender()
    export_embeddings(rec, str(tmp_path / "exports"), fmt)
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)
    want = [r.item for r in rec.recommend("196", 10)]  # what recommend.py gives: rated items left out
    top10 = names["top10"]
    assert (list(top10["id"]) if fmt == "parquet" else top10.tolist()) == want
    code = rec.user_code("196")
    open_items = rec.candidates.copy()
    open_items[rec.rated(code)] = False
    assert open_items.sum() < rec.candidates.sum()  # the user rated some of the items the run recommends
    np.testing.assert_allclose(names["scores"][open_items],
                               rec.scores_for(rec.user_vectors[code], float(rec.user_bias[code]))[open_items],
                               rtol=1e-5)
    assert np.isneginf(names["scores"][rec.rated(code)]).all()


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_holds_what_each_user_rated(tmp_path, fmt):
    """users' rated: every item recommend.py leaves out for them, a ranking run's items below the
    threshold included; positions in the item table."""
    import pyarrow.parquet as pq

    rec = readme_recommender()
    seen_indptr = np.array([0, 0, 2, 2, 2, 3])  # items rated below a threshold: users 1 and 4
    rec._seen = (seen_indptr, np.array([29, 20, 3]))
    export_embeddings(rec, str(tmp_path / "out"), fmt)
    if fmt == "parquet":
        got = [np.asarray(r) for r in pq.read_table(tmp_path / "out" / "users.parquet").column("rated").to_pylist()]
    else:
        indptr = np.load(tmp_path / "out" / "user_rated_indptr.npy")
        items = np.load(tmp_path / "out" / "user_rated_items.npy")
        got = [items[indptr[u]:indptr[u + 1]] for u in range(len(rec.user_ids))]
    assert [sorted(g.tolist()) for g in got] == [sorted(rec.rated(u).tolist()) for u in range(len(rec.user_ids))]
    assert 29 in got[1] and len(got[4]) == 7


def test_export_of_a_run_without_training_rows_has_no_rated(tmp_path):
    rec = readme_recommender()
    rec._train = None
    paths = export_embeddings(rec, str(tmp_path / "out"), "npy")
    assert not any("rated" in p for p in paths)


def test_export_of_a_model_without_vectors(tmp_path):
    import pyarrow.parquet as pq

    model = PopularityModel(2, 3)
    model.prepare(make_inter([0, 1, 1], [1, 1, 0], [1.0, 1.0, 1.0], n_users=2, n_items=3))
    rec = Recommender(model, ["a", "b"], ["x", "y", "z"])
    export_embeddings(rec, str(tmp_path / "pq"), "parquet")
    assert pq.read_table(tmp_path / "pq" / "items.parquet").column_names == ["id", "title", "known", "bias"]
    paths = export_embeddings(rec, str(tmp_path / "npy"), "npy")
    assert not any("vectors" in p for p in paths)
    assert json.loads((tmp_path / "npy" / "meta.json").read_text())["dim"] == 0


def load_script():
    spec = importlib.util.spec_from_file_location("export_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exports_a_trained_run_without_importing_torch(run, tmp_path):
    out = tmp_path / "exports"
    proc = run_script_reporting_imports(SCRIPT, [f"run_dir={run}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 60 users and 40 items (64 dims) to")
    assert proc.stdout.strip().endswith("torch imported: False")
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "meta.json", "users.parquet"]


@pytest.mark.parametrize("args, message", [
    (["format=hdf5"], "error: format must be one of parquet, npy, got 'hdf5'"),
    (["colour=red"], "error: unknown argument 'colour'"),
])
def test_cli_errors_are_one_line(run, tmp_path, capsys, args, message):
    code = cli.run(load_script().main, [f"run_dir={run}", f"out={tmp_path / 'e'}", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_file_as_the_output_folder(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.run(load_script().main, [f"run_dir={run}", f"out={tmp_path / 'file'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: out={tmp_path / 'file'} is a file")
    assert cli.run(load_script().main, [f"out={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: run_dir= is required")


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_of_new_user_item_biases(tmp_path, fmt):
    """A run whose model scores users training never saw with their own item biases (the hybrid's
    new_user_bias) exports them, with which users are trained; other runs write neither."""
    import pyarrow.parquet as pq

    rec = readme_recommender()
    plain = export_embeddings(rec, str(tmp_path / "plain"), fmt)
    assert not any("trained" in name or "new_user" in name for name in map(os.path.basename, plain))
    rec.new_user_item_bias = rec.item_bias + np.float32(0.25)
    rec.user_trained = np.array([True, True, False, True, True])
    export_embeddings(rec, str(tmp_path / "out"), fmt)
    if fmt == "parquet":
        items, users = (pq.read_table(tmp_path / "out" / f"{side}s.parquet") for side in ("item", "user"))
        got_bias, got_trained = items.column("new_user_bias").to_numpy(), users.column("trained").to_numpy(zero_copy_only=False)
    else:
        got_bias = np.load(tmp_path / "out" / "item_new_user_bias.npy", allow_pickle=False)
        got_trained = np.load(tmp_path / "out" / "user_trained.npy", allow_pickle=False)
    np.testing.assert_array_equal(got_bias, rec.new_user_item_bias)
    np.testing.assert_array_equal(got_trained, rec.user_trained)
    assert "new_user_bias" in json.loads((tmp_path / "out" / "meta.json").read_text())["new_user_score"]
