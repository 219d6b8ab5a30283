#!/usr/bin/env python
"""Summarize a run or a sweep folder: report.md (trials ranked by the objective, with the searched
parameters and metrics), curves.png and params.png, and the best trial as a command line.

    python scripts/report.py multirun/2025-01-01/12-00-00
    python scripts/report.py multirun/... --save-experiment mf_tuned   # configs/experiment/mf_tuned.yaml
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
    sweep = report.load(args.dir, args.objective)
    with open(os.path.join(CONFIG_DIR, "train.yaml")) as fh:
        defaults = report.default_choices(yaml.safe_load(fh).get("defaults"))
    best = sweep.best
    run_command = report.command(best, defaults)
    written = report.write_report(sweep, args.out or args.dir, run_command, args.top)
    if saved:
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        with open(saved, "w") as fh:
            fh.write(report.experiment_yaml(sweep, best, defaults))
    print(report.table(sweep, limit=args.top))
    print(f"\nbudget: {report.budget_line(sweep)}")
    print("wrote " + ", ".join(written.values()))
    if saved:
        print(f"saved {saved}: python scripts/train.py experiment={args.save_experiment}")
    print(f"\nbest: trial {best.name}, {sweep.objective} = {best.value(sweep.objective):.4f} ({sweep.direction})")
    print(run_command)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
