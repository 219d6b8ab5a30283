"""Data-parallel training: 2 CPU processes (gloo) under torchrun match single-process training."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from recsys_torch.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["data=synthetic", "data.n_users=200", "data.n_items=100", "data.n_ratings=6000", "trainer.epochs=4",
          "trainer.patience=0", "logger=none", "trainer.progress=false", "trainer.num_threads=1",
          "trainer.fused=false"]
# A DDP step is the single-process step on the same global batch (2 x 128 = 256 ratings), up to the
# order of float sums, so the metrics agree far inside this tolerance.
TOLERANCE = 1e-3


def _torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.exists(exe) else shutil.which("torchrun") and ["torchrun"]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo multi-process test runs on Linux/macOS")
def test_two_process_ddp_matches_single_process(tmp_path, compose):
    single = train(compose([*COMMON, "trainer.batch_size=256"]), str(tmp_path / "single"))
    launcher = _torchrun()
    if not launcher:
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node=2", "scripts/train.py", "trainer=ddp", *COMMON,
         "trainer.batch_size=128", f"hydra.run.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    for key in ("test/rmse", "test/mae", "val/rmse"):
        assert ddp[key] == pytest.approx(single[key], abs=TOLERANCE), key
    assert ddp["n_train"] == single["n_train"]
    assert (out / "checkpoint.pt").exists()
