"""The experiment: :func:`build` turns a config into data, a task and splits; :func:`train` runs it and
writes the run folder; :func:`main` is the thin ``@hydra.main`` entry of ``scripts/train.py``.

Hydra and OmegaConf stay in this module, :mod:`recsys_torch.cli` and :mod:`recsys_torch.tools`;
everything called from here is plain Python (``Trainer(...).fit(model, train, val)``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_torch import cli
from recsys_torch.checkpoint import save_checkpoint
from recsys_torch.checks import number
from recsys_torch.data.dataset import Dataset, encode
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError, TrainingError
from recsys_torch.io import atomic_json
from recsys_torch.loggers import NullLogger
from recsys_torch.metrics import aggregate_folds, unknown_counts
from recsys_torch.recommend import INDEX_NAME, write_index
from recsys_torch.runfolder import METRICS_NAME, RunFolder
from recsys_torch.splits import Split
from recsys_torch.tasks import Task

log = logging.getLogger("recsys_torch")

CONFIG_DIR = cli.CONFIG_DIR
CHECKPOINT_NAME = "checkpoint.pt"
# Settings that change neither the numbers nor the saved state: a run may resume with other values.
RESUME_FREE_KEYS = {"trainer": ("resume", "progress", "num_threads", "eval_batch_size"), "logger": None,
                    "overwrite": None}


@dataclass
class Experiment:
    """What a config describes, built once: the encoded data, the task, the task's view of the
    interactions (a ranking task keeps the positives) and the splits of that view."""

    dataset: Dataset
    task: Task
    interactions: Interactions
    splits: list[Split]
    seed: int


def load_data(cfg: DictConfig) -> Dataset:
    """The config's data set, loaded and encoded."""
    return encode(instantiate(cfg.data, _convert_="all"))


def build(cfg: DictConfig) -> Experiment:
    """Data, task and splits of an experiment: the one way every script puts them together."""
    cli.check_keys(cfg)
    seed = number("seed", cfg.get("seed"), int, 0, 2**63 - 1)
    dataset = load_data(cfg)
    task = instantiate(cfg.task)
    inter = task.prepare_data(dataset.interactions)
    log.info("data %s: %s", dataset.name, inter.describe())
    splits = instantiate(cfg.split, _partial_=True)(inter, seed=seed)
    return Experiment(dataset, task, inter, splits, seed)


def model_factory(cfg: DictConfig, dataset: Dataset) -> Callable:
    """A function that builds a fresh model of the config for this data set."""
    # partial, then called: instantiate would turn the Features objects into config nodes
    build_model = instantiate(cfg.model, _partial_=True)

    def make():
        try:
            return build_model(n_users=dataset.n_users, n_items=dataset.n_items,
                               item_features=dataset.item_features, user_features=dataset.user_features)
        except (TypeError, ValueError) as exc:  # a setting of the wrong type, e.g. model.embedding_dim=abc
            raise ConfigError(f"model: {type(exc).__name__}: {exc} (building {cfg.model._target_})") from None

    return make


def objective(cfg: DictConfig, task: Task) -> str:
    """The metric a sweep optimizes: ``optimized_metric``, or by default the task's validation metric."""
    name = cfg.get("optimized_metric") or f"val/{task.monitor}"
    stage, _, metric = str(name).partition("/")
    if stage != "val":
        raise ConfigError(f"optimized_metric={name}: sweeps tune on validation metrics only (val/...), never on test")
    known = task.metric_names()
    if metric not in known and metric.partition("/")[2] not in known:
        raise ConfigError(f"optimized_metric={name} is not a metric of task {task.name} "
                          f"(its metrics: {', '.join('val/' + m for m in known)})")
    return name


def run_meta(cfg: DictConfig) -> dict:
    """The resolved config a saved training state must match to be resumed."""
    meta = OmegaConf.to_container(cfg, resolve=True)
    for group, keys in RESUME_FREE_KEYS.items():
        if keys is None:
            meta.pop(group, None)
        elif isinstance(meta.get(group), dict):
            for key in keys:
                meta[group].pop(key, None)
    return meta


def _flat_hparams(cfg: DictConfig, experiment: "Experiment | None" = None) -> dict:
    """The run's settings for TensorBoard's HPARAMS table, led by its identity (model, data, split,
    task, seed), so that runs can be told apart."""
    out = {}
    if experiment is not None:
        out["model"] = str(cfg.model._target_).rsplit(".", 1)[-1]
        out["data"] = experiment.dataset.name
        out["split"] = str(cfg.split._target_).rsplit(".", 1)[-1]
        out["task"] = experiment.task.name
    for group in ("model", "trainer", "split", "task"):
        node = OmegaConf.to_container(cfg.get(group) or {}, resolve=True)
        for key, value in node.items():
            if key != "_target_" and not isinstance(value, (dict, list)):
                out[f"{group}.{key}"] = value
    out["seed"] = cfg.seed
    return out


