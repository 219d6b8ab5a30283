"""The top-N ranking benchmark (``scripts/benchmark.py --suite ranking``): our ranking models and the
peers (implicit's iALS and BPR, cornac's BPR and EASE, LightFM's WARP where it is installed) on the
very same positives and per-user split, scored by the same full-ranking evaluation.

The parent process builds each data set the way every run does
(``recsys_torch.train.build(recsys_torch.cli.compose(overrides))``) and writes its positives and
the split's part of each row (0 train, 1 validation, 2 test) to one ``.npz`` file; every row (one
model at one thread count) then runs in its own Python process (``python -m
recsys_torch.tools.ranking_bench --worker SPEC``), so that its peak RSS is its own.

* Our rows compose the experiment's config (``experiment=ranking_ml100k_mf`` plus the entry's
  overrides), build the model with :func:`recsys_torch.train.model_factory` and fit it with the
  config's :class:`~recsys_torch.trainer.Trainer`: early stopping on the validation part, then the
  refit on train + validation. The clock covers ``Trainer.fit`` alone, refit included.
* The peers fit train + validation (what our refit sees) with their tuned settings; their factors
  are wrapped in a small module with ``score_all`` (the peer's own scoring rule), so that every row is
  evaluated by :func:`recsys_torch.metrics.ranking_metrics`: every item seen in train + validation
  ranked for each test user, the user's training and validation items masked.
* ``--tune`` (``tune``) runs each entry's grid on the ML-100k validation split (fit on the training
  part, score the validation part with the training items masked) and reports the best setting;
  the catalog below holds the chosen settings, each with the run that chose them.
* Speed rows time a few epochs (iterations) without validation on train + validation and report
  the median epoch after the first, for the speed comparison with implicit's ALS at equal factors
  and threads.

Plain Python (no Hydra in the parent); torch is imported only where a row needs it, so that a peer's
fit runs (and its ``fit peak RSS`` is taken) before torch is loaded for the evaluation.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from recsys_torch.errors import ConfigError, RecsysError
from recsys_torch.tools import peers
from recsys_torch.tools import benchmark as bench
from recsys_torch.tools.benchmark import peak_rss_mb

OURS = "recsys_torch"
REFERENCE = "reference"  # most popular: what any personalized model must beat
PEERS = ("implicit", "cornac", "lightfm")
K = 10
ROW_KEYS = ("dataset", "library", "model", "embedding_dim", "threads", "ndcg", "recall", "fit_seconds",
            "seconds_per_epoch", "peak_rss_mb", "settings")
# cornac's EASE inverts a dense items x items Gram matrix: (G, its inverse, B) at float32 is about
# 12 x n_items^2 bytes, and the inverse O(n_items^3); beyond this many items the row is not run
EASE_MAX_ITEMS = 12_000
FIT_OURS_EXTRA = ("logger=none",)


# ---- the data sets ------------------------------------------------------------------------------------
ML100K = ("experiment=ranking_ml100k_mf",)


def synthetic_overrides(n_users: int = 138_493, n_items: int = 26_744, n_ratings: int = 10_000_000,
                        seed: int = 42) -> tuple[str, ...]:
    """An implicit data set of every interaction: by default shaped like ML-20M's positives."""
    return ("data=synthetic", f"data.n_users={n_users}", f"data.n_items={n_items}", f"data.n_ratings={n_ratings}",
            "data.with_timestamps=false", "task=ranking", "task.threshold=null", "split=user", "split.val=0.05",
            "split.test=0.2", f"seed={seed}")


@dataclass(frozen=True)
class DataSpec:
    """A data set of the suite. ``overrides`` build it (data, task, split); our rows compose
    ``ours`` (the experiment and these) plus their entry's overrides. ``large``: our rows take their
    entry's settings for large data; ``eval_users``: the test is a fixed seeded sample of that many
    users; ``dim``: every factor model at this size."""

    label: str
    overrides: tuple[str, ...]
    ours: tuple[str, ...]
    large: bool = False
    eval_users: int | None = None
    dim: int | None = None
    threads: tuple[int, ...] = (1,)


def ml100k_spec(threads=(1,)) -> DataSpec:
    return DataSpec("ml100k", ML100K, ML100K, threads=tuple(threads))


def synthetic_spec(n_users: int = 138_493, n_items: int = 26_744, n_ratings: int = 10_000_000, seed: int = 42,
                   eval_users: int | None = 10_000, dim: int | None = 64, threads=(2,), large: bool = True) -> DataSpec:
    data = synthetic_overrides(n_users, n_items, n_ratings, seed)
    sample = () if eval_users is None else (f"task.val_sample={eval_users}",)
    return DataSpec(f"synthetic-{_size(n_ratings)}", data, (*ML100K, *data, *sample), large=large,
                    eval_users=eval_users, dim=dim, threads=tuple(threads))


