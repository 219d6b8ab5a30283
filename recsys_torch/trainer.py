"""One generic trainer for every model: minibatch gradient descent over shuffled index slices."""

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

from recsys_torch.checkpointing import (
    SignalGuard, TrainingInterrupted, load_state, rng_state, save_state, set_rng_state, signal_name,
)
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import CheckpointError, ConfigError, TrainingError
from recsys_torch.loggers import NullLogger
from recsys_torch.models.base import FactorizationModel
from recsys_torch.optim import RowAdagrad, RowAdam, RowSGD
from recsys_torch.tasks import RatingTask

log = logging.getLogger(__name__)

ONLINE_CHUNK = 16384  # ratings per loop step (progress, loss logging, signal checks) in online SGD
OPTIMIZERS = ("sgd", "adam", "sparse_adam", "adagrad")
SCHEDULES = ("none", "cosine", "exponential", "step")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` takes CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device} but CUDA is not available here; use auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"trainer.device: unknown device {device!r} (use auto, cpu or cuda)") from None


class _Optimizers:
    """Steps a group of optimizers (sparse embedding tables and dense layers) as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


def _sparse_params(model: torch.nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and getattr(m, "sparse", False)}


def build_optimizer(model: torch.nn.Module, name: str, lr: float) -> _Optimizers:
    """Sparse embedding tables get a row-wise optimizer (a step touches only the rows in the batch,
    see :mod:`recsys_torch.optim`); dense layers get torch's own. ``sgd``, ``adam`` and ``adagrad``
    name the update rule; ``sparse_adam`` uses torch's ``SparseAdam`` for the tables (the reference
    implementation of the same rule as ``adam``, slower)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    sparse_ids = _sparse_params(model)
    sparse = [p for p in params if id(p) in sparse_ids]
    dense = [p for p in params if id(p) not in sparse_ids]
    row_rule = {"sgd": RowSGD, "adam": RowAdam, "adagrad": RowAdagrad, "sparse_adam": torch.optim.SparseAdam}[name]
    dense_rule = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}.get(name, torch.optim.Adam)
    opts = []
    if sparse:
        opts.append(row_rule(sparse, lr=lr))
    if dense:
        opts.append(dense_rule(dense, lr=lr))
    return _Optimizers(opts)


def build_schedulers(optimizers: _Optimizers, schedule: str, epochs: int, gamma: float, step_size: int):
    if schedule in (None, "none"):
        return []
    if schedule not in SCHEDULES:
        raise ConfigError(f"trainer.lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    out = []
    for opt in optimizers.optimizers:
        if schedule == "cosine":
            out.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)))
        elif schedule == "exponential":
            out.append(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma))
        else:
            out.append(torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma))
    return out


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch: loss, lr, val metrics
    best_epoch: int = 0
    best_metric: float = math.nan
    fit_seconds: float = 0.0
    train_ratings_per_second: float = 0.0
    stopped_early: bool = False


@dataclass
class _Progress:
    """What the epoch loop carries from one epoch to the next (and ``last.pt`` across processes)."""

    result: FitResult
    epoch: int = 0  # epochs completed
    best_state: dict | None = None
    bad_epochs: int = 0
    train_seconds: float = 0.0
    prior_seconds: float = 0.0  # fit time spent by the processes before a resume
    partial: dict | None = None  # where a signal stopped the next epoch (continued from there)


def _number(name: str, value, kind):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


class Trainer:
    """Fits any :class:`FactorizationModel` for a task (``RatingTask`` by default).

    Works without any config object: ``Trainer(epochs=20, lr=0.01).fit(model, train, val)``.
    Early stopping watches the task's validation metric (never test) with ``patience`` epochs and
    restores the best weights. Callbacks ``on_epoch_end(trainer, model, epoch, record)`` run after
    each epoch's validation.

    With ``checkpoint_path`` the full training state is written there atomically after every epoch,
    and on SIGINT/SIGTERM between two steps (then :class:`TrainingInterrupted` is raised); when
    training ends it is replaced by the final weights and the fit result. ``resume=True`` continues
    from that file when it exists: on the same device and thread count, the result is bit-for-bit
    that of an uninterrupted fit. ``checkpoint_meta`` (e.g. the run's config) is stored in the file,
    and a file with other meta is refused.
    """

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 1024,
        lr: float = 0.01,
        optimizer: str = "adam",
        lr_schedule: str = "none",
        lr_gamma: float = 0.9,
        lr_step_size: int = 10,
        patience: int | None = 3,
        min_delta: float = 0.0,
        device: str = "auto",
        seed: int = 0,
        num_threads: int | None = None,
        progress: bool = True,
        eval_batch_size: int = 65536,
        logger=None,
        callbacks: list[Callable] | None = None,
        checkpoint_path: str | None = None,
        resume: bool = False,
        checkpoint_meta: dict | None = None,
        fused: bool | str = "auto",
        distributed: bool = False,
        precision: str = "32",
        data_on_device: bool = True,
        shuffle: str = "full",
    ) -> None:
        self.epochs = _number("epochs", epochs, int)
        self.batch_size = _number("batch_size", batch_size, int)
        self.lr = _number("lr", lr, float)
        if self.epochs < 0:
            raise ConfigError(f"trainer.epochs must be >= 0, got {epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"trainer.batch_size must be >= 1, got {batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"trainer.lr must be > 0, got {lr}")
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.lr_gamma = _number("lr_gamma", lr_gamma, float)
        self.lr_step_size = _number("lr_step_size", lr_step_size, int)
        self.patience = None if patience is None or _number("patience", patience, int) <= 0 else int(patience)
        self.min_delta = _number("min_delta", min_delta, float)
        self.device = resolve_device(device)
        self.seed = _number("seed", seed, int)
        self.num_threads = None if num_threads is None else _number("num_threads", num_threads, int)
        self.progress = bool(progress)
        self.eval_batch_size = _number("eval_batch_size", eval_batch_size, int)
        self.logger = logger or NullLogger()
        self.callbacks = list(callbacks or [])
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.resume = bool(resume)
        self.checkpoint_meta = checkpoint_meta
        if fused not in (True, False, "auto"):
            raise ConfigError(f"trainer.fused must be true, false or auto, got {fused!r}")
        self.fused = fused
        self.distributed = bool(distributed)
        self.rank, self.world_size = 0, 1
        if precision not in ("32", "bf16"):
            raise ConfigError(f"trainer.precision must be '32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.data_on_device = bool(data_on_device)
        if shuffle not in ("full", "users"):
            raise ConfigError(f"trainer.shuffle must be 'full' or 'users', got {shuffle!r}")
        self.shuffle = shuffle
        self.step_size = self.batch_size  # ratings per loop step; a chunk of ratings in online mode
        self.global_step = 0
        self.generator: torch.Generator | None = None  # shuffling and negative sampling; set by fit

    @property
    def _writes(self) -> bool:
        """Whether this process writes ``last.pt``: rank 0 alone, while every rank reads it to resume."""
        return self.checkpoint_path is not None and self.rank == 0

    def _improved(self, value: float, best: float, mode: str) -> bool:
        if math.isnan(best):
            return not math.isnan(value)
        return value < best - self.min_delta if mode == "min" else value > best + self.min_delta

    def fit(self, model: FactorizationModel, train: Interactions, val: Interactions | None = None,
            task=None) -> FitResult:
        task = task or RatingTask()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        torch.manual_seed(self.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        model.to(self.device)
        if self.distributed:
            from recsys_torch import distributed

            self.rank, self.world_size = distributed.setup(self.device)
        model.prepare(train)
        if self.device.type == "cuda" and not self.data_on_device:
            # ratings stay in pinned host memory; each batch is copied asynchronously
            data = train.to("cpu")
            data = data.__class__(**{**data.__dict__, "users": data.users.pin_memory(),
                                     "items": data.items.pin_memory(), "ratings": data.ratings.pin_memory()})
        else:
            data = train.to(self.device)  # moved once
        task.setup(data.to(self.device) if data.users.device != self.device else data, self.device, self.generator)
        val = val if val is not None and len(val) > 0 else None
        t0 = time.perf_counter()
        if not model.trainable or self.epochs == 0:
            return self._evaluate_only(model, train, val, task, t0)

        # building the optimizer may import torch._dynamo (seconds, once per process) or load the
        # compiled kernel: one-off costs that are not fitting, so the clock restarts after it
        optimizer = self._build_optimizer(model, task)
        t0 = time.perf_counter()
        schedulers = build_schedulers(optimizer, self.lr_schedule, self.epochs, self.lr_gamma, self.lr_step_size)
        run = _Progress(FitResult())
        saved = self._saved_state()
        if saved is not None and saved.get("finished"):
            return self._restore_finished(saved, model)
        if saved is not None:
            self._restore(saved, run, model, optimizer, schedulers)
        # other ranks keep the default handlers: torchrun stops them when rank 0 exits
        with SignalGuard(enabled=self._writes) as guard:
            while run.epoch < self.epochs and not run.result.stopped_early:
                self._epoch(run, model, task, optimizer, schedulers, data, train, val, guard)
        if run.best_state is not None:
            model.load_state_dict(run.best_state)
        result = run.result
        result.fit_seconds = run.prior_seconds + time.perf_counter() - t0
        result.train_ratings_per_second = len(data) * len(result.history) / max(run.train_seconds, 1e-9)
        if self._writes:
            save_state(self.checkpoint_path, {"meta": self.checkpoint_meta, "finished": True,
                                              "model": _cpu_state(model), "result": asdict(result)})
        return result

    def _build_optimizer(self, model, task) -> _Optimizers:
        """torch's autograd path, or the compiled kernel of :mod:`recsys_torch.fused` when it computes
        the same step (``fused=auto``) or when asked to (``fused=true``)."""
        self.step_size = self.batch_size
        if self.fused is False or self.distributed:
            return build_optimizer(model, self.optimizer_name, self.lr)
        from recsys_torch import fused

        ok = fused.supports(model, task, self.optimizer_name, self.device) and fused.load_extension() is not None
        if not ok:
            if self.fused is True:
                raise ConfigError("trainer.fused=true needs model=mf, task=rating, optimizer sgd or adam, a CPU "
                                  "device and a C++ compiler; use trainer.fused=auto to fall back")
            return build_optimizer(model, self.optimizer_name, self.lr)
        optimizer = fused.FusedMF(model, self.optimizer_name, self.lr,
                                   online=self.batch_size == 1 and self.optimizer_name == "sgd")
        if optimizer.online:
            self.step_size = ONLINE_CHUNK
        return _Optimizers([optimizer])

    def _step(self, optimizer: _Optimizers, model, task, users, items, ratings) -> torch.Tensor:
        """One loop step: a minibatch (or, in online mode, a chunk of single-rating steps)."""
        first = optimizer.optimizers[0]
        if getattr(first, "fused", False):
            loss = first.fused_step(users, items, ratings, self.num_threads or torch.get_num_threads())
            first.step()  # a no-op that lets learning-rate schedulers see a step
            return loss
        if users.device != self.device:  # pinned host data (data_on_device=false)
            users, items, ratings = (t.to(self.device, non_blocking=True) for t in (users, items, ratings))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = task.loss(model, users, items, ratings)
        optimizer.zero_grad()
        loss.float().backward()
        if self.world_size > 1:
            from recsys_torch.distributed import sync_gradients

            sync_gradients(model, self.world_size)
        optimizer.step()
        return loss.detach().float()

    def _evaluate_only(self, model, train, val, task, t0) -> FitResult:
        result = FitResult(fit_seconds=time.perf_counter() - t0)
        if val is not None:
            record = {f"val/{k}": v for k, v in task.evaluate(model, val, train, batch_size=self.eval_batch_size).items()}
            result.history.append(record)
            result.best_metric = record.get(f"val/{task.monitor}", math.nan)
        return result

    # ---- one epoch -----------------------------------------------------------------------------------
    def _epoch(self, run: _Progress, model, task, optimizer, schedulers, data, train, val, guard) -> None:
        epoch = run.epoch + 1
        model.train()
        e0 = time.perf_counter()
        partial, run.partial = run.partial, None
        if partial is not None:  # replay this epoch's shuffle, then continue the generator mid-epoch
            self.generator.set_state(partial["epoch_generator"])
        epoch_generator = self.generator.get_state()
        n = len(data)
        perm = self._permutation(data)
        users, items, ratings = (t.index_select(0, perm) for t in (data.users, data.items, data.ratings))
        first = 0
        step_losses: list[torch.Tensor] = []
        if partial is not None:
            set_rng_state(partial["rng"], self.generator, self.device)
            first = int(partial["step"])
            step_losses = list(partial["losses"].to(self.device).unbind())
        span = self.step_size * self.world_size  # a global batch; this rank trains on its slice
        n_steps = -(-n // span)
        bar = tqdm(range(first, n_steps), desc=f"epoch {epoch}/{self.epochs}", leave=False,
                   disable=not self.progress, unit="batch", initial=first, total=n_steps)
        for b in bar:
            if guard.signum is not None:  # a plain attribute read: no device sync
                bar.close()
                run.train_seconds += time.perf_counter() - e0
                self._interrupt(run, model, optimizer, schedulers, guard.signum, (epoch, b, n_steps),
                                epoch_generator, step_losses)
            start, end = self._slice(b, n)
            if start >= end:  # a short last global batch leaves some rank nothing: every rank stops
                break
            loss = self._step(optimizer, model, task, users[start:end], items[start:end], ratings[start:end])
            step_losses.append(loss)
            if self.progress and b % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")  # one sync every 50 steps
        bar.close()
        losses = torch.stack(step_losses).double().cpu()  # one sync per epoch
        run.train_seconds += time.perf_counter() - e0
        self._check_finite(losses, epoch, run)
        record = self._log_epoch(losses, n, epoch, optimizer)
        for sch in schedulers:
            sch.step()
        if val is not None:
            scores = task.evaluate(model, val, train, batch_size=self.eval_batch_size)
            for key, value in scores.items():
                record[f"val/{key}"] = value
                self.logger.scalar(f"val/{key}", value, epoch)
        run.result.history.append(record)
        for callback in self.callbacks:
            callback(self, model, epoch, record)
        if val is not None:
            self._track_best(run, model, record[f"val/{task.monitor}"], epoch, task)
        run.epoch = epoch
        if self._writes:
            self._save(run, model, optimizer, schedulers)
        if guard.signum is not None:
            raise TrainingInterrupted(self._interrupted_message(guard.signum, (epoch, None, None)), guard.signum)

    def _check_finite(self, losses: torch.Tensor, epoch: int, run: _Progress) -> None:
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            step = int(bad.nonzero()[0, 0]) + 1
            kept = ""
            if self.checkpoint_path and run.epoch > 0:
                kept = f" (the last good state, after epoch {run.epoch}, stays in {self.checkpoint_path})"
            raise TrainingError(
                f"the training loss became {float(losses[step - 1])} at epoch {epoch}, step {step}: "
                f"lower trainer.lr or raise the regularization{kept}"
            )

    def _permutation(self, data: Interactions) -> torch.Tensor:
        """This epoch's order of the training rows. ``full``: a uniform shuffle. ``users``: the users
        in random order, each user's rows together (in data order), so per-rating SGD keeps the
        user's row in cache, as cornac and LibMF-style trainers do: about twice the throughput on
        large tables, at a small cost in how well each epoch mixes."""
        n = len(data)
        if self.shuffle == "full":
            return torch.randperm(n, generator=self.generator, device=self.device)
        cached = getattr(self, "_user_blocks", None)
        if cached is None or cached[0] is not data.users:  # sort once per fit, not per epoch
            by_user = torch.argsort(data.users, stable=True)
            counts = torch.bincount(data.users, minlength=data.n_users)
            cached = self._user_blocks = (data.users, by_user, counts, torch.cumsum(counts, 0) - counts,
                                          torch.nonzero(counts).squeeze(1))
        _, by_user, counts, starts, present = cached
        order = present[torch.randperm(len(present), generator=self.generator, device=self.device)]
        lengths = counts[order]
        offsets = torch.cumsum(lengths, 0) - lengths  # where each user's block lands
        shift = torch.repeat_interleave(starts[order] - offsets, lengths, output_size=n)
        return by_user[torch.arange(n, device=self.device) + shift]

    def _slice(self, b: int, n: int) -> tuple[int, int]:
        """This rank's rows of loop step ``b``; empty on every rank when the last global batch is too
        short to give each rank some rows."""
        span = self.step_size * self.world_size
        if b * span + (self.world_size - 1) * self.step_size >= n:
            return 0, 0
        start = b * span + self.rank * self.step_size
        return start, min(start + self.step_size, n)

    def _log_epoch(self, losses: torch.Tensor, n: int, epoch: int, optimizer) -> dict:
        sizes = torch.tensor([float(end - start) for start, end in map(lambda b: self._slice(b, n), range(len(losses)))],
                             dtype=torch.float64)
        epoch_loss = float((losses * sizes).sum() / sizes.sum())  # per-example mean
        for i, value in enumerate(losses.tolist()):
            self.logger.scalar("train/loss_step", value, self.global_step + i + 1)
        self.global_step += len(losses)
        lr_now = optimizer.optimizers[0].param_groups[0]["lr"]
        self.logger.scalar("train/loss", epoch_loss, epoch)
        self.logger.scalar("lr", lr_now, epoch)
        return {"epoch": epoch, "train/loss": epoch_loss, "lr": lr_now}

    def _track_best(self, run: _Progress, model, value: float, epoch: int, task) -> None:
        result = run.result
        if self._improved(value, result.best_metric, task.mode):
            result.best_metric, result.best_epoch = value, epoch
            run.best_state = copy.deepcopy(model.state_dict())
            run.bad_epochs = 0
            return
        run.bad_epochs += 1
        if self.patience is not None and run.bad_epochs >= self.patience:
            log.info("early stop at epoch %d: best val/%s %.4f at epoch %d",
                     epoch, task.monitor, result.best_metric, result.best_epoch)
            result.stopped_early = True

    # ---- saving and resuming -------------------------------------------------------------------------
    def _state(self, run: _Progress, model, optimizer, schedulers) -> dict:
        result = run.result
        return {
            "meta": self.checkpoint_meta,
            "finished": False,
            "device": self.device.type,
            "epoch": run.epoch,
            "global_step": self.global_step,
            "model": _cpu_state(model),
            "optimizers": optimizer.state_dict(),
            "schedulers": [sch.state_dict() for sch in schedulers],
            "rng": rng_state(self.generator, self.device),
            "best_state": run.best_state,
            "best_metric": result.best_metric,
            "best_epoch": result.best_epoch,
            "bad_epochs": run.bad_epochs,
            "stopped_early": result.stopped_early,
            "history": result.history,
            "train_seconds": run.train_seconds,
            "fit_seconds": run.prior_seconds + run.train_seconds,
            "partial": run.partial,
        }

    def _save(self, run: _Progress, model, optimizer, schedulers) -> None:
        save_state(self.checkpoint_path, self._state(run, model, optimizer, schedulers))

    def _interrupt(self, run, model, optimizer, schedulers, signum, where, epoch_generator, step_losses):
        """Save the state between two steps (``where``: epoch, steps done, steps per epoch) and stop."""
        epoch, step, _ = where
        run.partial = {
            "epoch": epoch,
            "step": step,
            "epoch_generator": epoch_generator,
            "rng": rng_state(self.generator, self.device),
            "losses": torch.stack(step_losses).cpu() if step_losses else torch.zeros(0),
        }
        self._save(run, model, optimizer, schedulers)
        raise TrainingInterrupted(self._interrupted_message(signum, where), signum)

    def _interrupted_message(self, signum: int, where: tuple) -> str:
        epoch, step, n_steps = where
        at = f"epoch {epoch} after step {step} of {n_steps}" if step is not None else f"the end of epoch {epoch}"
        return (f"training stopped by {signal_name(signum)} at {at}; its state is saved in "
                f"{self.checkpoint_path}: run again with trainer.resume=true (same run folder) to continue")

    def _saved_state(self) -> dict | None:
        if not (self.resume and self.checkpoint_path):
            return None
        if not os.path.exists(self.checkpoint_path):
            log.warning("trainer.resume: no saved state in %s; starting from the beginning", self.checkpoint_path)
            return None
        return load_state(self.checkpoint_path, self.checkpoint_meta)

    def _restore_finished(self, saved: dict, model) -> FitResult:
        _load_into(self.checkpoint_path, model.load_state_dict, saved["model"])
        log.info("resumed %s: training had finished; nothing to do", self.checkpoint_path)
        return FitResult(**saved["result"])

    def _restore(self, saved: dict, run: _Progress, model, optimizer, schedulers) -> None:
        path = self.checkpoint_path
        if saved.get("device") != self.device.type:
            raise CheckpointError(f"{path} was saved on {saved.get('device')}, this run is on {self.device.type}: "
                                  "resume on the same kind of device")
        if len(saved["optimizers"]) != len(optimizer.optimizers) or len(saved["schedulers"]) != len(schedulers):
            raise CheckpointError(f"{path} does not fit this model's optimizers or learning-rate schedule")
        _load_into(path, model.load_state_dict, saved["model"])
        _load_into(path, optimizer.load_state_dict, saved["optimizers"])
        for sch, state in zip(schedulers, saved["schedulers"]):
            _load_into(path, sch.load_state_dict, state)
        set_rng_state(saved["rng"], self.generator, self.device)
        self.global_step = int(saved["global_step"])
        result = run.result
        result.history = list(saved["history"])
        result.best_metric, result.best_epoch = float(saved["best_metric"]), int(saved["best_epoch"])
        result.stopped_early = bool(saved["stopped_early"])
        run.epoch, run.bad_epochs = int(saved["epoch"]), int(saved["bad_epochs"])
        run.best_state = saved["best_state"]
        run.train_seconds, run.prior_seconds = float(saved["train_seconds"]), float(saved["fit_seconds"])
        run.partial = saved["partial"]
        at = f"epoch {run.partial['epoch']}, step {run.partial['step']}" if run.partial else f"the end of epoch {run.epoch}"
        log.info("resuming from %s at %s", path, at)


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_into(path: str, load, state) -> None:
    try:
        load(state)
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not fit this model: {first[:200]}") from None
