"""Side-by-side benchmarks: our models and the peers (Surprise, cornac) on the very same split.

The parent process prepares the data once (load or generate, encode, split) and writes it to one
``.npz`` file; every row (one model at one thread count) then runs in its own Python process
(``python -m recsys_torch.tools.benchmark --worker SPEC``), so its peak RSS is its own and a crash or
an out-of-memory kill loses one row, not the run. A row process imports only its own library: a
peer's memory figure does not include torch.

Timing covers each library's ``fit`` call only (data structures are built before the clock starts);
accuracy is computed here, from each library's own prediction rule (vectorized, and tested equal to
its ``predict``), clipped to the rating scale. ``ratings_per_second`` is
``n_train x epochs_run / fit_seconds``.

Plain Python (no Hydra); ``scripts/benchmark.py`` is the command line.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from recsys_torch.errors import ConfigError, RecsysError
from recsys_torch.tools import peers
from recsys_torch.tools.peers import Fitted

OURS = "recsys_torch"
PEERS = ("surprise", "cornac")
ROW_KEYS = ("dataset", "library", "model", "embedding_dim", "epochs", "threads", "rmse", "fit_seconds",
            "ratings_per_second", "peak_rss_mb")
_ROW_PREFIX = "BENCHMARK_ROW "  # marks the worker's result line on its stdout
_PEER_MODULES = {"surprise": "surprise", "cornac": "cornac"}


# ---- what can be benchmarked --------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One benchmarkable configuration: ``params`` are the library's own settings.

    Ours: ``{"model": "mf" | "baseline", "model_kwargs": {...}, "trainer": {...}}`` (Trainer
    arguments); Surprise: ``{"algo": "SVD" | "BaselineOnly", "kwargs": {...}}``; cornac:
    ``{"algo": "MF", "kwargs": {...}}``. ``pairs`` names the peer entries our time is compared with.
    """

    name: str
    library: str
    model: str
    params: dict
    pairs: tuple[str, ...] = ()

    @property
    def embedding_dim(self) -> int:
        p = self.params
        if self.library == OURS:
            return int(p["model_kwargs"].get("embedding_dim", 0)) if p["model"] == "mf" else 0
        if self.library == "surprise":
            return int(p["kwargs"].get("n_factors", 100)) if p["algo"] == "SVD" else 0
        return int(p["kwargs"].get("k", 10))

    @property
    def epochs(self) -> int:
        p = self.params
        if self.library == OURS:
            return int(p["trainer"]["epochs"])
        if self.library == "surprise":
            return int(p["kwargs"].get("n_epochs", 20 if p["algo"] == "SVD" else 10))
        return int(p["kwargs"].get("max_iter", 20))

    @property
    def settings(self) -> str:
        """The settings besides epochs and embedding size, as ``key=value`` pairs."""
        p = self.params
        parts = {**p["model_kwargs"], **p["trainer"]} if self.library == OURS else dict(p["kwargs"])
        hidden = {"epochs", "embedding_dim", "n_epochs", "n_factors", "max_iter", "k"}
        return " ".join(f"{k}={v}" for k, v in parts.items() if k not in hidden)

    def override(self, epochs: int | None = None, embedding_dim: int | None = None) -> "Entry":
        params = copy.deepcopy(self.params)
        if self.library == OURS:
            if epochs is not None:
                params["trainer"]["epochs"] = int(epochs)
            if embedding_dim is not None and params["model"] == "mf":
                params["model_kwargs"]["embedding_dim"] = int(embedding_dim)
        else:
            names = {"surprise": ("n_epochs", "n_factors"), "cornac": ("max_iter", "k")}[self.library]
            if epochs is not None:
                params["kwargs"][names[0]] = int(epochs)
            if embedding_dim is not None and self.embedding_dim:
                params["kwargs"][names[1]] = int(embedding_dim)
        return Entry(self.name, self.library, self.model, params, self.pairs)


def _ours(name: str, model: str, model_kwargs: dict, trainer: dict, pairs=()) -> Entry:
    return Entry(name, OURS, model, {"model": model, "model_kwargs": model_kwargs, "trainer": trainer}, tuple(pairs))


