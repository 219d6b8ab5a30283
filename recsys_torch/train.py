"""The experiment: :func:`build` turns a config into data, a task and splits; :func:`train` runs it and
writes the run folder; :func:`main` is the thin ``@hydra.main`` entry of ``scripts/train.py``.

Hydra and OmegaConf stay in this module, :mod:`recsys_torch.cli` and :mod:`recsys_torch.tools`;
everything called from here is plain Python (``Trainer(...).fit(model, train, val)``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_torch import cli
from recsys_torch.checks import number
from recsys_torch.data.dataset import Dataset, encode
from recsys_torch.errors import ConfigError, TrainingInterrupted
from recsys_torch.experiment import Experiment, make_experiment, run
from recsys_torch.loggers import NullLogger
from recsys_torch.runfolder import RunFolder
from recsys_torch.tasks import Task, warn_unused_model_settings

log = logging.getLogger("recsys_torch")

CONFIG_DIR = cli.CONFIG_DIR
# Settings that change neither the numbers nor the saved state: a run may resume with other values.
RESUME_FREE_KEYS = {"trainer": ("resume", "progress", "num_threads", "eval_batch_size"), "logger": None,
                    "overwrite": None}


def load_data(cfg: DictConfig) -> Dataset:
    """The config's data set, loaded and encoded."""
    return encode(instantiate(cfg.data, _convert_="all"))


def build(cfg: DictConfig) -> Experiment:
    """Data, task and splits of an experiment: the one way every script puts them together."""
    cli.check_keys(cfg)
    seed = number("seed", cfg.get("seed"), int, 0, 2**63 - 1)
    return make_experiment(load_data(cfg), instantiate(cfg.task), instantiate(cfg.split, _partial_=True), seed)


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
    experiment = build(cfg)
    target = objective(cfg, experiment.task)
    if need_objective and any(len(split.val) == 0 for split in experiment.splits):
        raise ConfigError(f"a sweep optimizes {target}, and this split leaves no validation ratings: give "
                          "split.val > 0")
    meta = run_meta(cfg)
    trainer_settings = OmegaConf.to_container(cfg.trainer, resolve=True)

    def make_trainer(**settings):
        # partial, then called: Hydra would try to instantiate the _target_ entries inside the meta dict
        return instantiate(trainer_settings, _partial_=True)(checkpoint_meta=meta, **settings)

    return run(experiment, model_factory(cfg, experiment.dataset), make_trainer, output_dir,
               OmegaConf.to_container(cfg, resolve=True), folder,
               make_logger=lambda fold: _logger_for(cfg, output_dir, fold), hparams=_flat_hparams(cfg, experiment),
               extra={"optimized_metric": target})


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    output_dir = HydraConfig.get().runtime.output_dir
    preset = HydraConfig.get().runtime.choices.get("preset")
    # picked by model and task, not typed: say so, when that pair has one (the default is optional)
    if preset and os.path.exists(os.path.join(cli.CONFIG_DIR, "preset", f"{preset}.yaml")):
        log.info("preset %s: configs/preset/%s.yaml sets this model's settings for this task (any of them can be "
                 "overridden on the command line)", preset, preset)
    typed = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    warn_unused_model_settings(cfg.task.get("loss"), [k[len("model."):] for k in typed if k.startswith("model.")])
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return _trial(cfg, output_dir)
    with cli.errors():
        metrics = train(cfg, output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            print(cli.summary(metrics, output_dir))
        except BrokenPipeError:  # train.py | head: the run is complete, its summary has no reader
            sys.exit(cli.stdout_closed())
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
    except TrainingInterrupted:
        raise  # a SIGINT / SIGTERM stops the sweep, not just this trial
    except Exception as exc:  # noqa: BLE001 -- a bug still raises below
        found = cli.error_line(exc)
        if found is None:
            raise
        log.error("trial failed: %s", found[0])
        return None
    value = metrics.get(metrics["optimized_metric"])
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
