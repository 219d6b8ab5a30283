"""Regenerate the cold-start table: RMSE on users and items never seen in training, and on a warm split.

    python scripts/cold_start_table.py [--seeds 42,43,44,45,46] [--out FILE] [override ...]

Each cell runs ``model=<model>`` as shipped on the scenario's split once per seed, in this process
(``recsys_torch.train.train`` on a ``hydra.compose``d config), and shows the mean and standard deviation
over the seeds; the seed also draws the split, so every model of a column sees the same splits.
Scenarios: ``cold_item`` and ``cold_user`` (``test/cold/rmse``: the test part holds only new items or
users) and ``warm``, a random split (``test/warm/rmse``, its ratings of ids seen in training).
Extra ``override`` arguments apply to every run (e.g. ``data=synthetic`` for a smoke run).
The markdown goes to stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from recsys_torch import cli
from recsys_torch.train import train

MODELS = ("popularity", "baseline", "mf", "content", "hybrid")
SCENARIOS = (  # (experiment prefix, metric, column title)
    ("cold_item", "test/cold/rmse", "new items (`split=cold_item`)"),
    ("cold_user", "test/cold/rmse", "new users (`split=cold_user`)"),
    ("cold_warm", "test/warm/rmse", "warm (`split=random`)"),
)
QUIET = ["logger=none", "trainer.progress=false", "trainer.num_threads=1"]
SPLITS = {"cold_item": "split=cold_item", "cold_user": "split=cold_user", "cold_warm": "split=random"}

def run_cell(prefix: str, model: str, metric: str, seed: int, overrides: list[str]) -> float:
    cfg = cli.compose([f"model={model}", SPLITS[prefix], f"seed={seed}", *QUIET, *overrides])
    with tempfile.TemporaryDirectory(prefix="cold_start_table-") as out:
        metrics = train(cfg, out)
    # a random split may hold no rating of an unseen id, and then no warm/cold segment
    return float(metrics.get(metric, metrics["test/rmse"]))


def collect(seeds: list[int], overrides: list[str]) -> dict[tuple[str, str], list[float]]:
    results = {}
    for prefix, metric, _ in SCENARIOS:
        for model in MODELS:
            t0 = time.perf_counter()
            values = [run_cell(prefix, model, metric, seed, overrides) for seed in seeds]
            results[prefix, model] = values
            print(f"{prefix}_{model}: {' '.join(f'{v:.4f}' for v in values)} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return results


def _cell(values: list[float], best: float) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"
    return f"**{text}**" if math.isclose(mean, best) else text


def _wins(values: list[float], rivals: list[float]) -> int:
    return sum(v < r for v, r in zip(values, rivals))


def markdown(results: dict[tuple[str, str], list[float]], seeds: list[int], overrides: list[str]) -> str:
    header = "| model | " + " | ".join(title for _, _, title in SCENARIOS) + " |"
    lines = [header, "|---|" + "---|" * len(SCENARIOS)]
    best = {p: min(statistics.fmean(results[p, m]) for m in MODELS) for p, _, _ in SCENARIOS}
    for model in MODELS:
        cells = [_cell(results[p, model], best[p]) for p, _, _ in SCENARIOS]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    lines += ["", "| seeds won (lower RMSE on the same split) | " + " | ".join(t for _, _, t in SCENARIOS) + " |",
              "|---|" + "---|" * len(SCENARIOS)]
    for model in ("content", "hybrid"):
        rivals = [m for m in MODELS if m != model]
        cells = [", ".join(f"`{r}` {_wins(results[p, model], results[p, r])}/{len(seeds)}" for r in rivals)
                 for p, _, _ in SCENARIOS]
        lines.append(f"| `{model}` against | " + " | ".join(cells) + " |")
    extra = f" {' '.join(overrides)}" if overrides else ""
    lines += [
        "",
        f"RMSE, mean ± std over seeds {', '.join(map(str, seeds))} (each seed draws the split and the "
        "initialization; bold: best mean). Every model as shipped (`configs/model/`), no per-split settings.",
        f"Regenerate: `python scripts/cold_start_table.py --seeds {','.join(map(str, seeds))}{extra}`.",
    ]
    return "\n".join(lines) + "\n"


class _Once(logging.Filter):
    """Each distinct message once: the table runs every model on every split for every seed, and the
    same warning (a model that cannot score new items, say) would repeat for each run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=_seeds, default=[42, 43, 44, 45, 46], help="comma-separated")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data=synthetic")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logger = logging.getLogger("recsys_torch")
    logger.setLevel(logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Once())
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        text = markdown(collect(args.seeds, args.overrides), args.seeds, args.overrides)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