# Our SGD loss is d/dθ of err² (a factor 2 the peers leave out), so lr 0.0025 here is their 0.005;
# with reg_exponent 0 our reg is their per-rating lambda: `mf` computes Surprise's SVD update.
_FUNK = {"embedding_dim": 100, "reg": 0.02, "reg_bias": 0.02, "reg_exponent": 0.0, "init_std": 0.1}
CATALOG: dict[str, Entry] = {e.name: e for e in (
    _ours("mf", "mf", _FUNK, {"epochs": 20, "batch_size": 1, "optimizer": "sgd", "lr": 0.0025, "patience": 0,
                              "fused": True, "shuffle": "users"}, pairs=("surprise-svd", "cornac-mf")),
    _ours("mf-pytorch", "mf", _FUNK, {"epochs": 20, "batch_size": 8192, "optimizer": "adam", "lr": 0.005,
                                      "patience": 0, "fused": False}, pairs=("surprise-svd", "cornac-mf")),
    _ours("mf-fast", "mf", {"embedding_dim": 200, "reg": 1.0, "reg_bias": 0.3, "reg_exponent": 0.5, "init_std": 0.03},
          {"epochs": 60, "batch_size": 1, "optimizer": "sgd", "lr": 0.004, "patience": 3, "fused": True,
           "shuffle": "users"},
          pairs=("surprise-svd-tuned", "cornac-mf-tuned")),
    Entry("surprise-baseline", "surprise", "BaselineOnly", {"algo": "BaselineOnly", "kwargs": {}}),
    Entry("surprise-svd", "surprise", "SVD", {"algo": "SVD", "kwargs": {
        "n_factors": 100, "n_epochs": 20, "lr_all": 0.005, "reg_all": 0.02}}),
    Entry("surprise-svd-tuned", "surprise", "SVD", {"algo": "SVD", "kwargs": {
        "n_factors": 100, "n_epochs": 80, "lr_all": 0.01, "reg_all": 0.15}}),
    Entry("cornac-mf", "cornac", "MF", {"algo": "MF", "kwargs": {
        "k": 100, "max_iter": 20, "learning_rate": 0.005, "lambda_reg": 0.02, "use_bias": True, "early_stop": False}}),
    Entry("cornac-mf-tuned", "cornac", "MF", {"algo": "MF", "kwargs": {
        "k": 200, "max_iter": 100, "learning_rate": 0.005, "lambda_reg": 0.1, "use_bias": True, "early_stop": False}}),
)}


def shipped_entries(mf: dict, baseline: dict, trainer: dict) -> dict[str, Entry]:
    """``mf-defaults`` and ``baseline``: the models as shipped (the values of configs/model/*.yaml
    and configs/trainer/default.yaml, passed in as plain dicts)."""
    runtime = {"_target_", "device", "num_threads", "progress", "resume", "seed", "logger", "callbacks",
               "checkpoint_path", "checkpoint_meta"}
    trainer = {k: v for k, v in trainer.items() if k not in runtime}
    clean = lambda d: {k: v for k, v in d.items() if k != "_target_"}  # noqa: E731
    return {
        "mf-defaults": _ours("mf-defaults", "mf", clean(mf), trainer, pairs=("surprise-svd", "cornac-mf")),
        "baseline": _ours("baseline", "baseline", clean(baseline), trainer, pairs=("surprise-baseline",)),
    }


def peer_available(library: str) -> bool:
    return library == OURS or importlib.util.find_spec(_PEER_MODULES[library]) is not None


# ---- the prepared data ----------------------------------------------------------------------------
@dataclass
class BenchData:
    """Ratings in code space plus one row of ``assign`` per part (fold): 0 train, 1 val, 2 test."""

    users: np.ndarray  # int32 codes
    items: np.ndarray
    ratings: np.ndarray  # float32
    n_users: int
    n_items: int
    rating_scale: tuple[float, float]
    assign: np.ndarray  # int8 [n_parts, n]

    def save(self, path: str) -> None:
        np.savez(path, users=self.users.astype(np.int32), items=self.items.astype(np.int32),
                 ratings=self.ratings.astype(np.float32), assign=self.assign.astype(np.int8),
                 sizes=np.array([self.n_users, self.n_items], dtype=np.int64),
                 rating_scale=np.array(self.rating_scale, dtype=np.float64))

    @classmethod
    def load(cls, path: str) -> "BenchData":
        with np.load(path) as f:
            sizes, scale = f["sizes"], f["rating_scale"]
            return cls(f["users"], f["items"], f["ratings"], int(sizes[0]), int(sizes[1]),
                       (float(scale[0]), float(scale[1])), f["assign"])

    def take(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask)
        return self.users[idx], self.items[idx], self.ratings[idx]