def _size(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclass
class RankData:
    """Positives in code space, the split's part of each row (0 train, 1 val, 2 test), when the test
    is sampled the evaluated test users, and the explicit negatives (ratings below the threshold) with
    their parts (:func:`recsys_torch.splits.negative_parts`), where the run trains on them."""

    users: np.ndarray  # int32
    items: np.ndarray
    assign: np.ndarray  # int8
    n_users: int
    n_items: int
    eval_users: np.ndarray | None = None  # sorted user codes
    negatives: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (users, items, part) per negative

    def save(self, path: str) -> None:
        neg = self.negatives or (np.zeros(0, np.int32),) * 3
        np.savez(path, users=self.users.astype(np.int32), items=self.items.astype(np.int32),
                 assign=self.assign.astype(np.int8), sizes=np.array([self.n_users, self.n_items], dtype=np.int64),
                 eval_users=np.zeros(0, np.int64) if self.eval_users is None else self.eval_users.astype(np.int64),
                 sampled=np.array(self.eval_users is not None), neg_users=neg[0].astype(np.int32),
                 neg_items=neg[1].astype(np.int32), neg_assign=neg[2].astype(np.int8),
                 has_negatives=np.array(self.negatives is not None))

    @classmethod
    def load(cls, path: str) -> "RankData":
        with np.load(path) as f:
            sizes = f["sizes"]
            negatives = (f["neg_users"], f["neg_items"], f["neg_assign"]) if bool(f["has_negatives"]) else None
            return cls(f["users"], f["items"], f["assign"], int(sizes[0]), int(sizes[1]),
                       f["eval_users"] if bool(f["sampled"]) else None, negatives)

    def arrays(self, *parts: int) -> tuple[np.ndarray, np.ndarray]:
        keep = np.isin(self.assign, parts)
        return self.users[keep], self.items[keep]

    def negative_arrays(self, *parts: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The explicit negatives of these parts (None: the run trains on none)."""
        if self.negatives is None:
            return None
        users, items, assign = self.negatives
        keep = np.isin(assign, parts)
        return users[keep], items[keep]

    def interactions(self, *parts: int):
        """The positives of these parts, carrying those parts' explicit negatives."""
        import torch

        from recsys_torch.data.interactions import Interactions

        def rows(u, i):
            return Interactions(torch.from_numpy(u.astype(np.int64)), torch.from_numpy(i.astype(np.int64)),
                                torch.ones(len(u)), self.n_users, self.n_items)

        inter = rows(*self.arrays(*parts))
        negatives = self.negative_arrays(*parts)
        if negatives is not None:
            inter.negatives = rows(*negatives)
        return inter

    def describe(self) -> str:
        counts = np.bincount(self.assign, minlength=3)
        negatives = ""
        if self.negatives is not None:
            n = np.bincount(self.negatives[2], minlength=3)
            negatives = f"; explicit negatives {n[0]:,} train / {n[1]:,} validation / {n[2]:,} held out"
        test_users = len(np.unique(self.users[self.assign == 2]))
        sample = (f"; evaluated on a fixed seeded sample of {len(self.eval_users):,} of its {test_users:,} test users"
                  if self.eval_users is not None else f"; {test_users:,} test users")
        return (f"{len(self.users):,} positives, {len(np.unique(self.users)):,} users, "
                f"{len(np.unique(self.items)):,} items; per-user split {counts[0]:,} train / {counts[1]:,} validation / "
                f"{counts[2]:,} test{sample}{negatives}")


def prepare(spec: DataSpec, seed: int = 42) -> RankData:
    """The data set of ``spec``, built like every run (:func:`recsys_torch.train.build`)."""
    from recsys_torch import splits
    from recsys_torch.cli import compose
    from recsys_torch.train import build

    quiet = logging.getLogger(splits.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        experiment = build(compose([*spec.overrides, "logger=none"]))
    finally:
        quiet.setLevel(level)
    inter, split = experiment.interactions, experiment.splits[0]
    assign = np.asarray(split.assign, dtype=np.int8)
    if [int((assign == k).sum()) for k in range(3)] != [len(split.train), len(split.val), len(split.test)]:
        raise ConfigError("the split's parts do not match its assignment")  # a bug, never a user error
    eval_users = None
    test_users = np.unique(inter.users.numpy()[assign == 2])
    if spec.eval_users is not None and len(test_users) > spec.eval_users:
        rng = np.random.default_rng(seed)
        eval_users = np.sort(rng.choice(test_users, spec.eval_users, replace=False))
    negatives = None
    if split.train.negatives is not None:
        parts = (split.train.negatives, split.val.negatives, split.test.negatives)
        negatives = tuple(np.concatenate(column) for column in zip(
            *((p.users.numpy().astype(np.int32), p.items.numpy().astype(np.int32), np.full(len(p), k, np.int8))
              for k, p in enumerate(parts))))
    return RankData(inter.users.numpy().astype(np.int32), inter.items.numpy().astype(np.int32), assign,
                    inter.n_users, inter.n_items, eval_users, negatives)


# ---- what can be benchmarked ----------------------------------------------------------------------------
def axis(key: str, values) -> list[dict]:
    """One axis of a tuning grid: ``[{key: v} for v in values]``."""
    return [{key: v} for v in values]


@dataclass(frozen=True)
class Entry:
    """One benchmarkable configuration.

    Ours: ``params = {"overrides": [...], "large": [...], "large_fixed_epochs": bool}``: config
    overrides on top of the data set's, the extra ones on large data, and whether our large-data
    row trains for a fixed number of epochs on train + validation (no early stopping). Peers:
    ``{"algo": ..., "kwargs": {...}}``, the library's own settings. ``grid``: the tuning axes
    (each a list of setting dicts; the grid is their product) tried on the ML-100k validation split;
    ``chosen_by`` says which validation run chose ``params``.
    """

    name: str
    library: str
    model: str
    params: dict
    grid: tuple = ()
    chosen_by: str = ""

    DIM_KEYS = {"implicit": "factors", "cornac": "k", "lightfm": "no_components"}
    EPOCH_KEYS = {"implicit": "iterations", "cornac": "max_iter", "lightfm": "epochs"}

    @property
    def settings(self) -> str:
        p = self.params
        if self.library == OURS:
            return " ".join(p["overrides"]) or "as configured"
        return " ".join(f"{k}={v}" for k, v in p["kwargs"].items())

    @property
    def embedding_dim(self) -> int:
        p = self.params
        if self.library == OURS:
            found = [o.split("=", 1)[1] for o in p["overrides"] if o.startswith("model.embedding_dim=")]
            return int(found[-1]) if found else 0  # 0: the experiment's (the row reports the real one)
        key = self.DIM_KEYS.get(self.library)
        return int(p["kwargs"].get(key, 0)) if key and p["algo"] != "EASE" else 0

    def with_settings(self, settings: dict) -> "Entry":
        """The entry with ``settings`` (config overrides for ours, keyword arguments for peers)."""
        params = json.loads(json.dumps(self.params))
        if self.library == OURS:  # a key set again replaces its earlier value, in the large-data list too
            for key, value in settings.items():
                item = f"{key}={value}"
                for name in ("overrides", "large"):
                    found = [n for n, o in enumerate(params.get(name, ())) if o.split("=", 1)[0] == key]
                    for n in found:
                        params[name][n] = item
                    if name == "overrides" and not found:
                        params[name].append(item)
        else:
            params["kwargs"].update(settings)
        return Entry(self.name, self.library, self.model, params, self.grid, self.chosen_by)

    def override(self, epochs: int | None = None, embedding_dim: int | None = None) -> "Entry":
        settings = {}
        if self.library == OURS:
            if epochs is not None:
                settings["trainer.epochs"] = int(epochs)
            if embedding_dim is not None:
                settings["model.embedding_dim"] = int(embedding_dim)
        else:
            if epochs is not None and self.library in self.EPOCH_KEYS and self.params["algo"] != "EASE":
                settings[self.EPOCH_KEYS[self.library]] = int(epochs)
            if embedding_dim is not None and self.embedding_dim:
                settings[self.DIM_KEYS[self.library]] = int(embedding_dim)
        return self.with_settings(settings) if settings else self

    def to_list(self) -> list:
        return [self.name, self.library, self.model, self.params, list(self.grid), self.chosen_by]

    @classmethod
    def from_list(cls, values: list) -> "Entry":
        name, library, model, params, grid, chosen_by = values
        return cls(name, library, model, params, tuple(grid), chosen_by)


# The peers' settings (and our lr / regularization) were chosen by the validation run
#   python scripts/benchmark.py --suite ranking --tune --out bench_out/ranking_tune     (2026-12-01)
# on the ML-100k split of experiment=ranking_ml100k_mf (fit on its training part, validation NDCG@10 with
# the training items masked); each entry's comment gives the winning validation NDCG@10.
TUNED = "chosen on the ML-100k validation split by `scripts/benchmark.py --suite ranking --tune` (2026-12-01)"
TUNED_NEW = TUNED.replace("2026-12-01", "2026-12-02")  # entries added with explicit negatives

CATALOG: dict[str, Entry] = {e.name: e for e in (
    # experiment=ranking_ml100k_mf as shipped: task.loss=gramian solved by ALS (trainer.optimizer=auto),
    # early stopping (patience 3) then the refit. On large data a solve step takes 8,192 users instead of
    # 1,024: every user is solved against the same item table in an epoch, so only the speed changes.
    Entry("ours-als", OURS, "mf, gramian loss, ALS",
          {"overrides": [], "large": ["trainer.batch_size=8192"], "large_fixed_epochs": False},
          chosen_by="the experiment's own settings (configs/experiment/ranking_ml100k_mf.yaml)"),
    # the same Gramian loss by full-batch Adam (100,000 users per step: one step per epoch on ML-100k),
    # validated every 10 epochs. On large data: the 60 epochs the ML-100k validation chose, on train + val.
    # --tune: lr 0.03 (val NDCG@10 0.1610 at epoch 60; 0.01: 0.1600, 0.1: 0.1592, 0.3: 0.1591)
    Entry("ours-gramian-adam", OURS, "mf, gramian loss, Adam",
          {"overrides": ["trainer.optimizer=adam", "trainer.lr=0.03", "trainer.batch_size=100000",
                         "trainer.eval_every=10", "trainer.patience=4", "trainer.epochs=400"],
           "large": ["trainer.epochs=60"], "large_fixed_epochs": True},
          grid=(axis("trainer.lr", [0.01, 0.03, 0.1, 0.3]),), chosen_by=TUNED),
    # the full softmax with each user's logits once (batches of 256 users), Adam. Large data: an epoch
    # costs users x items logits (hours for a converged fit on two cores), so two epochs, for speed.
    # --tune: lr 0.01, dim 64, reg 0.07 per example (val NDCG@10 0.1569 at epoch 43; lr 0.02: 0.1514)
    Entry("ours-user-softmax", OURS, "mf, user softmax, Adam",
          {"overrides": ["task.loss=user_softmax", "trainer.batch_size=256", "trainer.lr=0.01",
                         "trainer.epochs=100", "trainer.patience=3", "model.reg=0.07", "model.reg_bias=0.01",
                         "model.reg_exponent=0.0"],
           "large": ["trainer.epochs=2"], "large_fixed_epochs": True},
          grid=(axis("trainer.lr", [0.005, 0.01, 0.02, 0.05]), axis("model.embedding_dim", [64, 128]),
                [{"model.reg": 0.07, "model.reg_bias": 0.01, "model.reg_exponent": 0.0},
                 {"model.reg": 1.0, "model.reg_bias": 1.0, "model.reg_exponent": 0.5}]),
          chosen_by=TUNED),
    # items ranked by their train + validation counts, the same for every user: the floor
    Entry("most-popular", REFERENCE, "most popular (training counts)", {"algo": "popularity", "kwargs": {}}),
    Entry("implicit-als", "implicit", "AlternatingLeastSquares (iALS)",
          # --tune: val NDCG@10 0.1555 (factors 64: 0.1549, 32: 0.1526; BENCHMARKS.md chose 64/50/10 too)
          {"algo": "ALS", "kwargs": {"factors": 128, "regularization": 50.0, "alpha": 10.0, "iterations": 15}},
          grid=(axis("factors", [32, 64, 128]), axis("regularization", [1.0, 10.0, 50.0, 100.0]),
                axis("alpha", [2.0, 5.0, 10.0, 20.0])), chosen_by=TUNED),
    Entry("implicit-als-neg", "implicit", "iALS + the explicit negatives ours trains on",
          # the same ratings below the threshold as ours (the training part's), each a negative confidence
          # of negative_value (implicit: target 0 at weight alpha x negative_value, unobserved pairs weigh 1)
          # --tune: val NDCG@10 0.1632 (64 factors, negative_value 0.3: 0.1606; implicit-als without them 0.1555)
          {"algo": "ALS", "kwargs": {"factors": 128, "regularization": 50.0, "alpha": 10.0, "iterations": 15,
                                     "negative_value": 0.6}},
          grid=(axis("factors", [64, 128]), axis("regularization", [10.0, 50.0]), axis("alpha", [5.0, 10.0]),
                axis("negative_value", [0.3, 0.6, 1.0])), chosen_by=TUNED_NEW),
    Entry("implicit-bpr", "implicit", "BayesianPersonalizedRanking",
          # --tune: val NDCG@10 0.1118 (its quality falls with more training at lr >= 0.01)
          {"algo": "BPR", "kwargs": {"factors": 128, "learning_rate": 0.003, "regularization": 0.001,
                                     "iterations": 300}},
          grid=(axis("factors", [32, 64, 128]), axis("learning_rate", [0.003, 0.01, 0.03]),
                axis("regularization", [0.001, 0.01, 0.1]), axis("iterations", [100, 300])), chosen_by=TUNED),
    Entry("cornac-bpr", "cornac", "BPR",
          # --tune: val NDCG@10 0.1399 (k 64, lr 0.01: 0.1390)
          {"algo": "BPR", "kwargs": {"k": 128, "max_iter": 200, "learning_rate": 0.05, "lambda_reg": 0.01}},
          grid=(axis("k", [32, 64, 128]), axis("learning_rate", [0.01, 0.05, 0.1]),
                axis("lambda_reg", [0.001, 0.01, 0.1])), chosen_by=TUNED),
    Entry("cornac-ease", "cornac", "EASE",
          # --tune: val NDCG@10 0.1551 (300: 0.1530, 100: 0.1520, 500: 0.1497)
          {"algo": "EASE", "kwargs": {"lamb": 200.0, "posB": True}},
          grid=(axis("lamb", [50.0, 100.0, 200.0, 300.0, 500.0, 800.0, 1200.0]),), chosen_by=TUNED),
    Entry("lightfm-warp", "lightfm", "LightFM WARP (ids only)",
          {"algo": "WARP", "kwargs": {"no_components": 64, "loss": "warp", "learning_rate": 0.05, "epochs": 30}},
          grid=(axis("no_components", [32, 64, 128]), axis("learning_rate", [0.01, 0.05]),
                axis("epochs", [30, 60]))),
)}
DEFAULT_MODELS = tuple(CATALOG)
SPEED_MODELS = ("ours-als", "ours-gramian-adam", "implicit-als")


def available(library: str) -> bool:
    return library in (OURS, REFERENCE) or importlib.util.find_spec(library) is not None


def skip_reason(entry: Entry, data: RankData) -> str | None:
    """Why an entry is not run on this data (a row then says so), or None."""
    if "negative_value" in entry.params.get("kwargs", {}) and data.negatives is None:  # whoever is installed
        return "not run: this data has no ratings below a threshold (no explicit negatives)"
    if not available(entry.library):
        how = ("its sdist needs a setup.py fix to build" if entry.library == "lightfm"
               else "pip install -e '.[bench]'")
        return f"not run: {entry.library} is not installed ({how})"
    if entry.library == "cornac" and entry.params["algo"] == "EASE" and data.n_items > EASE_MAX_ITEMS:
        gb = 12 * data.n_items ** 2 / 1e9
        return (f"not run: EASE inverts a dense {data.n_items:,}² Gram matrix (about {gb:.0f} GB for G, its inverse "
                f"and B at float32, O(n³) = {data.n_items ** 3:.1e} multiply-adds); the limit here is "
                f"{EASE_MAX_ITEMS:,} items")
    return None


def fit_popularity(params, users, items, n_users, n_items, threads, seed) -> "peers.RankFitted":
    """Every user gets the items in the order of their training counts (ties: lower code first)."""
    t0 = time.perf_counter()
    counts = np.bincount(items, minlength=n_items).astype(np.float32)
    seconds = time.perf_counter() - t0
    return peers.RankFitted(lambda u: np.broadcast_to(counts, (len(u), n_items)), seconds, 1, len(users))


RANK_FITTERS = {"implicit": peers.fit_implicit, "cornac": peers.fit_cornac_ranking, "lightfm": peers.fit_lightfm,
                REFERENCE: fit_popularity}


def fit_peer(params: dict, library: str, data: RankData, parts: tuple, threads: int, seed: int) -> "peers.RankFitted":
    """A peer fitted on the positives of ``parts``, and on their explicit negatives where its settings
    ask for them (``negative_value``)."""
    u, i = data.arrays(*parts)
    extra = {"negatives": data.negative_arrays(*parts)} if "negative_value" in params.get("kwargs", {}) else {}
    return RANK_FITTERS[library](params, u, i, data.n_users, data.n_items, threads, seed, **extra)


# ---- fitting ours -------------------------------------------------------------------------------------
@dataclass
class OursFitted:
    model: object
    fit_seconds: float
    epochs: str  # "4+4": early-stopped fit + refit
    epochs_run: int
    seconds_per_epoch: float  # training only, of the final fit (the trainer's own clock)
    epoch_seconds: list  # wall time of each epoch, validation included (both fits)
    n_train: int
    embedding_dim: int
    best_epoch: int
    best_val: float


def _compose_ours(entry: Entry, spec_ours: list[str], large: bool, extra=()):
    from recsys_torch.cli import compose

    params = entry.params
    return compose([*spec_ours, *params["overrides"], *(params.get("large", ()) if large else ()), *extra,
                    *FIT_OURS_EXTRA])


def fit_ours(entry: Entry, data: RankData, spec_ours: list[str], large: bool, threads: int, seed: int,
             device: str = "cpu", fixed: bool | None = None, extra=(), train_parts=(0,), val_parts=(1,)) -> OursFitted:
    """Our entry through the public API: the composed config's model (``model_factory``), task and
    ``Trainer``; the clock covers ``Trainer.fit`` (early stopping and refit). ``fixed``: train for
    the configured epochs on train + validation without validating."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from recsys_torch.data.dataset import Dataset
    from recsys_torch.loggers import NullLogger
    from recsys_torch.train import model_factory

    cfg = _compose_ours(entry, spec_ours, large, extra)
    fixed = bool(entry.params.get("large_fixed_epochs") and large) if fixed is None else fixed
    train, val = data.interactions(*train_parts), data.interactions(*val_parts)
    if fixed:
        train, val = train.concat(val), None
    torch.set_num_threads(threads)
    # A process's first optimizer imports torch._dynamo (seconds): a one-off cost, not fitting.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.manual_seed(seed)
    model = model_factory(cfg, Dataset(train, name="benchmark"))()
    task = instantiate(cfg.task)
    ends: list[float] = []
    trainer = instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _partial_=True)(
        seed=seed, logger=NullLogger(), progress=False, num_threads=threads, device=device, resume=False,
        checkpoint_path=None, callbacks=[lambda *_: ends.append(time.perf_counter())])
    t0 = time.perf_counter()
    result = trainer.fit(model, train, val, task)
    seconds = time.perf_counter() - t0
    final_rows = len(train) + (len(val) if result.refit else 0)
    last = len(result.history)
    epochs = f"{len(ends) - last}+{last}" if result.refit else str(len(ends))
    wall = np.diff([t0, *ends]).tolist()
    return OursFitted(model, seconds, epochs, len(ends), final_rows / max(result.train_ratings_per_second, 1e-12),
                      wall, final_rows, int(cfg.model.embedding_dim), int(result.best_epoch),
                      float(result.best_metric))


# ---- evaluation ---------------------------------------------------------------------------------------
@functools.cache
def _peer_module_class():
    import torch

    class PeerScores(torch.nn.Module):
        """A peer's fitted scoring rule shaped like a model for ``ranking_metrics`` (as
        ``tools/foldin.FoldedUsers``): ``score_all(users) -> [len(users), n_items]``."""

        def __init__(self, scores, n_users: int, n_items: int) -> None:
            super().__init__()
            self.n_users, self.n_items, self.scores = n_users, n_items, scores
            self.register_buffer("global_bias", torch.zeros(()))

        def score_all(self, users):
            out = np.ascontiguousarray(self.scores(users.cpu().numpy()), dtype=np.float32)
            return torch.from_numpy(out)

    return PeerScores


def peer_model(fitted: "peers.RankFitted", n_users: int, n_items: int):
    """A peer's fit as a module with ``n_users``, ``n_items``, ``global_bias`` and ``score_all``."""
    return _peer_module_class()(fitted.scores, n_users, n_items)


def eval_batch(n_items: int) -> int:
    """Users per ranking chunk: at most 2^24 scores at once (as ``RankingTask.evaluate``)."""
    return max(1, min(1024, (1 << 24) // max(n_items, 1)))


def evaluate(model, data: RankData, target: int = 2, masked=(0, 1)) -> dict:
    """Full-ranking metrics at K of the ``target`` part (the test sample when there is one), the
    ``masked`` parts' items masked per user; candidates and popularity from the masked parts."""
    import torch

    from recsys_torch.metrics import ranking_metrics

    truth = data.interactions(target)
    if target == 2 and data.eval_users is not None:
        truth = truth.subset(torch.from_numpy(np.isin(truth.users.numpy(), data.eval_users)))
    parts = [data.interactions(p) for p in masked]
    seen = parts[0]
    for part in parts[1:]:
        seen = seen.concat(part)
    return ranking_metrics(model, truth, parts, seen, (K,), eval_batch(data.n_items))


# ---- one row --------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """What one row process runs: ``kind`` row (fit, evaluate), speed (time epochs) or tune (a grid)."""

    entry: Entry
    data_path: str
    dataset: str
    ours: list = field(default_factory=list)  # the data set's overrides for our rows
    large: bool = False
    threads: int = 1
    seed: int = 42
    device: str = "cpu"
    kind: str = "row"
    repeats: int = 1
    speed_epochs: int = 4

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "entry"}
        return json.dumps({"entry": self.entry.to_list(), **d})

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        return cls(Entry.from_list(d.pop("entry")), **d)


def _head(spec: Spec) -> dict:
    e = spec.entry
    return {"kind": spec.kind, "dataset": spec.dataset, "library": e.library, "model": e.model, "name": e.name,
            "embedding_dim": e.embedding_dim, "threads": spec.threads, "settings": e.settings}


def run_row(spec: Spec) -> dict:
    """Fit (``repeats`` times: the median fit time is reported) and evaluate one entry."""
    data = RankData.load(spec.data_path)
    if spec.kind == "speed":
        return run_speed(spec, data)
    if spec.kind == "tune":
        return run_tune(spec, data)
    entry, times = spec.entry, []
    for _ in range(max(spec.repeats, 1)):
        fitted = None  # the previous repeat's model is freed before the next fit
        if entry.library == OURS:
            fitted = fit_ours(entry, data, spec.ours, spec.large, spec.threads, spec.seed, spec.device)
        else:
            # the peers fit train + validation, what our refit sees
            fitted = fit_peer(entry.params, entry.library, data, (0, 1), spec.threads, spec.seed)
        times.append(fitted.fit_seconds)
    fit_peak = peak_rss_mb()
    if entry.library == OURS:
        model, extra = fitted.model, {
            "epochs": fitted.epochs, "epochs_run": fitted.epochs_run, "seconds_per_epoch": fitted.seconds_per_epoch,
            "embedding_dim": fitted.embedding_dim, "best_epoch": fitted.best_epoch, "n_train": fitted.n_train,
            "val_ndcg": None if math.isnan(fitted.best_val) else fitted.best_val}
    else:
        import torch

        torch.set_num_threads(spec.threads)
        model = peer_model(fitted, data.n_users, data.n_items)
        per_iteration = fitted.iteration_seconds or [fitted.fit_seconds / max(fitted.iterations, 1)]
        extra = {"epochs": str(fitted.iterations), "epochs_run": fitted.iterations,
                 "seconds_per_epoch": statistics.median(per_iteration), "n_train": fitted.n_train}
    t0 = time.perf_counter()
    metrics = evaluate(model, data)
    eval_seconds = time.perf_counter() - t0
    return {**_head(spec), **extra,
            "ndcg": metrics[f"ndcg@{K}"], "recall": metrics[f"recall@{K}"], "precision": metrics[f"precision@{K}"],
            "hr": metrics[f"hr@{K}"], "n_test_users": metrics["n_users"],
            "fit_seconds": statistics.median(times), "fit_seconds_all": times, "eval_seconds": eval_seconds,
            "fit_peak_rss_mb": fit_peak, "peak_rss_mb": peak_rss_mb()}


def run_speed(spec: Spec, data: RankData) -> dict:
    """``speed_epochs`` epochs (iterations) on train + validation without validation; the median
    epoch after the first (the first carries the setup) is ``seconds_per_epoch``."""
    entry = spec.entry
    if entry.library == OURS:
        fitted = fit_ours(entry, data, spec.ours, spec.large, spec.threads, spec.seed, spec.device, fixed=True,
                          extra=(f"trainer.epochs={spec.speed_epochs}",))
        each, dim, seconds = fitted.epoch_seconds, fitted.embedding_dim, fitted.fit_seconds
    else:
        fitted = fit_peer(entry.override(epochs=spec.speed_epochs).params, entry.library, data, (0, 1), spec.threads,
                          spec.seed)
        each, dim, seconds = fitted.iteration_seconds, entry.embedding_dim, fitted.fit_seconds
    timed = each[1:] if len(each) > 1 else each
    return {**_head(spec), "embedding_dim": dim, "epochs": str(len(each)), "epoch_seconds": each,
            "seconds_per_epoch": statistics.median(timed), "fit_seconds": seconds, "ndcg": None, "recall": None,
            "peak_rss_mb": peak_rss_mb()}


def grid_points(grid) -> list[dict]:
    """Every combination of the axes' settings, in order."""
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*grid)]


def run_tune(spec: Spec, data: RankData) -> dict:
    """Each grid point fitted on the training part and scored on the validation part (training items
    masked). Ours: the early-stopped model's validation NDCG (no refit)."""
    entry, points = spec.entry, []
    for settings in grid_points(entry.grid) or [{}]:
        candidate = entry.with_settings(settings)
        t0 = time.perf_counter()
        if entry.library == OURS:
            fitted = fit_ours(candidate, data, spec.ours, spec.large, spec.threads, spec.seed, spec.device,
                              fixed=False, extra=("trainer.refit=false",))
            score, epochs = fitted.best_val, fitted.best_epoch
        else:
            fitted = fit_peer(candidate.params, entry.library, data, (0,), spec.threads, spec.seed)
            import torch

            torch.set_num_threads(spec.threads)
            score = evaluate(peer_model(fitted, data.n_users, data.n_items), data, target=1, masked=(0,))[f"ndcg@{K}"]
            epochs = fitted.iterations
        points.append({"settings": settings, "val_ndcg": float(score), "epochs": epochs,
                       "seconds": time.perf_counter() - t0})
        del fitted
    best = max(points, key=lambda p: p["val_ndcg"])
    return {**_head(spec), "kind": "tune", "grid": [list(a) for a in entry.grid], "points": points, "best": best}


def run_isolated(spec: Spec) -> dict:
    """:func:`run_row` in a fresh Python process (:func:`recsys_torch.tools.benchmark.run_isolated`)."""
    return bench.run_isolated(spec, __name__, empty_row)


def empty_row(spec: Spec, notes: str) -> dict:
    return {**_head(spec), "ndcg": None, "recall": None, "fit_seconds": None, "seconds_per_epoch": None,
            "peak_rss_mb": None, "notes": notes}


def worker_main(argv: list[str]) -> int:
    return bench.worker_main(argv, __name__, run_row, Spec.from_json)


# ---- a whole suite ---------------------------------------------------------------------------------------
def progress_line(index: int, total: int, row: dict) -> str:
    head = f"[{index}/{total}] {row['kind']} {row['dataset']} {row['name']} threads={row['threads']}"
    if row.get("notes"):
        return f"{head}: {row['notes']}"
    if row["kind"] == "tune":
        return f"{head}: best val ndcg@{K} {row['best']['val_ndcg']:.4f} with {row['best']['settings']}"
    if row["kind"] == "speed":
        return f"{head}: {row['seconds_per_epoch']:.2f} s / epoch ({', '.join(f'{s:.2f}' for s in row['epoch_seconds'])})"
    return (f"{head}: ndcg@{K} {row['ndcg']:.4f}, recall@{K} {row['recall']:.4f}, fit {row['fit_seconds']:.2f} s, "
            f"{row['seconds_per_epoch']:.3f} s/epoch, peak RSS {row['peak_rss_mb']:.0f} MB")


def run_specs(specs: list[Spec], data: RankData | None, isolate: bool = True, log=None) -> list[dict]:
    rows = []
    for n, spec in enumerate(specs, 1):
        reason = skip_reason(spec.entry, data) if data is not None else None
        if reason:
            row = empty_row(spec, reason)
        else:
            row = run_isolated(spec) if isolate else run_row(spec)
        rows.append(row)
        if log is not None:
            print(progress_line(n, len(specs), row), file=log, flush=True)
    return rows


def suite_specs(entries: list[Entry], spec: DataSpec, data_path: str, seed: int = 42, device: str = "cpu",
                repeats: int = 1, speed_threads=(), speed_epochs: int = 4, speed_models=SPEED_MODELS,
                threads=None) -> list[Spec]:
    """The rows of one data set: each entry at each of the data set's thread counts, then the speed
    rows (``speed_models`` at each of ``speed_threads``)."""
    common = dict(data_path=data_path, dataset=spec.label, ours=list(spec.ours), large=spec.large, seed=seed,
                  device=device, speed_epochs=speed_epochs)
    out = []
    for entry in entries:
        sized = entry.override(embedding_dim=spec.dim) if spec.dim else entry
        for t in dict.fromkeys(threads or spec.threads):
            out.append(Spec(sized, threads=t, repeats=repeats, **common))
    for t in speed_threads:
        for entry in entries:
            if entry.name in speed_models:
                sized = entry.override(embedding_dim=spec.dim) if spec.dim else entry
                out.append(Spec(sized, threads=t, kind="speed", **common))
    return out


# ---- the report --------------------------------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


RESULT_COLUMNS = (
    ("dataset", lambda r: r["dataset"]), ("library", lambda r: r["library"]), ("model", lambda r: r["name"]),
    ("dim", lambda r: str(r["embedding_dim"] or "")), ("threads", lambda r: str(r["threads"])),
    (f"NDCG@{K}", lambda r: _num(r["ndcg"], ".4f") if r.get("ndcg") is not None else r.get("notes", "failed")),
    (f"Recall@{K}", lambda r: _num(r.get("recall"), ".4f")),
    ("fit s", lambda r: _num(r.get("fit_seconds"), ".3f")),
    ("epochs", lambda r: r.get("epochs", "")),
    ("s / epoch", lambda r: _num(r.get("seconds_per_epoch"), ".4f")),
    ("eval s", lambda r: _num(r.get("eval_seconds"), ".2f")),
    ("fit peak RSS MB", lambda r: _num(r.get("fit_peak_rss_mb"), ".0f")),
    ("peak RSS MB", lambda r: _num(r.get("peak_rss_mb"), ".0f")),
    ("settings", lambda r: f"`{r['settings']}`" if r.get("settings") else ""),
)


def _table(rows: list[dict], columns) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r).replace("|", "\\|") for _, cell in columns) + " |" for r in rows]
    return lines


