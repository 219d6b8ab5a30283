"""The Python API, for notebooks: what ``scripts/train.py`` and ``scripts/recommend.py`` do, without
Hydra and without a command line.

    import recsys_torch as rt

    data = rt.load("ratings.csv", columns={"user": "userId", "item": "movieId"})   # a path, a DataFrame or "ml100k"
    run = rt.fit(data, model="mf", split="random", out="runs/mf")                  # trainer settings as keywords
    print(run.metrics["test/rmse"])
    run.recommend("1", k=10)

``fit`` starts from the same defaults as the command line (the files in ``configs/``), trains with the
same trainer (progress bar, TensorBoard events under ``out/tb``, ``last.pt`` to resume) and writes the
same run folder, which ``scripts/recommend.py run_dir=...`` and ``scripts/report.py`` read.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import yaml

from recsys_torch.cli import CONFIG_DIR
from recsys_torch.data.dataset import Dataset, encode
from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import ConfigError
from recsys_torch.experiment import make_experiment, run
from recsys_torch.runfolder import RunFolder
from recsys_torch.tasks import warn_unused_model_settings

MODELS = ("popularity", "baseline", "mf", "content", "hybrid")
SPLITS = ("random", "kfold", "user", "temporal", "leave_last", "cold_item", "cold_user")
TASKS = ("rating", "ranking")
_MOVIELENS = ("ml100k", "ml-100k", "ml1m", "ml-1m", "ml10m", "ml-10m", "ml20m", "ml-20m", "ml25m", "ml-25m",
              "ml_latest_small", "ml-latest-small")


def _config(group: str, name: str) -> tuple[str, dict, dict]:
    """``(target, settings, trainer settings)`` of ``configs/<group>/<name>.yaml``, the command line's
    defaults (a file in the global package may also set the trainer)."""
    path = os.path.join(CONFIG_DIR, group, f"{name}.yaml")
    if not os.path.exists(path):
        options = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))
        raise ConfigError(f"unknown {group} {name!r} (choose one of {', '.join(options)})")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    node = yaml.safe_load(text) or {}
    trainer = {}
    if text.startswith("# @package _global_"):
        trainer, node = node.get("trainer") or {}, node.get(group) or {}
    node = {k: v for k, v in node.items() if k != "defaults"}
    target = node.pop("_target_")
    return target, node, trainer


def _preset(model: str, task: str) -> dict:
    """``configs/preset/<model>_<task>.yaml`` as ``{"model": ..., "task": ..., "trainer": ...}`` (empty
    when the pair has none): the settings the command line's ``optional preset`` picks for a model
    under a task its own defaults are not for."""
    path = os.path.join(CONFIG_DIR, "preset", f"{model}_{task}.yaml")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def _target(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load(source, *, columns: dict | None = None, items=None, item_id: str = "item", item_title: str | None = None,
         item_features: dict | None = None, users=None, user_id: str = "user", user_features: dict | None = None,
         rating_scale=None, duplicates: str = "last", **loader_args) -> Dataset:
    """A data set, encoded: ``"ml100k"`` (and the other MovieLens names), a ratings file (csv, tsv,
    parquet: see ``data=csv``), or a pandas DataFrame with the columns named in ``columns`` (``user``,
    ``item``, ``rating``, optional ``timestamp`` and ``weight``). ``items`` / ``users``: feature tables
    (paths or DataFrames) whose columns ``item_features`` / ``user_features`` map to ``categorical``,
    ``numeric`` or ``multi:SEP``."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, RawDataset):
        return encode(source)
    if isinstance(source, str) and source.lower() in _MOVIELENS:
        from recsys_torch.data.movielens import movielens

        return encode(movielens(source, duplicates=duplicates, **loader_args))
    from recsys_torch.data import tabular

    return encode(tabular.csv(source, columns=columns, items=items, item_id=item_id, item_title=item_title,
                              item_features=item_features, users=users, user_id=user_id, user_features=user_features,
                              rating_scale=rating_scale, duplicates=duplicates, **loader_args))


@dataclass
class Run:
    """A trained run: its folder, metrics and model; ``recommend`` and ``similar`` ask it."""

    path: str
    metrics: dict
    model: object

    @property
    def recommender(self):
        from recsys_torch.recommend import Recommender

        if not hasattr(self, "_recommender"):
            self._recommender = Recommender.load(self.path)
        return self._recommender

    def recommend(self, user, k: int = 10, exclude_rated: bool = True) -> list:
        """The top ``k`` items for a user of the run (raw id), best first, each with a reason."""
        return self.recommender.recommend(user, k, exclude_rated)

    def similar(self, item, k: int = 10) -> list:
        """The ``k`` items most similar to an item (cosine of the item vectors)."""
        return self.recommender.similar_items(item, k)