def experiment_overrides(data: str, protocol: str, seed: int = 42, test: float = 0.1, folds: int = 5,
                         val: float = 0.02, n_users: int | None = None, n_items: int | None = None,
                         n_ratings: int | None = None, ratings: str | None = None,
                         columns: dict | None = None) -> list[str]:
    """The ``scripts/train.py`` overrides whose data and split the benchmark runs on, so that its
    folds are exactly the ones ``split=kfold`` trains on. ``holdout``: one random split with no
    validation part; ``kfold``: the BENCHMARKS.md folds, each training part giving up ``val``."""
    if protocol == "holdout":
        split = ["split=random", "split.val=0", f"split.test={test}"]
    elif protocol == "kfold":
        split = ["split=kfold", f"split.folds={folds}", f"split.val={val}"]
    else:
        raise ConfigError(f"protocol must be holdout or kfold, got {protocol!r}")
    if data == "synthetic":  # rows shuffled once: the generator emits them by user, and SGD peers visit them in order
        source = ["data=synthetic", f"data.n_users={n_users}", f"data.n_items={n_items}", f"data.n_ratings={n_ratings}",
                  "data.rank=10", "data.with_timestamps=false", "data.shuffle=true"]
    elif data == "csv":
        source = ["data=csv", f"data.ratings={ratings}",
                  *(f"data.columns.{key}={column}" for key, column in (columns or {}).items())]
    else:
        source = [f"data={data}"]
    return [*source, *split, f"seed={seed}", "task=rating", "logger=none"]


