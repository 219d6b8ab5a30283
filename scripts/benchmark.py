#!/usr/bin/env python
"""Benchmark our models against Surprise and cornac on the very same split, one process per row.

    python scripts/benchmark.py --suite throughput --out DIR   # synthetic 5M: ratings/s, 2 and 1 threads
    python scripts/benchmark.py --suite ml100k --out DIR       # ML-100k 5-fold: RMSE and time to target
    python scripts/benchmark.py --suite scale --out DIR        # synthetic 20M (ML-20M shape): s/epoch, peak RSS
    python scripts/benchmark.py --suite ranking --out DIR      # top-N: ML-100k protocol + synthetic ML-20M shape
    python scripts/benchmark.py --suite ranking --tune --out DIR   # the ranking entries' grids on ML-100k validation
    python scripts/benchmark.py --data csv --ratings r.csv --models mf cornac-mf --out DIR
    python scripts/benchmark.py --list-models

Writes DIR/benchmark.json (one object per row) and DIR/benchmark.md (the table), prints the table,
and a progress line per row on stderr (--tune: DIR/tuning.json, DIR/tuning.md). Peers run when
installed (pip install -e '.[bench]').
See docs/benchmarks.md.
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from omegaconf import OmegaConf  # noqa: E402

from recsys_torch import cli  # noqa: E402
from recsys_torch.errors import ConfigError  # noqa: E402
from recsys_torch.tools import benchmark as bench  # noqa: E402
from recsys_torch.tools import ranking_bench as rank  # noqa: E402

CONFIG_DIR = cli.CONFIG_DIR

SUITES = {
    "throughput": dict(data="synthetic", n_users=50_000, n_items=20_000, n_ratings=5_000_000, protocol="holdout",
                       models=["mf", "mf-pytorch", "surprise-svd", "cornac-mf"], threads=[2, 1], epochs=20,
                       embedding_dim=100),
    "ml100k": dict(data="ml100k", protocol="kfold", threads=[1], target=0.905,
                   models=["baseline", "mf-defaults", "mf-fast", "surprise-baseline", "surprise-svd",
                           "surprise-svd-tuned", "cornac-mf-tuned"]),
    # MovieLens-20M's counts: 138,493 users, 26,744 rated movies, 20,000,263 ratings
    "scale": dict(data="synthetic", n_users=138_493, n_items=26_744, n_ratings=20_000_263, protocol="holdout",
                  models=["mf"], threads=[2], epochs=3, embedding_dim=64),
}
# what a run without --suite starts from
DEFAULTS = dict(data=None, n_users=50_000, n_items=20_000, n_ratings=1_000_000, protocol="holdout", threads=[1],
                models=["mf", "surprise-svd", "cornac-mf"], epochs=None, embedding_dim=None, target=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted([*SUITES, "ranking"]),
                   help="a prepared comparison (flags below override its settings)")
    p.add_argument("--out", help="output folder for benchmark.json and benchmark.md")
    p.add_argument("--data", choices=["synthetic", "ml100k", "csv"])
    p.add_argument("--ratings", help="ratings file for --data csv (csv, tsv or parquet)")
    p.add_argument("--columns", metavar="KEY=COL,...",
                   help="--data csv column names, e.g. user=userId,item=movieId,rating=rating")
    p.add_argument("--n-ratings", type=int)
    p.add_argument("--n-users", type=int)
    p.add_argument("--n-items", type=int)
    p.add_argument("--protocol", choices=["holdout", "kfold"],
                   help="holdout: one random split; kfold: the BENCHMARKS.md folds")
    p.add_argument("--test", type=float, default=0.1, help="holdout test fraction (default 0.1)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val", type=float, default=0.02, help="kfold: share of each training part our models validate on")
    p.add_argument("--models", nargs="+", help="entries to run (see --list-models)")
    p.add_argument("--epochs", type=int, help="epochs for every model")
    p.add_argument("--embedding-dim", type=int, help="embedding size for every factor model")
    p.add_argument("--threads", type=int, nargs="+", help="thread counts (each model runs at each)")
    p.add_argument("--target", type=float, help="RMSE whose time to reach is reported")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="run the Surprise and cornac entries when they are installed (default: yes)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", help="device for our models (cpu, cuda)")
    p.add_argument("--in-process", action="store_true",
                   help="run the rows in this process, for debugging (peak RSS is then the whole run's)")
    p.add_argument("--list-models", action="store_true", help="print the entries and their settings, then exit")
    g = p.add_argument_group("--suite ranking")
    g.add_argument("--tune", action="store_true", help="run each entry's grid on the validation split instead")
    g.add_argument("--datasets", nargs="+", choices=["ml100k", "synthetic"],
                   help="default: ml100k synthetic (--tune: ml100k); --n-users/--n-items/--n-ratings size synthetic")
    g.add_argument("--eval-users", type=int, default=10_000,
                   help="synthetic: evaluate (and validate) on a fixed seeded sample of this many users (default 10000)")
    g.add_argument("--repeats", type=int, help="fits per row, median time reported (default: 3 on ml100k, 1 on synthetic)")
    g.add_argument("--speed-threads", type=int, nargs="*",
                   help="synthetic: thread counts of the speed rows (default 2 1; none: no speed rows)")
    g.add_argument("--speed-epochs", type=int, default=4, help="epochs (iterations) a speed row times (default 4)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """The suite's settings (or the defaults) with the flags given on top."""
    if args.suite is None and args.data is None and not args.list_models:
        raise ConfigError("say what to benchmark: --suite throughput|ml100k|scale, or --data synthetic|ml100k|csv")
    out = {**DEFAULTS, **SUITES.get(args.suite, {})}
    for key in ("data", "n_ratings", "n_users", "n_items", "protocol", "models", "epochs", "embedding_dim",
                "threads", "target"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.protocol is None and args.suite is None and out["data"] == "ml100k":
        out["protocol"] = "kfold"
    if out["data"] == "csv" and not args.ratings:
        raise ConfigError("--data csv needs --ratings PATH")
    if any(t < 1 for t in out["threads"]):
        raise ConfigError(f"--threads must be at least 1, got {out['threads']}")
    for key in ("epochs", "embedding_dim", "n_ratings", "n_users", "n_items"):
        if out.get(key) is not None and out[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {out[key]}")
    return out


def catalog() -> dict:
    """The library's entries plus the models exactly as shipped in configs/."""
    def load(group, name):
        return OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, group, f"{name}.yaml")), resolve=True)

    return {**bench.CATALOG, **bench.shipped_entries(load("model", "mf"), load("model", "baseline"),
                                                     load("trainer", "default"))}


