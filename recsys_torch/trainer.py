"""One generic trainer for every model: minibatch gradient descent over shuffled index slices."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError, TrainingError
from recsys_torch.loggers import NullLogger
from recsys_torch.models.base import FactorizationModel
from recsys_torch.optim import RowAdagrad, RowAdam, RowSGD
from recsys_torch.tasks import RatingTask

log = logging.getLogger(__name__)

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


class Trainer:
    """Fits any :class:`FactorizationModel` for a task (``RatingTask`` by default).

    Works without any config object: ``Trainer(epochs=20, lr=0.01).fit(model, train, val)``.
    Early stopping watches the task's validation metric (never test) with ``patience`` epochs and
    restores the best weights. Callbacks ``on_epoch_end(trainer, model, epoch, record)`` run after
    each epoch's validation.
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
    ) -> None:
        if int(epochs) < 0:
            raise ConfigError(f"trainer.epochs must be >= 0, got {epochs}")
        if int(batch_size) < 1:
            raise ConfigError(f"trainer.batch_size must be >= 1, got {batch_size}")
        if not float(lr) > 0:
            raise ConfigError(f"trainer.lr must be > 0, got {lr}")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.lr_gamma = float(lr_gamma)
        self.lr_step_size = int(lr_step_size)
        self.patience = None if patience is None or int(patience) <= 0 else int(patience)
        self.min_delta = float(min_delta)
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.num_threads = num_threads
        self.progress = bool(progress)
        self.eval_batch_size = int(eval_batch_size)
        self.logger = logger or NullLogger()
        self.callbacks = list(callbacks or [])
        self.global_step = 0

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
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        model.to(self.device)
        model.prepare(train)
        data = train.to(self.device)  # moved once
        task.setup(data, self.device, generator)
        val = val if val is not None and len(val) > 0 else None
        result = FitResult()
        best_state = None
        t0 = time.perf_counter()
        if not model.trainable or self.epochs == 0:
            result.fit_seconds = time.perf_counter() - t0
            if val is not None:
                record = {f"val/{k}": v for k, v in task.evaluate(model, val, train, batch_size=self.eval_batch_size).items()}
                result.history.append(record)
                result.best_metric = record.get(f"val/{task.monitor}", math.nan)
            return result

        optimizer = build_optimizer(model, self.optimizer_name, self.lr)
        schedulers = build_schedulers(optimizer, self.lr_schedule, self.epochs, self.lr_gamma, self.lr_step_size)
        n = len(data)
        bad_epochs = 0
        train_seconds = 0.0
        for epoch in range(1, self.epochs + 1):
            model.train()
            e0 = time.perf_counter()
            perm = torch.randperm(n, generator=generator, device=self.device)
            users, items, ratings = (t.index_select(0, perm) for t in (data.users, data.items, data.ratings))
            step_losses = []
            bar = tqdm(range(0, n, self.batch_size), desc=f"epoch {epoch}/{self.epochs}", leave=False,
                       disable=not self.progress, unit="batch")
            for b, start in enumerate(bar):
                end = start + self.batch_size
                loss = task.loss(model, users[start:end], items[start:end], ratings[start:end])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_losses.append(loss.detach())
                if self.progress and b % 50 == 0:
                    bar.set_postfix(loss=f"{float(loss):.4f}")  # one sync every 50 steps
            bar.close()
            losses = torch.stack(step_losses).double().cpu()  # one sync per epoch
            train_seconds += time.perf_counter() - e0
            bad = ~torch.isfinite(losses)
            if bool(bad.any()):
                step = int(bad.nonzero()[0, 0]) + 1
                raise TrainingError(
                    f"the training loss became {float(losses[step - 1])} at epoch {epoch}, step {step}: "
                    "lower trainer.lr or raise the regularization"
                )
            sizes = torch.full((len(losses),), float(self.batch_size), dtype=torch.float64)
            sizes[-1] = n - self.batch_size * (len(losses) - 1)
            epoch_loss = float((losses * sizes).sum() / n)  # per-example mean
            for i, value in enumerate(losses.tolist()):
                self.logger.scalar("train/loss_step", value, self.global_step + i + 1)
            self.global_step += len(losses)
            lr_now = optimizer.optimizers[0].param_groups[0]["lr"]
            record = {"epoch": epoch, "train/loss": epoch_loss, "lr": lr_now}
            self.logger.scalar("train/loss", epoch_loss, epoch)
            self.logger.scalar("lr", lr_now, epoch)
            for sch in schedulers:
                sch.step()
            if val is not None:
                scores = task.evaluate(model, val, train, batch_size=self.eval_batch_size)
                for key, value in scores.items():
                    record[f"val/{key}"] = value
                    self.logger.scalar(f"val/{key}", value, epoch)
            result.history.append(record)
            for callback in self.callbacks:
                callback(self, model, epoch, record)
            if val is None:
                continue
            value = record[f"val/{task.monitor}"]
            if self._improved(value, result.best_metric, task.mode):
                result.best_metric, result.best_epoch = value, epoch
                best_state = copy.deepcopy(model.state_dict())
                bad_epochs = 0
            else:
                bad_epochs += 1
                if self.patience is not None and bad_epochs >= self.patience:
                    log.info("early stop at epoch %d: best val/%s %.4f at epoch %d",
                             epoch, task.monitor, result.best_metric, result.best_epoch)
                    result.stopped_early = True
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        result.fit_seconds = time.perf_counter() - t0
        result.train_ratings_per_second = n * len(result.history) / max(train_seconds, 1e-9)
        return result