def results_table(rows: list[dict]) -> str:
    return "\n".join(_table([r for r in rows if r["kind"] == "row"], RESULT_COLUMNS))


def speed_summary(rows: list[dict]) -> list[str]:
    """One line per (data set, threads): each of our epochs against implicit's ALS iteration."""
    out = []
    speed = [r for r in rows if r["kind"] == "speed" and r.get("seconds_per_epoch")]
    for dataset, threads in dict.fromkeys((r["dataset"], r["threads"]) for r in speed):
        cell = [r for r in speed if r["dataset"] == dataset and r["threads"] == threads]
        ref = next((r for r in cell if r["name"] == "implicit-als"), None)
        for r in cell:
            if r["library"] != OURS:
                continue
            line = (f"- {dataset}, {threads} thread(s): {r['name']} {r['seconds_per_epoch']:.2f} s / epoch "
                    f"(dim {r['embedding_dim']})")
            if ref is not None:
                line += (f" vs implicit ALS {ref['seconds_per_epoch']:.2f} s / iteration (factors "
                         f"{ref['embedding_dim']}): ratio {r['seconds_per_epoch'] / ref['seconds_per_epoch']:.2f}")
            out.append(line)
    return out


SPEED_COLUMNS = (
    ("dataset", lambda r: r["dataset"]), ("library", lambda r: r["library"]), ("model", lambda r: r["name"]),
    ("dim", lambda r: str(r["embedding_dim"] or "")), ("threads", lambda r: str(r["threads"])),
    ("epochs timed", lambda r: r.get("epochs", "")),
    ("s / epoch (median after the first)", lambda r: _num(r.get("seconds_per_epoch"), ".3f")
     if r.get("seconds_per_epoch") is not None else r.get("notes", "failed")),
    ("each epoch s", lambda r: ", ".join(f"{s:.2f}" for s in r.get("epoch_seconds") or [])),
    ("peak RSS MB", lambda r: _num(r.get("peak_rss_mb"), ".0f")),
)