def choose_entries(cfg: dict, peers: bool) -> tuple[list, list[str]]:
    """The entries to run, with --epochs / --embedding-dim applied, and notes on those left out."""
    known = catalog()
    unknown = [m for m in cfg["models"] if m not in known]
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; choose from {sorted(known)}")
    entries, notes = [], []
    for name in dict.fromkeys(cfg["models"]):
        entry = known[name]
        if entry.library != bench.OURS and not peers:
            continue
        if not bench.peer_available(entry.library):
            notes.append(f"{name} not run: {entry.library} is not installed (pip install -e '.[bench]')")
            continue
        entries.append(entry.override(cfg["epochs"], cfg["embedding_dim"]))
    if not entries:
        raise ConfigError("no model left to run")
    return entries, notes


def _size(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def load_data(cfg: dict, args: argparse.Namespace):
    """(BenchData, Interactions, dataset label), built like every run (recsys_torch.train.build)."""
    columns = {}
    for pair in filter(None, (args.columns or "").split(",")):
        key, sep, column = pair.partition("=")
        if not sep:
            raise ConfigError(f"--columns: expected KEY=COLUMN, got {pair!r}")
        columns[key.strip()] = column.strip()
    overrides = bench.experiment_overrides(
        cfg["data"], cfg["protocol"], args.seed, test=args.test, folds=args.folds, val=args.val,
        n_users=cfg["n_users"], n_items=cfg["n_items"], n_ratings=cfg["n_ratings"], ratings=args.ratings,
        columns=columns)
    data, inter = bench.prepare(overrides)
    label = {"synthetic": f"synthetic-{_size(cfg['n_ratings'])}", "ml100k": "ml100k"}.get(
        cfg["data"], os.path.basename(str(args.ratings)))
    return data, inter, label


def describe(cfg: dict, args: argparse.Namespace, inter, data: bench.BenchData, notes: list[str]) -> list[str]:
    n_test = int((data.assign[0] == 2).sum())
    if cfg["protocol"] == "kfold":
        protocol = (f"{data.assign.shape[0]}-fold cross-validation (recsys_torch.splits.kfold, seed {args.seed}); "
                    "peers fit everything but the test fold, our models hold out "
                    f"{args.val:.0%} of it for early stopping")
    else:
        protocol = f"one random split, {n_test:,} test ratings ({args.test:.0%}), identical for every library"
    versions = []
    for package in ("torch", "numpy", "scikit-surprise", "cornac"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    rss = "that process's high-water mark" if not args.in_process else "the whole run's (--in-process)"
    return [
        f"Data: {len(inter):,} ratings, {inter.n_users:,} users, {inter.n_items:,} items; {protocol}.",
        "RMSE/MAE over the test ratings, predictions clipped to the rating scale (mean ± std over folds). "
        "Fit time is the fit call only, each row in its own process; ratings/s = training ratings x epochs run / "
        f"fit time; peak RSS is {rss}. `time vs X`: our fit time / X's (the paired row in brackets).",
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{', '.join(versions)}; {datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"Command: `{shlex.join(['python', 'scripts/benchmark.py', *args.argv])}`",
        *notes,
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.suite == "ranking":
        return ranking_main(args)
    cfg = settings(args)
    if args.list_models:
        for name, entry in catalog().items():
            print(f"{name:20} {entry.library:13} {entry.model:13} dim={entry.embedding_dim} epochs={entry.epochs} "
                  f"{entry.settings}")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    entries, notes = choose_entries(cfg, args.peers)
    print(f"preparing {cfg['data']} data ...", file=sys.stderr, flush=True)
    data, inter, label = load_data(cfg, args)
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as work:
        rows = bench.run(entries, cfg["threads"], data, label, work, seed=args.seed, device=args.device,
                         isolate=not args.in_process, log=sys.stderr)
    rows = bench.compare(rows, cfg["target"], {e.name: e.pairs for e in entries})
    title = f"Benchmark: {args.suite or label}"
    report = bench.markdown_report(rows, title, describe(cfg, args, inter, data, notes), cfg["target"])
    bench.write_outputs(args.out, rows, report)
    print(report)
    return 0


# ---- --suite ranking -------------------------------------------------------------------------------------
def ranking_entries(args) -> tuple[list, list[str]]:
    names = args.models or list(rank.DEFAULT_MODELS)
    unknown = [m for m in names if m not in rank.CATALOG]
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; choose from {sorted(rank.CATALOG)}")
    entries = []
    for name in dict.fromkeys(names):
        entry = rank.CATALOG[name]
        if entry.library != rank.OURS and not args.peers:
            continue
        if args.tune and not entry.grid and entry.library != rank.OURS:
            continue
        entries.append(entry.override(args.epochs, args.embedding_dim))
    if not entries:
        raise ConfigError("no model left to run")
    return entries, []


def ranking_datasets(args) -> list:
    out = []
    for name in args.datasets or (["ml100k"] if args.tune else ["ml100k", "synthetic"]):
        if name == "ml100k":
            out.append(rank.ml100k_spec(threads=args.threads or (1,)))
        else:
            out.append(rank.synthetic_spec(args.n_users or 138_493, args.n_items or 26_744, args.n_ratings or 10_000_000,
                                           args.seed, eval_users=args.eval_users, threads=args.threads or (1,),
                                           dim=args.embedding_dim or 64))
    return out


def _versions() -> str:
    found = []
    for package in ("torch", "numpy", "scipy", "implicit", "cornac", "lightfm"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _tree() -> str:
    """The commit the run measured, and whether the working tree had changes on top of it."""
    import subprocess

    def git(*cmd):
        proc = subprocess.run(["git", "-C", REPO, *cmd], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def ranking_description(args, described: list[str]) -> list[str]:
    rss = "that row process's high-water mark" if not args.in_process else "the whole run's (--in-process)"
    text = [
        *described,
        "Evaluation (every row): `recsys_torch.metrics.ranking_metrics` on the test part: every item seen in "
        "train + validation is ranked for each test user with the user's train and validation items masked; "
        "binary-gain NDCG@10 and Recall@10. Our rows early-stop on the validation part, then refit on train + "
        "validation (their `epochs` read early-stopped + refit); the peers fit train + validation with the settings "
        "their grids chose on the ML-100k validation split (`--tune`), at 64 factors on the synthetic set; "
        "`most-popular` ranks by train + validation counts, the same list for every user.",
        "Fit time: `Trainer.fit` (validation and refit included) or the peer's `fit`, median of the row's repeats; "
        "s / epoch: our trainer's training time per epoch of the final fit (no validation), the peer's median "
        f"iteration (implicit reports each; otherwise fit / iterations). Peak RSS is {rss}: `fit peak` is taken "
        "after fitting (a peer's process has not loaded torch by then), `peak` after the evaluation.",
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, {_versions()}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; tree {_tree()}.",
        f"Command: `{shlex.join(['python', 'scripts/benchmark.py', *args.argv])}`",
    ]
    return text


def ranking_main(args) -> int:
    if args.list_models:
        for name, entry in rank.CATALOG.items():
            print(f"{name:20} {entry.library:9} {entry.model:32} {entry.settings}")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    entries, _ = ranking_entries(args)
    rows, described = [], []
    with tempfile.TemporaryDirectory(prefix="recsys-rank-") as work:
        for spec in ranking_datasets(args):
            print(f"preparing {spec.label} ...", file=sys.stderr, flush=True)
            data = rank.prepare(spec, args.seed)
            path = os.path.join(work, f"{spec.label}.npz")
            data.save(path)
            described.append(f"Data `{spec.label}` (`{' '.join(spec.overrides)}`): {data.describe()}.")
            if args.tune:
                specs = [rank.Spec(e.override(embedding_dim=spec.dim) if spec.dim else e, path, spec.label,
                                   list(spec.ours), spec.large, t, args.seed, args.device, kind="tune")
                         for e in entries for t in dict.fromkeys(spec.threads)]
            else:
                repeats = args.repeats or (1 if spec.large else 3)
                speed = (args.speed_threads if args.speed_threads is not None else [2, 1]) if spec.large else []
                specs = rank.suite_specs(entries, spec, path, args.seed, args.device, repeats, speed,
                                         args.speed_epochs)
            rows += rank.run_specs(specs, data, isolate=not args.in_process, log=sys.stderr)
            del data
    title = "Benchmark: ranking" + (" (tuning)" if args.tune else "")
    report = rank.markdown_report(rows, title, ranking_description(args, described))
    rank.write_outputs(args.out, rows, report, stem="tuning" if args.tune else "benchmark")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
