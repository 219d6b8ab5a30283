"""Every training command the README and the docs show, and every example of the config cheat sheet,
runs and exits 0 (on tiny synthetic data, for an epoch or two): a documented command can never fail
again the way `task=ranking` once did (it trained, then exited 2)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TINY = ["data.n_users=60", "data.n_items=40", "data.n_ratings=1200"]
IGNORED = ("hydra.", "trainer.num_threads", "trainer.progress", "trainer.fused")
QUICK = ["trainer.epochs=2", "trainer.progress=false", "logger=none", "hydra.sweeper.n_trials=2"]


def documented_commands() -> list[tuple[str, str]]:
    """``(where, the arguments after scripts/train.py)`` of every command in the docs (continuation
    lines joined, comments dropped), and every cheat-sheet example as a command of its own."""
    found = []
    for path in DOCS:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for match in re.finditer(r"python scripts/train\.py([^`\n#]*)", text):
            args = match.group(1).strip()
            if "..." in args or "NAME" in args or "DIR" in args or "torchrun" in args:
                continue  # placeholders, not commands
            found.append((path.name, args))
    readme = (REPO / "README.md").read_text()
    sheet = readme[readme.index("## Config groups (cheat-sheet)"):readme.index("Top-level keys")]
    for row in sheet.splitlines()[4:]:
        cells = row.split("|")
        if len(cells) > 3:
            for example in re.findall(r"`([^`]+)`", cells[3]):
                found.append(("README.md cheat sheet", example))
    unique = {}
    for where, args in found:  # one run per distinct command (run-folder, thread and trial-count flags aside)
        key = " ".join(sorted(a for a in shlex.split(args) if not a.startswith(IGNORED)))
        unique.setdefault(key, (where, args))
    return sorted(unique.values())


COMMANDS = documented_commands()


def write_csv_inputs(folder) -> None:
    """The files the README's data=csv example names (ratings.tsv with userId/movieId/stars/ts,
    movies.csv with movieId/title/genres/year)."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), int(rng.integers(1, 6)), 1_000_000 + int(u * 100 + i)) for u in range(40)
            for i in rng.choice(30, 12, replace=False)]
    pd.DataFrame(rows, columns=["userId", "movieId", "stars", "ts"]).to_csv(folder / "ratings.tsv", sep="\t", index=False)
    pd.DataFrame({"movieId": range(30), "title": [f"Film {i}" for i in range(30)],
                  "genres": ["Comedy|Drama", "Action"] * 15, "year": rng.integers(1950, 2000, 30)}).to_csv(
        folder / "movies.csv", index=False)


def test_the_docs_show_the_commands_this_test_runs():
    args = [a for _, a in COMMANDS]
    assert any("task=ranking" in a for a in args) and any("experiment=ranking_ml100k_mf" in a for a in args)
    assert any(a.startswith("-m hparams_search=") for a in args) and any("data=csv" in a for a in args)


@pytest.mark.slow
@pytest.mark.parametrize("where, args", COMMANDS, ids=[a[:60] for _, a in COMMANDS])
def test_a_documented_command_runs(where, args, tmp_path):
    argv = shlex.split(args)
    multirun = "-m" in argv
    argv = [a for a in argv if a != "-m" and not a.startswith(("hydra.run.dir", "hydra.sweep.dir"))]
    if any(a.startswith("hparams_search=") for a in argv) and not _has("optuna"):
        pytest.skip("the sweep extra (Optuna) is not installed")
    if "data=csv" in argv:
        write_csv_inputs(tmp_path)
        data = []
    elif any(a.startswith("data=") for a in argv):
        argv = [a if not a.startswith("data=") else "data=synthetic" for a in argv]
        data = TINY
    else:
        data = ["data=synthetic", *TINY]
    argv = [a for a in argv if not a.startswith("data.n_")]  # the tiny sizes below replace documented ones
    extra = [*data, *QUICK, "trainer.num_threads=1"]
    if not any(a.startswith("hparams_search=") for a in argv):  # the basic sweeper has no n_trials
        extra = [e for e in extra if not e.startswith("hydra.sweeper")]
    out = [f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else [f"hydra.run.dir={tmp_path / 'run'}"]
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *(["-m"] if multirun else []), *argv, *extra, *out]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: python scripts/train.py {args}\n{proc.stderr[-3000:]}"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
