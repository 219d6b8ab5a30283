"""One generic trainer for every model: minibatch gradient descent over shuffled slices of the
training rows, early stopping on validation, an optional refit on train + validation, and a saved
state after every epoch that a killed run resumes from."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from recsys_torch.checks import choice, number
from recsys_torch.batches import SHUFFLES, EpochOrder, n_steps, step_slice
from recsys_torch.checkpoint import TrainState, restore_training, rng_state, save_state, save_training, set_rng_state
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import TrainingError, TrainingInterrupted
from recsys_torch.loggers import NullLogger
from recsys_torch.optim import build_schedulers
from recsys_torch.signals import SignalGuard, signal_name
from recsys_torch.steps import build_step, resolve_device
from recsys_torch.tasks import RatingTask

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch: loss, lr, val metrics
    best_epoch: int = 0
    best_metric: float = math.nan
    fit_seconds: float = 0.0
    train_ratings_per_second: float = 0.0
    stopped_early: bool = False
    val_metrics: dict = field(default_factory=dict)  # the chosen model's, before any refit
    refit: bool = False  # the model was then retrained on train + val for best_epoch epochs


class Trainer:
    """Fits any :class:`~recsys_torch.models.FactorizationModel` for a task (rating by default):
    ``Trainer(epochs=20, lr=0.01).fit(model, train, val)`` works without any config object.

    Early stopping watches the task's validation metric (never test) with ``patience`` epochs and
    restores the best weights. With ``refit`` the model then restarts from its initial weights and
    trains on train + val for the number of epochs validation chose. ``callbacks`` are called as
    ``callback(trainer, model, epoch, record)`` after each epoch's validation.

    With ``checkpoint_path`` the training state is written there atomically after every epoch and on
    SIGINT/SIGTERM between two steps (then :class:`TrainingInterrupted` is raised); ``resume=True``
    continues from it, bit for bit on the same device and thread count. ``checkpoint_meta`` (the
    run's settings) is stored with it, and a state saved under other settings is refused.
    """

    def __init__(self, epochs: int = 20, batch_size: int = 1024, lr: float = 0.01, optimizer: str = "adam",
                 lr_schedule: str = "none", lr_gamma: float = 0.9, lr_step_size: int = 10, patience: int | None = 3,
                 min_delta: float = 0.0, device: str = "auto", seed: int = 0, num_threads: int | None = None,
                 progress: bool = True, eval_batch_size: int = 65536, logger=None,
                 callbacks: list[Callable] | None = None, checkpoint_path: str | None = None, resume: bool = False,
                 checkpoint_meta: dict | None = None, fused: bool | str = "auto", distributed: bool = False,
                 precision: str = "32", data_on_device: bool = True, shuffle: str = "full", refit: bool = False,
                 eval_every: int = 1) -> None:
        self.epochs, self.batch_size = number("trainer.epochs", epochs, low=0), number("trainer.batch_size", batch_size, low=1)
        self.lr = number("trainer.lr", lr, float, above=0)
        self.optimizer, self.lr_schedule = optimizer, lr_schedule
        self.lr_gamma = number("trainer.lr_gamma", lr_gamma, float, above=0)
        self.lr_step_size = number("trainer.lr_step_size", lr_step_size, low=1)
        patience = number("trainer.patience", patience, allow_none=True)
        self.patience = None if patience is None or patience <= 0 else patience
        self.min_delta = number("trainer.min_delta", min_delta, float)
        self.device, self.seed = resolve_device(device), number("seed", seed, low=0, high=2**63 - 1)
        # auto: one thread for steps too small to share (a rating batch), every core for the wide ones
        # (a whole-catalog loss): more threads than the work needs spin and slow down under load
        self.num_threads = num_threads if num_threads == "auto" else number("trainer.num_threads", num_threads, low=1,
                                                                              allow_none=True)
        self.eval_batch_size = number("trainer.eval_batch_size", eval_batch_size, low=1)
        self.eval_every = number("trainer.eval_every", eval_every, low=1)  # validate every N epochs (and the last)
        self.progress, self.resume, self.refit = bool(progress), bool(resume), bool(refit)
        self.logger, self.callbacks = logger or NullLogger(), list(callbacks or [])
        self.checkpoint_path, self.checkpoint_meta = checkpoint_path and str(checkpoint_path), checkpoint_meta
        self.fused = choice("trainer.fused", fused, (True, False, "auto"))
        self.precision = choice("trainer.precision", precision, ("32", "bf16"))
        self.shuffle = choice("trainer.shuffle", shuffle, SHUFFLES)
        self.distributed, self.data_on_device = bool(distributed), bool(data_on_device)
        self.rank, self.world_size = 0, 1
        self.generator: torch.Generator | None = None  # shuffling and negative sampling; set by fit

    @property
    def _writes(self) -> bool:
        """Whether this process writes ``last.pt``: rank 0 alone, while every rank reads it to resume."""
        return self.checkpoint_path is not None and self.rank == 0

    def fit(self, model, train: Interactions, val: Interactions | None = None, task=None) -> FitResult:
        task = task or RatingTask()
        if self.num_threads == "auto":
            torch.set_num_threads((os.cpu_count() or 1) if task.wide_steps else 1)
        elif self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.distributed:
            from recsys_torch import distributed

            self.rank, self.world_size = distributed.setup(self.device)
        val = val if val is not None and len(val) else None
        initial = copy.deepcopy(model.state_dict()) if self.refit and val is not None else None
        result = self._fit(model, train, val, task, self.checkpoint_path, self.epochs, self.patience)
        if initial is None or not model.trainable or not result.history:
            return result
        epochs = result.best_epoch or len(result.history)
        model.load_state_dict(initial)  # the same start as the first fit, then its seeds again
        path = self.checkpoint_path and self.checkpoint_path.removesuffix(".pt") + "-refit.pt"
        again = self._fit(model, train.concat(val), None, task, path, epochs, None, tag="refit/")
        log.info("refit on train + val (%d rows) for %d epochs", len(train) + len(val), epochs)
        return FitResult(again.history, result.best_epoch, result.best_metric, result.fit_seconds + again.fit_seconds,
                         again.train_ratings_per_second, result.stopped_early, result.val_metrics, refit=True)

    def _fit(self, model, train, val, task, path, epochs, patience, tag="") -> FitResult:
        torch.manual_seed(self.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        model.to(self.device)
        model.prepare(train)
        data = train.to(self.device)  # moved once
        task.setup(data, self.device, self.generator)
        if self.device.type == "cuda" and not self.data_on_device:  # rows stay in pinned host memory
            data = train.pin_memory()
        rows = task.training_rows(data, times=getattr(model, "uses_time", False))  # duck-typed models: no
        t0 = time.perf_counter()
        if not model.trainable or epochs == 0:
            record = self._validate(model, train, val, task, {})
            return FitResult([record] if record else [], best_metric=record.get(f"val/{task.monitor}", math.nan),
                             fit_seconds=time.perf_counter() - t0, val_metrics=_val_part(record))
        # building the step may load the compiled kernel: a one-off cost, so the clock restarts after it
        step = build_step(model, task, self.optimizer, self.lr, self.batch_size, self.device, self.fused,
                          self.world_size, self.precision, self.num_threads)
        schedulers = build_schedulers(step.optimizers, self.lr_schedule, epochs, self.lr_gamma, self.lr_step_size)
        # a saved state belongs to these settings and this data: a resume on other data is refused
        meta = {**(self.checkpoint_meta or {}), "data_fingerprint": train.fingerprint() + (val.fingerprint() if val else "")
                } if path else None
        run = _Run(self, model, task, step, schedulers, path, tag, meta)
        state, t0 = run.restore(), time.perf_counter()
        if state.epoch < 0:  # that fit had finished
            return FitResult(**run.saved["result"])
        prior, order = state.fit_seconds, EpochOrder(self.shuffle, rows[0], train.n_users)
        with SignalGuard(enabled=self._writes) as guard:
            while state.epoch < epochs and not state.stopped_early:
                run.epoch(state, rows, order, epochs, patience, train, val, guard, prior, t0)
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        finish = getattr(model, "finish", None)  # duck-typed models may have none
        if finish is not None:
            finish(train, task)
        result = FitResult(state.history, state.best_epoch, state.best_metric, prior + time.perf_counter() - t0,
                           len(train) * len(state.history) / max(state.train_seconds, 1e-9), state.stopped_early,
                           _val_part(state.history[state.best_epoch - 1] if state.best_epoch else {}))
        if self._writes and path:
            save_state(path, {"meta": run.meta, "finished": True, "model": _cpu_state(model),
                              "result": asdict(result)})
        return result

    def _validate(self, model, train, val, task, record: dict) -> dict:
        if val is not None:
            for key, value in task.validate(model, val, train, batch_size=self.eval_batch_size).items():
                record[f"val/{key}"] = value
        return record


def _val_part(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("val/")}


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class _Run:
    """One fit's loop: epochs, early stopping, saving and restoring its state."""

    def __init__(self, trainer: Trainer, model, task, step, schedulers, path, tag, meta) -> None:
        self.t, self.model, self.task, self.step, self.schedulers = trainer, model, task, step, schedulers
        self.path, self.tag, self.meta, self.saved = path, tag, meta, None

    def epoch(self, state: TrainState, rows, order, epochs, patience, train, val, guard, prior, t0) -> None:
        t, epoch, e0 = self.t, state.epoch + 1, time.perf_counter()
        self.model.train()
        partial, state.partial = state.partial, None
        if partial is not None:  # replay this epoch's shuffle, then continue the generator mid-epoch
            t.generator.set_state(partial["epoch_generator"])
        epoch_generator = t.generator.get_state()
        perm = order(t.generator)
        batch_rows = [r.index_select(0, perm.to(r.device)) for r in rows]
        n, size = len(perm), self.step.rows_per_step
        first, losses = 0, []
        if partial is not None:
            set_rng_state(partial["rng"], t.generator, t.device)
            first, losses = int(partial["step"]), list(partial["losses"].to(t.device).unbind())
        total = n_steps(n, size, t.world_size)
        bar = tqdm(range(first, total), desc=f"{self.tag}epoch {epoch}/{epochs}", leave=False,
                   disable=not t.progress, unit="batch", initial=first, total=total)
        for b in bar:
            if guard.signum is not None:  # a plain attribute read: no device sync
                bar.close()
                state.train_seconds += time.perf_counter() - e0
                state.partial = {"epoch": epoch, "step": b, "epoch_generator": epoch_generator,
                                 "rng": rng_state(t.generator, t.device),
                                 "losses": torch.stack(losses).cpu() if losses else torch.zeros(0)}
                self.save(state, prior, t0)
                raise TrainingInterrupted(self._stopped(guard.signum, f"epoch {epoch} after step {b} of {total}"),
                                          guard.signum)
            start, end = step_slice(b, n, size, t.rank, t.world_size)
            if start >= end:  # a short last global batch leaves some rank nothing: every rank stops
                break
            losses.append(self.step(*(r[start:end] for r in batch_rows)))
            if t.progress and b % 50 == 0:
                bar.set_postfix(loss=f"{float(losses[-1]):.4f}")  # one sync every 50 steps
        bar.close()
        self.step.end_epoch()
        step_losses = torch.stack(losses).double().cpu()  # one sync per epoch
        state.train_seconds += time.perf_counter() - e0
        record = self.log_epoch(state, step_losses, n, size, epoch)
        for scheduler in self.schedulers:
            scheduler.step()
        validate = val is not None and (epoch % t.eval_every == 0 or epoch == epochs)
        t._validate(self.model, train, val if validate else None, self.task, record)
        for key, value in record.items():
            if key.startswith("val/"):
                t.logger.scalar(self.tag + key, value, epoch)
        state.history.append(record)
        for callback in t.callbacks:
            callback(t, self.model, epoch, record)
        if validate:  # patience counts validations
            self.track_best(state, record[f"val/{self.task.monitor}"], epoch, patience)
        state.epoch = epoch
        self.save(state, prior, t0)
        if guard.signum is not None:
            raise TrainingInterrupted(self._stopped(guard.signum, f"the end of epoch {epoch}"), guard.signum)

    def log_epoch(self, state: TrainState, losses: torch.Tensor, n: int, size: int, epoch: int) -> dict:
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            at = int(bad.nonzero()[0, 0])
            kept = f" (the last good state, after epoch {state.epoch}, stays in {self.path})" if self.path and state.epoch else ""
            raise TrainingError(f"the training loss became {float(losses[at])} at epoch {epoch}, step {at + 1}: "
                                f"lower trainer.lr or raise the regularization{kept}")
        t = self.t
        sizes = torch.tensor([float(e - s) for s, e in (step_slice(b, n, size, t.rank, t.world_size)
                                                        for b in range(len(losses)))], dtype=torch.float64)
        epoch_loss = float((losses * sizes).sum() / sizes.sum())  # per-example mean
        for i, value in enumerate(losses.tolist()):
            t.logger.scalar(self.tag + "train/loss_step", value, state.global_step + i + 1)
        state.global_step += len(losses)
        lr = self.step.optimizers.lr
        t.logger.scalar(self.tag + "train/loss", epoch_loss, epoch)
        t.logger.scalar(self.tag + "lr", lr, epoch)
        return {"epoch": epoch, "train/loss": epoch_loss, "lr": lr}

    def track_best(self, state: TrainState, value: float, epoch: int, patience: int | None) -> None:
        best, delta, task = state.best_metric, self.t.min_delta, self.task
        better = (not math.isnan(value) if math.isnan(best) else
                  value < best - delta if task.mode == "min" else value > best + delta)
        if better:
            state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
            state.best_state = copy.deepcopy(self.model.state_dict())
            return
        state.bad_epochs += 1
        if patience is not None and state.bad_epochs >= patience:
            log.info("early stop at epoch %d: best val/%s %.4f at epoch %d", epoch, task.monitor, best, state.best_epoch)
            state.stopped_early = True

    def save(self, state: TrainState, prior: float, t0: float) -> None:
        if self.t._writes and self.path:
            state.fit_seconds = prior + time.perf_counter() - t0
            save_training(self.path, self.meta, state, self.model, self.step.optimizers, self.schedulers,
                          self.t.generator, self.t.device)

    def _stopped(self, signum: int, at: str) -> str:
        return (f"training stopped by {signal_name(signum)} at {at}; its state is saved in {self.path}: run again "
                "with trainer.resume=true (same run folder) to continue")

    def restore(self) -> TrainState:
        """A fresh state, or the one saved in ``path`` when resuming (epoch -1: that fit had finished)."""
        t = self.t
        if not (t.resume and self.path):
            return TrainState()
        state, self.saved = restore_training(self.path, self.meta, self.model, self.step.optimizers,
                                             self.schedulers, t.generator, t.device)
        return state