def _logger_for(cfg: DictConfig, output_dir: str, fold: str | None):
    if cfg.get("logger") is None or not cfg.logger.get("_target_"):
        return NullLogger()
    log_dir = os.path.join(output_dir, "tb", fold) if fold else os.path.join(output_dir, "tb")
    return instantiate(cfg.logger, log_dir=log_dir)


def _below_threshold(task: Task, inter: Interactions) -> Interactions | None:
    """A ranking run's ratings under its positive threshold: no training rows, yet items the users
    have seen, so recommend leaves them out too."""
    if task.threshold is None:
        return None
    return inter.subset(inter.ratings < float(task.threshold))


def _fold_metrics(task: Task, model, split: Split, fit, trained_on: Interactions) -> dict:
    """``trained_on`` is ``split.train``, or train + val after a refit: its items are masked when
    ranking and it decides which test users and items count as unknown (cold)."""
    metrics = dict(fit.val_metrics)
    exclude = [] if trained_on is not split.train else [split.val]
    for key, value in task.evaluate(model, split.test, trained_on, exclude=exclude).items():
        metrics[f"test/{key}"] = value
    unknown = unknown_counts(trained_on, split.test)
    metrics.update(
        fit_seconds=fit.fit_seconds,
        train_ratings_per_second=fit.train_ratings_per_second,
        best_epoch=fit.best_epoch,
        n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        n_test_unknown_users=unknown["unknown_users"], n_test_unknown_items=unknown["unknown_items"],
    )
    return metrics


def _final_fit(cfg: DictConfig, experiment: Experiment, fold_metrics: list[dict], meta: dict, output_dir: str,
               result: dict) -> tuple:
    """One model on every rating of the experiment, for the folds' mean number of epochs (without
    validation there is nothing to stop early on): what the run saves."""
    epochs = max(1, round(sum(m["best_epoch"] or cfg.trainer.epochs for m in fold_metrics) / len(fold_metrics)))
    everything = experiment.interactions
    torch.manual_seed(experiment.seed)
    model = model_factory(cfg, experiment.dataset)()
    trainer = instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _partial_=True)(
        seed=experiment.seed, epochs=epochs, patience=None, refit=False, logger=NullLogger(),
        checkpoint_path=os.path.join(output_dir, "last-final.pt"), checkpoint_meta=meta)
    fit = trainer.fit(model, everything, None, experiment.task)
    _check_finite(model, {}, experiment.task, "final fit")
    result.update(final_fit_epochs=epochs, final_fit_seconds=fit.fit_seconds, n_final_fit=len(everything))
    log.info("final fit: %d ratings, %d epochs (the folds' mean), %.1f s", len(everything), epochs, fit.fit_seconds)
    return model, everything


def _warn_about_features(model, dataset: Dataset, split: Split) -> None:
    """Say so when a model built for features gets none, or a cold split tests what the model cannot score."""
    if model.wants_features and dataset.item_features is None and dataset.user_features is None:
        log.warning("%s uses item and user features, and this data set has none: it trains on the ids alone "
                    "(add data.items=... / data.users=... with their features)", type(model).__name__)
    if split.name == "cold_item" and not model.scores_unknown_items:
        log.warning("split=cold_item tests items training never saw, and %s has no item features to score them: "
                    "they get the global mean plus the user's bias", type(model).__name__)
    if split.name == "cold_user" and not model.scores_unknown_users:
        log.warning("split=cold_user tests users training never saw, and %s has no user features to score them: "
                    "they get the global mean plus the item's bias", type(model).__name__)


