"""The shape of the package: imports run one way, the core is free of Hydra and the workshop's
libraries, every model serves through the same interface, every script shares one error path, and
runs saved by an older version still load."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from recsys_torch import cli
from recsys_torch.data import encode
from recsys_torch.data.synthetic import synthetic
from recsys_torch.models import BaselineModel, ContentModel, HybridModel, MFModel, PopularityModel
from recsys_torch.recommend import Recommender
from recsys_torch.tasks import RankingTask, RatingTask

PACKAGE = REPO / "recsys_torch"
# the entry layer (and the workshop below it) may use these; the core may not
# the entry layer; the package itself only re-exports the Python API, imported on first use
ENTRY = {"recsys_torch.train", "recsys_torch.cli", "recsys_torch.api", "recsys_torch"}
WORKSHOP_ONLY = ("hydra", "omegaconf", "optuna", "matplotlib", "surprise", "cornac", "implicit", "lightfm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (``from pkg import module`` counts
    as importing the module: the package's own ``__init__`` imports nothing eagerly)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = {n for n in names if (REPO / (n.replace(".", "/") + ".py")).exists()
                          or (REPO / n.replace(".", "/") / "__init__.py").exists()}
            out.update(names)
            if submodules != names:  # a name defined in the module itself
                out.add(node.module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_circle_inside_the_package():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_core_imports_no_hydra_optuna_plotting_or_peers():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name in ENTRY or name.startswith("recsys_torch.tools"):
            continue
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in WORKSHOP_ONLY)
        assert not bad, f"{name} imports {bad}"
        entry = sorted(m for m in _imports(path) if m in ENTRY or m.startswith("recsys_torch.tools"))
        assert not entry, f"the core module {name} imports the entry layer or the workshop: {entry}"


def test_io_is_the_floor_and_recommend_never_reaches_into_training():
    graph = _graph()
    assert graph["recsys_torch.io"] <= {"recsys_torch.errors"}
    assert "recsys_torch.recommend" not in graph["recsys_torch.checkpoint"]
    forbidden = {"recsys_torch.trainer", "recsys_torch.train", "recsys_torch.optim", "recsys_torch.losses"}
    assert not graph["recsys_torch.recommend"] & forbidden


def test_recommend_probes_no_model_and_names_no_task():
    text = (PACKAGE / "recommend.py").read_text()
    assert "getattr(" not in text and "RankingTask" not in text and "RatingTask" not in text
    assert "_buffers" not in text


def test_every_script_goes_through_the_one_error_path():
    for path in (REPO / "scripts").glob("*.py"):
        text = path.read_text()
        imported = _imports(path)
        assert "cli.run(" in text or "recsys_torch.cli.precheck" in imported, f"{path.name} has its own error path"
        private = sorted(m for m in imported if m.startswith("recsys_torch") and m.rsplit(".", 1)[-1].startswith("_"))
        assert not private, f"{path.name} imports private names {private}"
        assert 'print(f"error:' not in text, f"{path.name} prints its own error lines"


# ---- the serving interface, for every model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return encode(synthetic(n_users=30, n_items=20, n_ratings=300, seed=1))


def every_model(data):
    sizes = dict(n_users=data.n_users, n_items=data.n_items, item_features=data.item_features,
                 user_features=data.user_features)
    return {
        "popularity": PopularityModel(**sizes),
        "baseline": BaselineModel(**sizes),
        "mf": MFModel(**sizes, embedding_dim=4),
        "content": ContentModel(**sizes, embedding_dim=4),
        "hybrid": HybridModel(**sizes, embedding_dim=4, implicit=True, new_user_bias=True),
    }


@pytest.mark.parametrize("name", ["popularity", "baseline", "mf", "content", "hybrid"])
@pytest.mark.parametrize("task", [RatingTask(), RankingTask(threshold=4.0, loss="full_softmax")], ids=["rating", "ranking"])
def test_every_model_serves_through_the_interface(data, name, task):
    torch.manual_seed(0)
    model = every_model(data)[name]
    train = data.interactions
    model.prepare(task.prepare_data(train))
    model.eval()
    users, items = model.user_table(), model.item_table()
    assert users.bias.shape == (data.n_users,) and items.bias.shape == (data.n_items,)
    assert (users.vector is None) == (items.vector is None)
    reg, reg_bias, exponent = model.regularization()
    assert min(reg, reg_bias) >= 0 and np.isfinite(exponent)
    assert isinstance(model.scores_unknown_items, bool) and isinstance(model.scores_unknown_users, bool)
    side = model.new_user(torch.tensor([0, 1]))
    assert side.vector is None or side.vector.shape == items.vector.shape[1:]
    model.finish(train, task)
    offset = model.new_user_item_offset()
    assert offset is None or offset.shape == (data.n_items,)
    rec = Recommender(model, train.user_ids, train.item_ids, None, train.users, train.items, train.ratings, task,
                      train.rating_scale)
    user = rec.user_ids[int(np.flatnonzero(rec.user_scorable)[0])]
    assert len(rec.recommend(user, k=3)) == 3
    folded = rec.fold_in([(rec.item_ids[0], 5.0), (rec.item_ids[1], 4.0)])
    assert len(rec.recommend_for(folded, k=3)) == 3
    # a user as a known row of the table scores like the model itself
    code = rec.user_code(user)
    expected = model.score_all(torch.tensor([code]))[0].numpy()
    np.testing.assert_allclose(rec.scores_for(None if rec.user_vectors is None else rec.user_vectors[code],
                                              float(rec.user_bias[code])), expected, rtol=1e-5, atol=1e-5)


# ---- runs saved before the redesign -------------------------------------------------------------------------
OLD_RUNS = REPO / "tests" / "fixtures" / "old_runs"
QUERIES = (["user=1"], ["item=2"], ["ratings=1:5,2:4,3:1"], ["ratings=1:5,2:4", "features=segment:seg1"])


@pytest.mark.parametrize("run", ["mf_rating", "hybrid_rating", "mf_ranking"])
def test_a_checkpoint_written_before_the_redesign_still_serves_the_same(run, tmp_path, capsys):
    """The fixtures were written by the code of commit 9729ace (``expected.jsonl``: its answers)."""
    folder = tmp_path / run
    folder.mkdir()
    shutil.copy(OLD_RUNS / run / "checkpoint.pt", folder / "checkpoint.pt")
    expected = (OLD_RUNS / run / "expected.jsonl").read_text().splitlines()
    spec = __import__("importlib.util").util.spec_from_file_location("rec_script", REPO / "scripts" / "recommend.py")
    script = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for query, want in zip(QUERIES, expected):
        code = cli.run(script.main, [f"run_dir={folder}", *query, "k=5", "format=json"])
        out, err = capsys.readouterr()
        if want.startswith("error:"):
            assert code == 2 and err.strip() == want
        else:
            assert code == 0 and json.loads(out) == json.loads(want), query


def test_a_training_state_saved_before_the_redesign_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(OLD_RUNS / "mf_rating" / "last.pt", run / "last.pt")
    overrides = [line[2:] for line in (OLD_RUNS / "mf_rating" / "overrides.yaml").read_text().splitlines()]
    proc = subprocess.run([sys.executable, "scripts/train.py", *overrides, "trainer.resume=true",
                           f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "was saved by an older version of recsys_torch and cannot be resumed" in lines[0]