def markdown_report(rows: list[dict], title: str, description: list[str]) -> str:
    lines = [f"# {title}", ""]
    for paragraph in description:
        lines += [paragraph, ""]
    if any(r["kind"] == "row" for r in rows):
        lines += [results_table(rows), ""]
    speed = [r for r in rows if r["kind"] == "speed"]
    if speed:
        lines += ["Speed: epochs (iterations) on train + validation without validation, each row in its own "
                  "process; our epoch against one implicit ALS iteration at the same factors and threads:", "",
                  *_table(speed, SPEED_COLUMNS), "", *speed_summary(rows), ""]
    tuned = [r for r in rows if r["kind"] == "tune"]
    if tuned:
        lines += tuning_report(tuned)
    lines += ["Entries (the row's `settings` are on top of the data set's; ours compose "
              "`experiment=ranking_ml100k_mf`):", ""]
    for name in dict.fromkeys(r["name"] for r in rows):
        entry = CATALOG.get(name)
        if entry is not None:
            grid = "; grid " + describe_grid(entry.grid) if entry.grid else ""
            lines.append(f"- `{name}` ({entry.library} {entry.model}): {entry.settings}{grid}"
                         + (f"; {entry.chosen_by}" if entry.chosen_by else ""))
    return "\n".join(lines) + "\n"


