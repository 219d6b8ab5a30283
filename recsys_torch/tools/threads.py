"""How training time depends on the thread count when the machine is idle and when another process is
busy: the measurement behind the default of ``trainer.num_threads`` (``scripts/thread_policy.py``).

Each cell runs ``scripts/train.py`` in its own process (so its OpenMP runtime starts with the
environment given) for a few epochs without early stopping, and reads ``fit_seconds`` from its
``metrics.json``. "busy" starts one competing CPU-bound process for the duration of the cell (what
a laptop or a shared server always has). Every cell is repeated and the median is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUSY_LOOP = "import time\nt = time.time()\nwhile time.time() - t < 3600:\n    pass\n"


def run_cell(overrides: list[str], threads: str, env_extra: dict, busy: bool, timeout: float = 1200) -> float:
    """``fit_seconds`` of one training run (seconds)."""
    env = {**os.environ, **env_extra}
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="threads-") as out:
            cmd = [sys.executable, os.path.join(REPO, "scripts", "train.py"), *overrides, f"trainer.num_threads={threads}",
                   "trainer.patience=0", "trainer.progress=false", "logger=none", f"hydra.run.dir={out}"]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(overrides)}: {proc.stderr.strip().splitlines()[-1:]}")
            with open(os.path.join(out, "metrics.json")) as fh:
                return float(json.load(fh)["fit_seconds"])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def measure(models: dict[str, list[str]], threads=("1", "2"), policies=None, repeats: int = 3, log=sys.stderr) -> list[dict]:
    """Rows of (model, machine, threads, policy, median seconds, all seconds)."""
    policies = policies or {"default": {}}
    rows = []
    for name, overrides in models.items():
        for busy in (False, True):
            for policy, env in policies.items():
                for t in threads:
                    times = [run_cell(overrides, t, env, busy) for _ in range(repeats)]
                    row = {"model": name, "machine": "busy" if busy else "idle", "threads": t, "policy": policy,
                           "seconds": statistics.median(times), "all": times}
                    rows.append(row)
                    print(f"{name:10} {row['machine']:5} threads={t:5} {policy:8} "
                          f"{row['seconds']:7.2f} s  ({', '.join(f'{x:.2f}' for x in times)})", file=log, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | machine | wait policy | threads | fit s (median) | runs |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['machine']} | {r['policy']} | {r['threads']} | {r['seconds']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['all'])} |")
    return "\n".join(lines) + "\n"