def _check_finite(model, metrics: dict, task: Task, where: str) -> None:
    """A model or a headline metric that is not a finite number is a failed run, never a result."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{where}: the trained model's {name} is not finite: lower trainer.lr or raise the "
                                "regularization")
    value = metrics.get(f"test/{task.monitor}")
    if isinstance(value, float) and not math.isfinite(value) and metrics.get("n_test"):
        raise TrainingError(f"{where}: test/{task.monitor} is {value}: the model's predictions are not finite")


def train(cfg: DictConfig, output_dir: str | None = None, need_objective: bool = False) -> dict:
    """Run one experiment as configured; write ``metrics.json``, ``checkpoint.pt``,
    ``recommend.npz`` and TensorBoard events into ``output_dir``; return the metrics.

    The training state of each fit is kept in ``last.pt`` (``last-<fold>.pt`` for k folds) and
    ``trainer.resume=true`` continues a killed run from it; folds that had finished are not trained
    again. ``need_objective`` (sweeps): refuse before training when the objective cannot be measured."""
    output_dir = output_dir or os.getcwd()
    resume = bool(cfg.trainer.get("resume", False))
    # under torchrun (trainer=ddp) every rank trains; rank 0 alone writes the run's outputs
    main_rank = not cfg.trainer.get("distributed", False) or int(os.environ.get("RANK", "0")) == 0
    if not main_rank:
        return _train(cfg, output_dir, need_objective, None)
    with RunFolder(output_dir, resume=resume, overwrite=bool(cfg.get("overwrite", False))) as folder:
        return _train(cfg, output_dir, need_objective, folder)


def _train(cfg: DictConfig, output_dir: str, need_objective: bool, folder: RunFolder | None) -> dict:
    t_start = time.perf_counter()
    experiment = build(cfg)
    task, dataset, seed = experiment.task, experiment.dataset, experiment.seed
    target = objective(cfg, task)
    if need_objective and any(len(split.val) == 0 for split in experiment.splits):
        raise ConfigError(f"a sweep optimizes {target}, and this split leaves no validation ratings: give "
                          "split.val > 0")
    meta = run_meta(cfg)
    fold_metrics, first = [], None
    for k, split in enumerate(experiment.splits):
        fold = split.name if len(experiment.splits) > 1 else None
        # Each fold's initial weights come from its own seed, not from what earlier folds drew, so a
        # resumed run that skips finished folds builds the same models.
        torch.manual_seed(seed + k)
        model = model_factory(cfg, dataset)()
        if k == 0:
            _warn_about_features(model, dataset, split)
        logger = _logger_for(cfg, output_dir, fold) if folder is not None else NullLogger()
        # every rank reads it to resume; the trainer lets rank 0 alone write it
        checkpoint = os.path.join(output_dir, f"last-{fold}.pt" if fold else "last.pt")
        # partial: Hydra would try to instantiate the _target_ entries inside the meta dict
        trainer = instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _partial_=True)(
            seed=seed + k, logger=logger, checkpoint_path=checkpoint, checkpoint_meta=meta)
        fit = trainer.fit(model, split.train, split.val, task)
        trained_on = split.train.concat(split.val) if fit.refit else split.train
        metrics = _fold_metrics(task, model, split, fit, trained_on)
        _check_finite(model, metrics, task, split.name)
        logger.hparams(_flat_hparams(cfg, experiment), {k2: v for k2, v in metrics.items() if "/" in k2})
        logger.close()
        fold_metrics.append(metrics)
        if first is None:
            first = (model, trained_on)
        log.info("%s: %s", split.name, ", ".join(f"{key}={value:.4f}" for key, value in metrics.items()
                                                  if key.startswith("test/") and "@" not in key[5:] or key.endswith("@10")))
    result = aggregate_folds(fold_metrics)
    if experiment.splits[0].final_fit:  # k-fold: the folds estimated the error; now the model to keep
        first = _final_fit(cfg, experiment, fold_metrics, meta, output_dir, result)
    result.update(dataset.report)  # rows the data had to drop: n_duplicates_dropped, ...
    result["total_seconds"] = time.perf_counter() - t_start
    result["optimized_metric"] = target
    if folder is not None:
        model, trained_on = first
        result["run_id"] = folder.run_id
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        state = save_checkpoint(path, model, OmegaConf.to_container(cfg, resolve=True), dataset, trained_on, result,
                                seen=_below_threshold(task, dataset.interactions))
        write_index(path, state, model, task)
        atomic_json(os.path.join(output_dir, METRICS_NAME), result)
        folder.finish([CHECKPOINT_NAME, INDEX_NAME, METRICS_NAME])
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    output_dir = HydraConfig.get().runtime.output_dir
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return _trial(cfg, output_dir)
    with cli.errors():
        metrics = train(cfg, output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(cli.summary(metrics, output_dir))
    if cfg.trainer.get("distributed", False):
        from recsys_torch.distributed import teardown

        teardown()
    value = metrics.get(metrics.get("optimized_metric", ""))
    return float(value) if isinstance(value, (int, float)) else None


def _trial(cfg: DictConfig, output_dir: str) -> float | None:
    """One trial of a sweep: its objective, or None when it failed by a user error (a diverging
    learning rate, an impossible setting). The failure is one logged line and ``run.json`` says
    ``failed``; the sweep goes on (Optuna records the trial as failed, a grid just moves on; Optuna
    2.x cannot be told NaN)."""
    try:
        metrics = train(cfg, output_dir, need_objective=True)
    except Exception as exc:  # noqa: BLE001 -- a bug still raises below
        found = cli.error_line(exc)
        if found is None:
            raise
        log.error("trial failed: %s", found[0])
        return None
    value = metrics.get(metrics["optimized_metric"])
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