def _check_names(what: str, given: dict, cls, internal=()) -> None:
    """Refuse keywords that ``cls`` does not take (before any data is read), naming the close ones."""
    import inspect

    from recsys_torch.cli import _did_you_mean

    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *internal)]
    for name in given:
        if name not in known:
            raise ConfigError(f"unknown {what} {name!r}{_did_you_mean(name, known)}; "
                              f"the settings are: {', '.join(known)}")


def fit(data, model: str = "mf", split: str = "random", task: str = "rating", out: str | None = None, *,
        seed: int = 42, model_args: dict | None = None, split_args: dict | None = None,
        task_args: dict | None = None, tensorboard: bool = True, **trainer_args) -> Run:
    """Train ``model`` on ``data`` (a :func:`load` result, or anything :func:`load` takes), evaluate it
    on the test part of ``split``, and write the run folder ``out`` (default ``runs/<model>-<time>``).
    ``model_args`` / ``split_args`` / ``task_args`` and the trainer keywords (``epochs``, ``lr``,
    ``batch_size``, ``device``, ``refit``, ``resume``, ...) override the defaults in ``configs/``."""
    from recsys_torch.loggers import NullLogger, TensorBoardLogger
    from recsys_torch.trainer import Trainer

    _check_names("trainer setting", trainer_args, Trainer, ("logger", "callbacks", "checkpoint_path", "checkpoint_meta",
                                                             "seed"))
    model_target, model_settings, model_trainer = _config("model", model)
    _check_names(f"model_args key of {model}", model_args or {}, _target(model_target),
                 ("n_users", "n_items", "item_features", "user_features"))
    dataset = load(data)
    split_target, split_settings, _ = _config("split", split)
    task_target, task_settings, _ = _config("task", task)
    _, trainer_settings, _ = _config("trainer", "default")
    preset = _preset(model, task)  # as train.yaml composes: defaults, the model file, the preset, then yours
    model_settings.update(preset.get("model") or {})
    task_settings.update(preset.get("task") or {})
    model_settings.update(model_args or {})
    split_settings.update(split_args or {})
    task_settings.update(task_args or {})
    trainer_settings = {**trainer_settings, **model_trainer, **(preset.get("trainer") or {}), **trainer_args}
    the_task = _target(task_target)(**task_settings)
    warn_unused_model_settings(getattr(the_task, "loss_name", None), model_args or {})
    experiment = make_experiment(dataset, the_task, functools.partial(_target(split_target), **split_settings), seed)
    model_class = _target(model_target)
    out = out or os.path.join("runs", f"{model}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
    config = {"model": {"_target_": model_target, **model_settings}, "task": the_task.config(),
              "split": {"_target_": split_target, **split_settings}, "trainer": trainer_settings, "seed": seed,
              "data": {"name": dataset.name}}

    def make_model():
        return model_class(n_users=dataset.n_users, n_items=dataset.n_items, item_features=dataset.item_features,
                           user_features=dataset.user_features, **model_settings)

    def make_trainer(**settings):
        return Trainer(**{**trainer_settings, "checkpoint_meta": config, **settings})

    def make_logger(fold):
        if not tensorboard:
            return NullLogger()
        return TensorBoardLogger(os.path.join(out, "tb", fold) if fold else os.path.join(out, "tb"))

    identity = {"model": model_class.__name__, "data": dataset.name, "split": split, "task": the_task.name, "seed": seed}
    with RunFolder(out, resume=bool(trainer_settings.get("resume"))) as folder:
        metrics = run(experiment, make_model, make_trainer, out, config, folder, make_logger, hparams=identity)
    from recsys_torch.checkpoint import load_checkpoint, model_from_checkpoint

    return Run(out, metrics, model_from_checkpoint(load_checkpoint(os.path.join(out, "checkpoint.pt"))))


def open_run(path: str) -> Run:
    """A run folder written by :func:`fit` or ``scripts/train.py``."""
    from recsys_torch.checkpoint import load_checkpoint, model_from_checkpoint
    from recsys_torch.runfolder import complete_metrics

    metrics = complete_metrics(path)
    if metrics is None:
        raise ConfigError(f"{path} holds no complete run (metrics.json and run.json)")
    return Run(path, metrics, model_from_checkpoint(load_checkpoint(os.path.join(path, "checkpoint.pt"))))
