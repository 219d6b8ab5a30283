"""The thread policy: trainer.num_threads=auto takes one thread for rating steps and every core for
whole-catalog ranking losses, and the scripts' OpenMP threads wait passively (a spinning wait made a
2-thread fit beside one busy process 20-30 times slower)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from recsys_torch.models import MFModel
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.trainer import Trainer


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("task, want", [(RatingTask(), 1), (RankingTask(threshold=None, loss="gramian"), "cores"),
                                        (RankingTask(threshold=None, loss="bpr"), 1)], ids=["rating", "gramian", "bpr"])
def test_auto_threads_follow_the_width_of_a_step(tiny_inter, threads_restored, task, want):
    torch.set_num_threads(3)
    trainer = Trainer(epochs=1, patience=0, progress=False, num_threads="auto", optimizer="adam", fused=False)
    trainer.fit(MFModel(tiny_inter.n_users, tiny_inter.n_items, embedding_dim=4), tiny_inter, None, task)
    assert torch.get_num_threads() == (os.cpu_count() if want == "cores" else want)


@pytest.mark.parametrize("env, first, want", [({}, "recsys_torch", "PASSIVE"),
                                              ({"OMP_WAIT_POLICY": "ACTIVE"}, "recsys_torch", "ACTIVE"),
                                              ({}, "torch", None)],
                         ids=["default", "the user's choice wins", "torch loaded first: left alone"])
def test_openmp_threads_wait_passively_unless_told_otherwise(env, first, want):
    code = (f"import os\nimport {first}\nimport recsys_torch\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(want)
