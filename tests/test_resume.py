"""Resuming a killed run: ``last.pt`` holds the full training state, ``trainer.resume=true`` continues
from it bit for bit (on CPU), SIGTERM saves before exiting, finished folds are not trained again, and
the same seed gives the same metrics.json."""

from __future__ import annotations

import json
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose_cfg
from recsys_torch import trainer as trainer_module
from recsys_torch.checkpoint import LAST_FORMAT, TrainState, load_state
from recsys_torch.errors import TrainingInterrupted
from recsys_torch.errors import CheckpointError, ConfigError, TrainingError
from recsys_torch.io import safe_torch_load
from recsys_torch.data import encode
from recsys_torch.models import HybridModel, MFModel
from recsys_torch.splits import random_split
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.train import train
from recsys_torch.fused import FusedStep
from recsys_torch.steps import AutogradStep
from recsys_torch.trainer import Trainer

FAST = dict(device="cpu", progress=False, num_threads=1)
TIMING = {"fit_seconds", "train_ratings_per_second", "total_seconds", "run_id", "final_fit_seconds"}  # differ from run to run


class Crash(Exception):
    """Stands in for a kill: raised from inside fit, after some epochs were saved."""


def make_task(kind: str):
    return RatingTask() if kind == "rating" else RankingTask(threshold=None, loss="bpr", n_negatives=2)


def fit(tiny_inter, path, kind="rating", resume=False, callbacks=(), task=None, make_model=None, **kwargs):
    """A fresh model (MF unless ``make_model``) and trainer on the tiny data; returns (model, result)."""
    task = task or make_task(kind)
    split = random_split(task.prepare_data(tiny_inter), seed=0)[0]
    torch.manual_seed(0)
    model = (make_model or (lambda: MFModel(tiny_inter.n_users, tiny_inter.n_items, embedding_dim=8)))()
    settings = dict(epochs=5, batch_size=64, lr=0.01, patience=None, checkpoint_path=str(path), resume=resume,
                    callbacks=list(callbacks), **FAST)
    settings.update(kwargs)
    return model, Trainer(**settings).fit(model, split.train, split.val, task)


def crash_at(epoch):
    def callback(trainer, model, e, record):
        if e == epoch:
            raise Crash
    return callback


def assert_same_fit(a, b):
    (model_a, result_a), (model_b, result_b) = a, b
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    assert result_a.history == result_b.history
    assert (result_a.best_epoch, result_a.best_metric) == (result_b.best_epoch, result_b.best_metric)


# --- the trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, extra", [
    ("rating", {}),
    ("ranking", {"lr_schedule": "exponential", "lr_gamma": 0.7, "optimizer": "adagrad"}),
], ids=["rating-adam", "ranking-adagrad-schedule"])
def test_resume_after_a_crash_is_bit_exact(tiny_inter, tmp_path, kind, extra):
    reference = fit(tiny_inter, tmp_path / "ref.pt", kind, **extra)
    with pytest.raises(Crash):
        fit(tiny_inter, tmp_path / "last.pt", kind, callbacks=[crash_at(3)], **extra)
    saved = load_state(str(tmp_path / "last.pt"))
    assert saved["progress"]["epoch"] == 2 and not saved["finished"]
    assert_same_fit(reference, fit(tiny_inter, tmp_path / "last.pt", kind, resume=True, **extra))


def test_resume_of_a_model_that_draws_random_numbers_is_bit_exact(tiny_raw, tmp_path):
    """Id dropout draws from torch's global generator and the feature tower's dense layers have
    torch's own Adam: both are part of the saved state."""
    data = encode(tiny_raw)

    def hybrid():
        return HybridModel(data.n_users, data.n_items, data.item_features, data.user_features, embedding_dim=8,
                           fusion="gated", hidden=[8], id_dropout=0.3)

    inter = data.interactions
    reference = fit(inter, tmp_path / "ref.pt", make_model=hybrid)
    with pytest.raises(Crash):
        fit(inter, tmp_path / "last.pt", make_model=hybrid, callbacks=[crash_at(3)])
    assert_same_fit(reference, fit(inter, tmp_path / "last.pt", make_model=hybrid, resume=True))


