#!/usr/bin/env python
"""Summarize a sweep or a single run.

A sweep folder: report.md (trials ranked by the objective, with the searched parameters and metrics),
curves.png and params.png, and the best trial as a command line. A run folder: report.md with the
headline metrics, learning.png (loss and validation per epoch, early stopping marked) and errors.png
(rating runs: test RMSE by user activity and item popularity) or popularity.png (ranking runs: what
gets recommended against the catalog, coverage).

    python scripts/report.py multirun/2025-01-01/12-00-00
    python scripts/report.py multirun/... --save-experiment mf_tuned   # configs/experiment/mf_tuned.yaml
    python scripts/report.py outputs/2025-01-01/12-00-00               # one run
"""

import argparse
import os
import re
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from recsys_torch import cli  # noqa: E402
from recsys_torch.tools import report  # noqa: E402

CONFIG_DIR = cli.CONFIG_DIR


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a run folder (hydra.run.dir) or a sweep folder (hydra.sweep.dir)")
    parser.add_argument("--out", help="where report.md and the PNGs go (default: DIR)")
    parser.add_argument("--objective", help="metric to rank by (default: the runs' optimized_metric)")
    parser.add_argument("--top", type=int, default=5, help="how many of the best trials get learning curves")
    parser.add_argument("--save-experiment", metavar="NAME",
                        help="write the best trial as configs/experiment/NAME.yaml (python scripts/train.py experiment=NAME)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing experiment config")
    return parser.parse_args(argv)


def experiment_path(name: str, force: bool) -> str:
    """Checked before anything is written, so a refused name leaves no half-made report."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise report.ReportError(f"--save-experiment {name!r}: use letters, digits, '_' and '-' only")
    path = os.path.join(CONFIG_DIR, "experiment", f"{name}.yaml")
    if os.path.exists(path) and not force:
        raise report.ReportError(f"{path} exists: pass --force to overwrite it")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    saved = experiment_path(args.save_experiment, args.force) if args.save_experiment else None
    with open(os.path.join(CONFIG_DIR, "train.yaml")) as fh:
        defaults = report.default_choices(yaml.safe_load(fh).get("defaults"))
    if report.is_run_folder(args.dir):
        return run_main(args, saved, defaults)
    sweep = report.load(args.dir, args.objective)
    best = sweep.best
    run_command = report.command(best, defaults)
    written = report.write_report(sweep, args.out or args.dir, run_command, args.top)
    if saved:
        save(saved, report.experiment_yaml(sweep, best, defaults))
    print(report.table(sweep, limit=args.top))
    print(f"\nbudget: {report.budget_line(sweep)}")
    print("wrote " + ", ".join(written.values()))
    if saved:
        print(f"saved {saved}: python scripts/train.py experiment={args.save_experiment}")
    print(f"\nbest: trial {best.name}, {sweep.objective} = {best.value(sweep.objective):.4f} ({sweep.direction})")
    print(run_command)
    return 0


def run_main(args, saved, defaults) -> int:
    """One run: its report (metrics, learning curves, where the errors are or what is recommended)."""
    run = report.load_run(args.dir)
    command = report.command(run.trial, defaults) if run.trial.overrides or run.trial.hydra else None
    written = report.write_run_report(run, args.out or args.dir, command)
    if saved:
        sweep = report.load(args.dir, args.objective)
        save(saved, report.experiment_yaml(sweep, sweep.best, defaults))
    print("\n".join(f"{metric:<20} test {test:<18} val {val}" for metric, test, val in report.headline_metrics(run)))
    for note in run.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(written.values()))
    if saved:
        print(f"saved {saved}: python scripts/train.py experiment={args.save_experiment}")
    if command:
        print(command)
    return 0


def save(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    sys.exit(cli.run(main))
