"""Shared fixtures: tiny synthetic data, handmade interactions and the real Hydra configs, shrunk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from recsys_torch.data import encode
from recsys_torch.data.interactions import Interactions
from recsys_torch.data.raw import RawDataset
from recsys_torch.data.synthetic import synthetic

# The test machine has two cores shared by everyone; torch's default thread pool oversubscribes them
# and makes small ops tens of times slower.
torch.set_num_threads(1)

# Property tests: the default suite (and CI) draws a fixed set of examples, so its verdict does not
# change from run to run; `HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py` hunts with fresh random
# examples, many more of them. A case a hunt finds becomes an @example in the test.
settings.register_profile("ci", max_examples=120, derandomize=True, database=None)
settings.register_profile("fuzz", max_examples=3000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

TINY = dict(n_users=60, n_items=40, n_ratings=1200)

# Overrides that make any composed experiment finish in about a second.
TINY_DATA = ["data=synthetic", *(f"data.{key}={value}" for key, value in TINY.items())]
TINY_RUN = [
    "trainer.epochs=2",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "trainer.device=cpu",
    "logger=none",
]


def compose_cfg(overrides: list[str] = ()):
    """The real ``configs/train.yaml`` composed with the tiny overrides, then ``overrides`` (which
    replace the tiny synthetic data when they choose another ``data=``)."""
    from hydra import compose, initialize_config_dir

    data = [] if any(o.startswith("data=") for o in overrides) else TINY_DATA
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*data, *TINY_RUN, *overrides])


@pytest.fixture
def compose():
    return compose_cfg


def make_inter(users, items, ratings, timestamps=None, n_users=None, n_items=None,
               rating_scale=(1.0, 5.0)) -> Interactions:
    """Handmade interactions from plain lists (codes, not raw ids)."""
    users = torch.as_tensor(users, dtype=torch.long)
    items = torch.as_tensor(items, dtype=torch.long)
    n_users = int(users.max()) + 1 if n_users is None else n_users
    n_items = int(items.max()) + 1 if n_items is None else n_items
    return Interactions(
        users=users,
        items=items,
        ratings=torch.as_tensor(ratings, dtype=torch.float32),
        n_users=n_users,
        n_items=n_items,
        timestamps=None if timestamps is None else torch.as_tensor(timestamps, dtype=torch.long),
        user_ids=np.array([str(u) for u in range(n_users)], dtype=object),
        item_ids=np.array([str(i) for i in range(n_items)], dtype=object),
        rating_scale=rating_scale,
    )


@pytest.fixture(scope="session")
def tiny_raw() -> RawDataset:
    """1,200 synthetic ratings of 60 users on 40 items, with timestamps and feature tables.
    Session-scoped: tests must not mutate it."""
    return synthetic(**TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_inter(tiny_raw) -> Interactions:
    return encode(tiny_raw).interactions


@pytest.fixture
def indexed_inter(tiny_inter) -> Interactions:
    """``tiny_inter`` whose ratings are the row numbers, so every split part says which rows it got."""
    n = len(tiny_inter)
    return Interactions(**{**tiny_inter.__dict__, "ratings": torch.arange(n, dtype=torch.float32)})


@pytest.fixture(autouse=True)
def _signals_left_as_found():
    """Each test finds SIGINT / SIGTERM handling as the previous one found it: a test that signals this
    process (or runs a script's precheck, which installs the scripts' handlers) would otherwise leave
    a recorded signal that fails every later run at its finish."""
    import signal

    from recsys_torch import signals

    handlers = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    yield
    signals._received.clear()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _logging_left_as_found():
    """Each test finds logging as the previous one found it: a Hydra run in this process (a sweep
    fixture, a script's main) configures handlers on sys.stdout and non-propagating loggers, which
    would otherwise hide later tests' records from caplog and write to streams pytest has closed."""
    manager = logging.Logger.manager
    before = {name: (lg.handlers[:], lg.propagate, lg.level, lg.disabled)
              for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    root_before = (root.handlers[:], root.level)
    yield
    for name, lg in list(manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger):
            continue
        handlers, propagate, level, disabled = before.get(name, ([], True, logging.NOTSET, False))
        lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
        lg.setLevel(level)
    for handler in root.handlers[:]:  # what a Hydra run added to the root; pytest's own handlers stay
        if handler not in root_before[0] and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(root_before[1])


def run_script_reporting_imports(script: str, args: list[str], modules=("torch",)):
    """Run ``script`` with ``args`` in a fresh interpreter (asserting it exits 0) and print, last,
    whether each of ``modules`` was imported: ``torch imported: False pandas imported: False``."""
    import subprocess
    import sys

    report = ", ".join(f"{m!r} + ' imported:', {m!r} in sys.modules" for m in modules)
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, *{list(args)!r}]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            f"print({report})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