def test_resume_of_a_model_with_tables_sized_by_the_data_is_bit_exact(tiny_raw, tmp_path):
    """The hybrid's day tables get their size from the training data (in ``prepare``); restoring the
    saved state must fill the tables the optimizer already holds, not replace them."""
    data = encode(tiny_raw)
    assert data.interactions.timestamps is not None

    def hybrid():
        return HybridModel(data.n_users, data.n_items, data.item_features, data.user_features, embedding_dim=8,
                           day_bias=True, day_scale=True, id_prior=2.0)

    inter = data.interactions
    reference = fit(inter, tmp_path / "ref.pt", make_model=hybrid)
    assert reference[0].uses_time and bool(reference[0].user_day_bias.weight.abs().sum() > 0)
    with pytest.raises(Crash):
        fit(inter, tmp_path / "last.pt", make_model=hybrid, callbacks=[crash_at(3)])
    assert_same_fit(reference, fit(inter, tmp_path / "last.pt", make_model=hybrid, resume=True))


def sigterm_at_step(monkeypatch, call: int, signals=(signal.SIGTERM,)) -> None:
    """Send this process ``signals`` during the ``call``-th training step, whichever step path
    (autograd or the fused kernel) runs; wrapping the task instead would change which path runs."""
    calls = []

    def signalling(real_step):
        def step(self, *args):
            calls.append(None)
            if len(calls) == call:
                for sig in signals:
                    os.kill(os.getpid(), sig)
            return real_step(self, *args)
        return step

    for cls in (AutogradStep, FusedStep):
        monkeypatch.setattr(cls, "__call__", signalling(cls.__call__))