def prepare(overrides: list[str]) -> tuple["BenchData", object]:
    """The benchmark's arrays, built the way every run is (:func:`recsys_torch.train.build`), and
    the interactions they came from."""
    from recsys_torch import splits
    from recsys_torch.cli import compose
    from recsys_torch.train import build

    quiet = logging.getLogger(splits.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the holdout's empty validation part is deliberate
    try:
        experiment = build(compose(overrides))
    finally:
        quiet.setLevel(level)
    assign = np.stack([split.assign for split in experiment.splits])
    return bench_data(experiment.interactions, assign), experiment.interactions


def bench_data(inter, assign: np.ndarray) -> BenchData:
    return BenchData(inter.users.numpy().astype(np.int32), inter.items.numpy().astype(np.int32),
                     inter.ratings.numpy().astype(np.float32), inter.n_users, inter.n_items,
                     tuple(inter.rating_scale), assign)


# ---- fitting each library ------------------------------------------------------------------------
def _trainer_kwargs(trainer: dict) -> dict:
    from recsys_torch.trainer import Trainer

    accepted = inspect.signature(Trainer).parameters
    unknown = sorted(set(trainer) - set(accepted))
    if unknown:
        raise ConfigError(f"Trainer takes no argument(s) {unknown} (this version of recsys_torch)")
    if trainer.get("fused") is True:
        from recsys_torch.fused import load_extension

        if load_extension() is None:  # built here, before the clock starts
            raise ConfigError("the fused MF kernel could not be built here (see the log); use mf-pytorch")
    return dict(trainer)


def _fit_ours(params: dict, data: BenchData, part: int, threads: int, seed: int, device: str) -> Fitted:
    import torch

    from recsys_torch.data.interactions import Interactions
    from recsys_torch.metrics import predict
    from recsys_torch.models import BaselineModel, MFModel
    from recsys_torch.trainer import Trainer

    def inter(arrays):
        u, i, r = arrays
        return Interactions(torch.from_numpy(u.astype(np.int64)), torch.from_numpy(i.astype(np.int64)),
                            torch.from_numpy(r), data.n_users, data.n_items, rating_scale=data.rating_scale)

    train = inter(data.take(data.assign[part] == 0))
    val = inter(data.take(data.assign[part] == 1))
    torch.set_num_threads(threads)
    # A process's first optimizer imports torch._dynamo (seconds): a one-off cost, not fitting.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.manual_seed(seed)
    model_class = {"mf": MFModel, "baseline": BaselineModel}[params["model"]]
    model = model_class(data.n_users, data.n_items, **params["model_kwargs"])
    trainer = Trainer(**_trainer_kwargs(params["trainer"]), num_threads=threads, seed=seed, device=device,
                      progress=False)
    t0 = time.perf_counter()
    result = trainer.fit(model, train, val if len(val) else None)
    seconds = time.perf_counter() - t0

    def predict_fn(users, items):
        return predict(model, torch.from_numpy(users.astype(np.int64)), torch.from_numpy(items.astype(np.int64)),
                       data.rating_scale).double().numpy()

    return Fitted(predict_fn, seconds, len(result.history), len(train), model)


FITTERS = {OURS: _fit_ours, "surprise": peers.fit_surprise, "cornac": peers.fit_cornac}


# ---- one row ----------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    On Linux it is ``VmHWM``, the high-water mark of this process image: ``getrusage`` would also
    count the parent's size at fork (the kernel carries it across ``exec``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


@dataclass
class Spec:
    """What one row process runs."""

    entry: Entry
    data_path: str
    dataset: str
    threads: int = 1
    seed: int = 42
    device: str = "cpu"

    def to_json(self) -> str:
        e = self.entry
        return json.dumps({"entry": [e.name, e.library, e.model, e.params, list(e.pairs)],
                           "data_path": self.data_path, "dataset": self.dataset, "threads": self.threads,
                           "seed": self.seed, "device": self.device})

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        name, library, model, params, pairs = d.pop("entry")
        return cls(Entry(name, library, model, params, tuple(pairs)), **d)


def _head(spec: Spec) -> dict:
    e = spec.entry
    return {"dataset": spec.dataset, "library": e.library, "model": e.model, "embedding_dim": e.embedding_dim,
            "epochs": e.epochs, "threads": spec.threads}


def run_row(spec: Spec) -> dict:
    """Fit and score one entry on every part of the data; the row (means over parts)."""
    data = BenchData.load(spec.data_path)
    fit = FITTERS[spec.entry.library]
    folds = []
    for k in range(data.assign.shape[0]):
        fitted = fit(spec.entry.params, data, k, spec.threads, spec.seed + k, spec.device)
        u, i, r = data.take(data.assign[k] == 2)
        err = fitted.predict(u, i) - r.astype(np.float64)
        folds.append({"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
                      "fit_seconds": fitted.fit_seconds, "epochs_run": fitted.epochs_run,
                      "n_train": fitted.n_train, "n_test": len(r)})
        del fitted
    return {**_head(spec), **_aggregate(folds), "peak_rss_mb": peak_rss_mb(), "name": spec.entry.name,
            "settings": spec.entry.settings}


def _aggregate(folds: list[dict]) -> dict:
    col = lambda key: np.array([f[key] for f in folds], dtype=np.float64)  # noqa: E731
    seconds, epochs, n_train = col("fit_seconds"), col("epochs_run"), col("n_train")
    out = {"rmse": float(col("rmse").mean()), "fit_seconds": float(seconds.mean()),
           "ratings_per_second": float((n_train * epochs).sum() / max(seconds.sum(), 1e-12)),
           "mae": float(col("mae").mean()), "epochs_run": float(epochs.mean()),
           "seconds_per_epoch": float(seconds.sum() / max(epochs.sum(), 1)),
           "fit_seconds_total": float(seconds.sum()), "n_train": float(n_train.mean()),
           "n_test": float(col("n_test").mean())}
    if len(folds) > 1:  # the fold statistics of every run (imported here: a peer's process never loads torch)
        from recsys_torch.metrics import aggregate_folds

        stats = aggregate_folds([{"test/rmse": f["rmse"], "test/mae": f["mae"]} for f in folds])
        out.update(n_folds=len(folds), rmse_std=stats["test/rmse_std"], mae_std=stats["test/mae_std"])
    return out


def run_isolated(spec, module: str = __name__, failed=None) -> dict:
    """``module``'s row function run on ``spec`` in a fresh Python process (``python -m module --worker
    SPEC``) with ``spec.threads`` threads everywhere; a failure becomes ``failed(spec, notes)`` (default
    :func:`failed_row`), a row with empty figures and the reason in ``notes``. The ranking suite
    (:mod:`recsys_torch.tools.ranking_bench`) runs its rows through here too."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    threads = str(spec.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", module, "--worker", spec.to_json()],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_ROW_PREFIX)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(_ROW_PREFIX):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = tail[-1].strip() if tail else f"exit status {proc.returncode}"
    return (failed or failed_row)(spec, f"failed (exit {proc.returncode}): {why}")


def failed_row(spec: Spec, notes: str) -> dict:
    return {**_head(spec), "rmse": None, "fit_seconds": None, "ratings_per_second": None, "peak_rss_mb": None,
            "name": spec.entry.name, "settings": spec.entry.settings, "notes": notes}


def worker_main(argv: list[str], module: str = __name__, run=None, parse=None) -> int:
    """The worker side of :func:`run_isolated`: ``run(parse(SPEC))`` printed as one marked JSON line."""
    if len(argv) != 2 or argv[0] != "--worker":
        print(f"usage: python -m {module} --worker SPEC_JSON", file=sys.stderr)
        return 2
    try:
        row = (run or run_row)((parse or Spec.from_json)(argv[1]))
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_ROW_PREFIX + json.dumps(row), flush=True)
    return 0


# ---- comparisons and the report ---------------------------------------------------------------------
def _paired(ours: dict, rows: list[dict], library: str, pairs: tuple[str, ...]) -> dict | None:
    """The peer row our time is set against: a named pair first, then the same thread count, then
    the most accurate; bias-only models only against bias-only models."""
    candidates = [r for r in rows if r["library"] == library and r["dataset"] == ours["dataset"]
                  and r["fit_seconds"] and (r["embedding_dim"] > 0) == (ours["embedding_dim"] > 0)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.get("name") not in pairs, r["threads"] != ours["threads"],
                                          r["rmse"] if r["rmse"] is not None else math.inf))


def compare(rows: list[dict], target: float | None = None,
            pairs: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Adds ``time_to_target_seconds`` (total fit time when the mean RMSE reaches ``target``, else
    None) to every row, and to ours ``time_vs_<peer>`` (our fit time over the paired peer row's,
    named in ``paired_<peer>``) and ``time_to_target_vs_<peer>`` (over the peer's quickest row that
    reaches the target)."""
    pairs = pairs or {}
    peers = [p for p in PEERS if any(r["library"] == p for r in rows)]
    for row in rows:
        if target is not None:
            reached = row["rmse"] is not None and row["rmse"] <= target
            row["time_to_target_seconds"] = row.get("fit_seconds_total", row["fit_seconds"]) if reached else None
    for row in (r for r in rows if r["library"] == OURS and r["fit_seconds"]):
        for peer in peers:
            other = _paired(row, rows, peer, pairs.get(row.get("name"), ()))
            if other is not None:
                row[f"time_vs_{peer}"] = row["fit_seconds"] / other["fit_seconds"]
                row[f"paired_{peer}"] = other.get("name")
            quickest = [r["time_to_target_seconds"] for r in rows if r["library"] == peer
                        and r["dataset"] == row["dataset"] and r.get("time_to_target_seconds")]
            if row.get("time_to_target_seconds") and quickest:
                row[f"time_to_target_vs_{peer}"] = row["time_to_target_seconds"] / min(quickest)
    return rows


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _table_columns(rows: list[dict], target: float | None) -> list[tuple[str, Callable[[dict], str]]]:
    def epochs(r):  # early stopping: the epochs actually run too
        ran = r.get("epochs_run")
        return str(r["epochs"]) + (f" ({ran:.3g} run)" if ran not in (None, r["epochs"]) else "")

    def rmse(r):
        if r["rmse"] is None:
            return r.get("notes", "failed")
        return _num(r["rmse"], ".4f") + (f" ± {r['rmse_std']:.4f}" if r.get("rmse_std") is not None else "")

    columns = [
        ("dataset", lambda r: r["dataset"]), ("library", lambda r: r["library"]),
        ("model", lambda r: r.get("name", r["model"])), ("dim", lambda r: str(r["embedding_dim"])),
        ("epochs", epochs),
        ("threads", lambda r: str(r["threads"])), ("RMSE", rmse), ("MAE", lambda r: _num(r.get("mae"), ".4f")),
        ("fit s" + (" / fold" if any(r.get("n_folds") for r in rows) else ""), lambda r: _num(r["fit_seconds"], ".3f")),
        ("s / epoch", lambda r: _num(r.get("seconds_per_epoch"), ".3f")),
        ("M ratings/s", lambda r: _num(r["ratings_per_second"] and r["ratings_per_second"] / 1e6, ".2f")),
        ("peak RSS MB", lambda r: _num(r["peak_rss_mb"], ".0f")),
    ]
    if target is not None:
        columns.append((f"time to RMSE ≤ {target} s", lambda r: _num(r.get("time_to_target_seconds"), ".2f")
                        if r.get("time_to_target_seconds") else ("not reached" if r["rmse"] is not None else "")))
    for peer in PEERS:
        if any(f"time_vs_{peer}" in r for r in rows):
            columns.append((f"time vs {peer}", lambda r, p=peer: f"{r[f'time_vs_{p}']:.2f} ({r[f'paired_{p}']})"
                            if f"time_vs_{p}" in r else ""))
    return columns


def markdown_table(rows: list[dict], target: float | None = None) -> str:
    columns = _table_columns(rows, target)
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def target_summary(rows: list[dict], target: float) -> list[str]:
    """One line per our row that reaches the target, against each peer's quickest that does."""
    out = []
    for row in (r for r in rows if r["library"] == OURS and r.get("time_to_target_seconds")):
        parts = []
        for peer in PEERS:
            reached = [r for r in rows if r["library"] == peer and r["dataset"] == row["dataset"]
                       and r.get("time_to_target_seconds")]
            if reached:
                best = min(reached, key=lambda r: r["time_to_target_seconds"])
                parts.append(f"{best['name']} {best['time_to_target_seconds']:.2f} s "
                             f"(ours / theirs {row['time_to_target_seconds'] / best['time_to_target_seconds']:.2f})")
            elif any(r["library"] == peer and r["rmse"] is not None for r in rows):
                parts.append(f"{peer}: no row reaches it")
        out.append(f"- {row['dataset']}: {row['name']} reaches mean RMSE ≤ {target} in "
                   f"{row['time_to_target_seconds']:.2f} s of fitting" + ("; " + "; ".join(parts) if parts else ""))
    return out


def markdown_report(rows: list[dict], title: str, description: list[str], target: float | None = None) -> str:
    lines = [f"# {title}", ""]
    for paragraph in description:
        lines += [paragraph, ""]
    lines += [markdown_table(rows, target), ""]
    if target is not None:
        summary = target_summary(rows, target)
        lines += [f"Time to target (RMSE ≤ {target}, total fit time over all folds):", "",
                  *(summary or ["- none of our rows reaches it"]), ""]
    lines += ["Settings:", ""]
    seen = set()
    for r in rows:
        if r.get("name") not in seen:
            seen.add(r.get("name"))
            lines.append(f"- `{r.get('name')}` ({r['library']} {r['model']}): {r.get('settings') or 'defaults'}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, rows: list[dict], report: str, stem: str = "benchmark") -> None:
    """``<stem>.json`` (the rows) and ``<stem>.md``, each written whole or not at all (a full disk is
    one error line)."""
    from recsys_torch.io import atomic_write

    for name, text in ((f"{stem}.json", json.dumps(rows, indent=2) + "\n"), (f"{stem}.md", report)):
        atomic_write(os.path.join(out_dir, name), lambda fh, text=text: fh.write(text.encode("utf-8")))


def progress_line(index: int, total: int, row: dict) -> str:
    name = row.get("name", row["model"])
    head = f"[{index}/{total}] {row['dataset']} {row['library']} {name} threads={row['threads']}"
    if row["rmse"] is None:
        return f"{head}: {row.get('notes', 'failed')}"
    return (f"{head}: rmse {row['rmse']:.4f}, fit {row['fit_seconds']:.2f} s, "
            f"{row['ratings_per_second'] / 1e6:.2f} M ratings/s, peak RSS {row['peak_rss_mb']:.0f} MB")


def iter_specs(entries: list[Entry], threads: list[int], **common) -> Iterator[Spec]:
    """Each entry at each thread count; Surprise is single-threaded, so it runs once at 1 thread."""
    for entry in entries:
        counts = [1] if entry.library == "surprise" else threads
        for t in dict.fromkeys(counts):
            yield Spec(entry, threads=t, **common)


def run(entries: list[Entry], threads: list[int], data: BenchData, dataset: str, work_dir: str,
        seed: int = 42, device: str = "cpu", isolate: bool = True, log=None) -> list[dict]:
    """Every entry at every thread count on ``data`` (written once into ``work_dir``); one process
    per row when ``isolate``. ``log`` gets one progress line per row."""
    path = os.path.join(work_dir, "data.npz")
    data.save(path)
    specs = list(iter_specs(entries, threads, data_path=path, dataset=dataset, seed=seed, device=device))
    rows = []
    for n, spec in enumerate(specs, 1):
        row = run_isolated(spec) if isolate else run_row(spec)
        rows.append(row)
        if log is not None:
            print(progress_line(n, len(specs), row), file=log, flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