def describe_grid(grid) -> str:
    parts = []
    for ax in grid:
        keys = list(dict.fromkeys(k for point in ax for k in point))
        if len(keys) == 1:
            parts.append(f"{keys[0]} {{{', '.join(str(p[keys[0]]) for p in ax)}}}")
        else:
            parts.append("{" + " | ".join(" ".join(f"{k}={v}" for k, v in p.items()) for p in ax) + "}")
    size = int(np.prod([len(ax) for ax in grid])) if grid else 1
    return " x ".join(parts) + f" ({size} points)"


def tuning_report(rows: list[dict]) -> list[str]:
    lines = [f"Tuning on the ML-100k validation split (fit on the training part, validation NDCG@{K} with the "
             "training items masked; ours: the early-stopped model, without refit):", ""]
    lines += ["| entry | grid | best val NDCG@10 | chosen | epochs | runner-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("notes"):
            lines.append(f"| {r['name']} | | {r['notes']} | | | |")
            continue
        ranked = sorted(r["points"], key=lambda p: -p["val_ndcg"])
        second = ranked[1] if len(ranked) > 1 else None
        chosen = " ".join(f"{k}={v}" for k, v in r["best"]["settings"].items())
        runner = f"{second['val_ndcg']:.4f} ({' '.join(f'{k}={v}' for k, v in second['settings'].items())})" if second else ""
        lines.append(f"| {r['name']} | {describe_grid(r['grid'])} | {r['best']['val_ndcg']:.4f} | `{chosen}` | "
                     f"{r['best']['epochs']} | {runner} |")
    return lines + [""]


write_outputs = bench.write_outputs


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