@pytest.mark.parametrize("kind", ["rating", "ranking"])
def test_sigterm_mid_epoch_saves_the_step_and_resumes_bit_exact(tiny_inter, tmp_path, kind, monkeypatch):
    reference = fit(tiny_inter, tmp_path / "ref.pt", kind)
    path = tmp_path / "last.pt"
    steps = -(-int(0.8 * len(tiny_inter)) // 64)  # ranking keeps every rating (threshold None)
    sigterm_at_step(monkeypatch, steps + 5)
    with pytest.raises(TrainingInterrupted, match=rf"SIGTERM at epoch 2 after step 5 of {steps}; .*trainer.resume=true") as info:
        fit(tiny_inter, path, kind)
    monkeypatch.undo()
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard put the handler back
    saved = load_state(str(path))["progress"]
    assert saved["epoch"] == 1 and saved["partial"]["epoch"] == 2 and saved["partial"]["step"] == 5
    assert_same_fit(reference, fit(tiny_inter, path, kind, resume=True))


def test_sigint_saves_like_sigterm_and_a_second_one_stops_at_once(tiny_inter, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    sigterm_at_step(monkeypatch, 20, signals=(signal.SIGINT,))
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT at epoch 2 after step 5 of 15") as info:
        fit(tiny_inter, tmp_path / "a.pt")
    assert info.value.signum == signal.SIGINT and load_state(str(tmp_path / "a.pt"))["progress"]["partial"]["step"] == 5
    monkeypatch.undo()
    sigterm_at_step(monkeypatch, 20, signals=(signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_inter, tmp_path / "b.pt")
    assert load_state(str(tmp_path / "b.pt"))["progress"]["epoch"] == 1  # the epoch-end state is still there
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_last_pt_holds_the_whole_training_state(tiny_inter, tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(Crash):
        fit(tiny_inter, path, lr_schedule="step", lr_step_size=1, callbacks=[crash_at(3)])
    saved = safe_torch_load(str(path))  # weights_only=True
    assert saved["format"] == LAST_FORMAT
    assert {"model", "optimizers", "schedulers", "rng", "progress"} <= set(saved)
    progress = saved["progress"]  # the trainer's TrainState, field by field
    assert set(progress) == {f.name for f in dataclasses.fields(TrainState)}
    assert progress["epoch"] == 2 and progress["global_step"] == 2 * 15 and len(progress["history"]) == 2
    assert saved["schedulers"][0]["last_epoch"] == 2
    assert isinstance(saved["rng"]["generator"], torch.Tensor) and progress["best_state"] is not None


def test_finished_state_is_not_trained_again(tiny_inter, tmp_path):
    path = tmp_path / "last.pt"
    first = fit(tiny_inter, path)
    assert load_state(str(path))["finished"]
    epochs_run = []
    again = fit(tiny_inter, path, resume=True, callbacks=[lambda t, m, e, r: epochs_run.append(e)])
    assert epochs_run == []
    assert_same_fit(first, again)
    assert again[1].fit_seconds == first[1].fit_seconds


def test_early_stop_survives_a_kill_before_the_final_save(tiny_inter, tmp_path, monkeypatch):
    reference = fit(tiny_inter, tmp_path / "ref.pt", epochs=30, patience=1, min_delta=0.5)
    assert reference[1].stopped_early
    real_save = trainer_module.save_state

    def killed_at_the_finish(path, state):
        if state["finished"]:
            raise Crash
        real_save(path, state)

    monkeypatch.setattr(trainer_module, "save_state", killed_at_the_finish)
    with pytest.raises(Crash):
        fit(tiny_inter, tmp_path / "last.pt", epochs=30, patience=1, min_delta=0.5)
    monkeypatch.setattr(trainer_module, "save_state", real_save)
    resumed = fit(tiny_inter, tmp_path / "last.pt", epochs=30, patience=1, min_delta=0.5, resume=True)
    assert_same_fit(reference, resumed)  # no epoch trained past the early stop


def test_resume_refuses_a_state_saved_with_other_settings(tiny_inter, tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(Crash):
        fit(tiny_inter, path, checkpoint_meta={"model": {"embedding_dim": 8}}, callbacks=[crash_at(2)])
    with pytest.raises(CheckpointError, match=r"other settings \(model.embedding_dim: 8 -> 16\)"):
        fit(tiny_inter, path, resume=True, checkpoint_meta={"model": {"embedding_dim": 16}})


def test_resume_without_a_saved_state_starts_from_scratch(tiny_inter, tmp_path, caplog):
    reference = fit(tiny_inter, tmp_path / "ref.pt")
    assert_same_fit(reference, fit(tiny_inter, tmp_path / "none.pt", resume=True))
    assert "no saved state" in caplog.text


class NanAt:
    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, *args):
        self.calls += 1
        loss = self.inner.loss(*args)
        return loss * float("nan") if self.calls == self.at else loss


def test_nan_loss_names_epoch_and_step_and_keeps_the_last_good_state(tiny_inter, tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(TrainingError, match=rf"became nan at epoch 3, step 4: .*after epoch 2, stays in {re.escape(str(path))}"):
        fit(tiny_inter, path, task=NanAt(RatingTask(), 2 * 15 + 4))
    saved = load_state(str(path))
    assert saved["progress"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


# --- the run folder (train.py) ------------------------------------------------------------------------------


def metric_values(metrics: dict) -> dict:
    """metrics.json without its timing keys (also inside ``folds``)."""
    out = {k: v for k, v in metrics.items() if k not in TIMING}
    if "folds" in out:
        out["folds"] = [metric_values(f) for f in out["folds"]]
    return out


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


KFOLD = ["split=kfold", "split.folds=3", "task=ranking", "task.threshold=null", "trainer.epochs=2"]


def test_kfold_resume_skips_finished_folds(tmp_path):
    ref_dir = tmp_path / "ref"
    reference = train(compose_cfg(KFOLD), str(ref_dir))
    assert sorted(os.listdir(ref_dir)) == ["checkpoint.pt", "last-final.pt", "last-fold0.pt", "last-fold1.pt",
                                          "last-fold2.pt", "metrics.json", "recommend.npz", "run.json"]
    run = tmp_path / "run"
    run.mkdir()
    # a run killed during fold 1: fold 0 finished, nothing else written
    (run / "last-fold0.pt").write_bytes((ref_dir / "last-fold0.pt").read_bytes())
    resumed = train(compose_cfg([*KFOLD, "trainer.resume=true"]), str(run))
    assert metric_values(resumed) == metric_values(reference)
    assert resumed["folds"][0]["fit_seconds"] == reference["folds"][0]["fit_seconds"]  # not trained again
    assert resumed["folds"][1]["fit_seconds"] != reference["folds"][1]["fit_seconds"]
    a = safe_torch_load(str(ref_dir / "checkpoint.pt"))["state_dict"]
    b = safe_torch_load(str(run / "checkpoint.pt"))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unfinished_run_folder_needs_resume_or_a_new_folder(tmp_path):
    cfg = compose_cfg(["trainer.epochs=1"])
    (tmp_path / "last.pt").write_bytes(b"state of a killed run")
    with pytest.raises(ConfigError, match=r"holds the saved state of an unfinished run \(last.pt\): add trainer.resume=true"):
        train(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_finished_run_folder_is_run_again_from_scratch(tmp_path):
    cfg = compose_cfg(["trainer.epochs=1"])
    first = train(cfg, str(tmp_path))
    stale = tmp_path / ".tmp-abc123"  # what a write killed half-way leaves
    stale.write_bytes(b"half")
    second = train(cfg, str(tmp_path))
    assert metric_values(second) == metric_values(first)
    assert second["fit_seconds"] != first["fit_seconds"] and not stale.exists()


def test_resume_with_changed_settings_is_refused(tmp_path):
    train(compose_cfg(["trainer.epochs=1"]), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.embedding_dim: 64 -> 16"):
        train(compose_cfg(["trainer.epochs=1", "trainer.resume=true", "model.embedding_dim=16"]), str(tmp_path))


def test_same_seed_same_metrics_json(tmp_path):
    """Determinism on CPU: every metrics.json value but the timings is identical."""
    overrides = [*KFOLD, "model=hybrid"] if (REPO / "configs/model/hybrid.yaml").exists() else KFOLD
    train(compose_cfg(overrides), str(tmp_path / "a"))
    train(compose_cfg(overrides), str(tmp_path / "b"))
    a, b = read_json(tmp_path / "a" / "metrics.json"), read_json(tmp_path / "b" / "metrics.json")
    assert metric_values(a) == metric_values(b)
    assert a["fit_seconds"] != b["fit_seconds"]  # the timings really are excluded, not equal by accident


# --- the command line: SIGKILL, SIGTERM, resume ---------------------------------------------------------------

# Small enough to finish in seconds, with epochs long enough (50 autograd steps) to be killed inside one;
# the fused kernel would run an epoch in milliseconds (its resume is tested in process above).
CLI = ["data=synthetic", "data.n_users=100", "data.n_items=60", "data.n_ratings=2000", "trainer.epochs=5",
       "trainer.batch_size=32", "trainer.patience=0", "trainer.progress=false", "trainer.num_threads=1",
       "trainer.device=cpu", "trainer.fused=false", "logger=none"]


def start(run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *CLI, f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_state(proc, path, newer_than=0.0, timeout=120.0):
    """Wait until ``path`` is (re)written after ``newer_than``; the process must still be training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns > newer_than:
            return path.stat().st_mtime_ns
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {path} after {timeout} s")


@pytest.mark.slow
def test_killed_then_terminated_run_resumes_to_the_same_metrics(tmp_path):
    reference = train(compose_cfg(CLI), str(tmp_path / "ref"))
    run = tmp_path / "run"
    last = run / "last.pt"

    proc = start(run)  # 1. SIGKILL after the first epoch was saved: nothing gets a chance to run
    wait_for_state(proc, last)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = load_state(str(last))
    assert not state["finished"] and 1 <= state["progress"]["epoch"] < 5
    assert not (run / "metrics.json").exists() and not (run / "checkpoint.pt").exists()

    mtime = last.stat().st_mtime_ns  # 2. resume, and SIGTERM that run once it saved another epoch
    proc = start(run, "trainer.resume=true")
    wait_for_state(proc, last, newer_than=mtime)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training stopped by SIGTERM at "), err
    assert "trainer.resume=true" in lines[0] and "Traceback" not in err
    state = load_state(str(last))
    assert not state["finished"] and state["progress"]["epoch"] > 1
    assert not (run / "metrics.json").exists() and not (run / "checkpoint.pt").exists()

    proc = start(run, "trainer.resume=true")  # 3. resume to the end
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert metric_values(read_json(run / "metrics.json")) == metric_values(reference)
    assert not [name for name in os.listdir(run) if name.startswith(".tmp-")]
