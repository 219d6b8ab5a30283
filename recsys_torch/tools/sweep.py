"""Hydra sweep plumbing for ``configs/hparams_search/*``: an Optuna study stored in the sweep folder,
trial folders numbered on from the ones already there, and a record of the tuning budget.

Everything here is wired by the hparams_search configs::

    hydra.callbacks.sweep_recorder._target_: recsys_torch.callbacks.SweepRecorder
    hydra.sweep.subdir: ${trial_dir:${hydra.job.num}}
    hydra.sweeper.storage: {_target_: recsys_torch.callbacks.sqlite_storage, path: ...}

Re-running a sweep's command with the same ``hydra.sweep.dir`` resumes it: the study is loaded from
its database, ``hydra.sweeper.n_trials`` counts the trials already finished, new trial folders get
new numbers (the Optuna trial numbers) instead of overwriting old ones, and ``budget.json`` adds a
session. Optuna is imported only when a sweep actually uses a database.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from recsys_torch.io import atomic_json

log = logging.getLogger(__name__)

BUDGET_FILE = "budget.json"
# Optuna trial states that used up part of the budget; RUNNING ones were cut off and are redone.
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")

_trial_offset = 0


def trial_dir(job_num) -> str:
    """Folder name of a sweep job: its number in this session plus the trials already in the folder."""
    return str(int(job_num) + _trial_offset)


OmegaConf.register_new_resolver("trial_dir", trial_dir, replace=True)


def _commit_optuna_schema_stamp() -> None:
    """Optuna 2.x (the Hydra sweeper pins optuna<3) stamps a new database's schema version on a
    connection that it never commits. SQLAlchemy 2 rolls that back, so opening any new sqlite study
    fails with a bare AssertionError; commit the stamp as optuna 3 does."""
    import optuna
    import sqlalchemy

    if int(sqlalchemy.__version__.split(".")[0]) < 2 or int(optuna.__version__.split(".")[0]) >= 3:
        return
    import alembic.migration
    from optuna.storages._rdb import storage as rdb

    def _set_alembic_revision(self, revision: str) -> None:
        with self.engine.connect() as conn:
            context = alembic.migration.MigrationContext.configure(conn)
            context.stamp(self._create_alembic_script(), revision)
            conn.commit()

    rdb._VersionManager._set_alembic_revision = _set_alembic_revision


def sqlite_storage(path: str):
    """An Optuna storage in the sqlite file ``path`` (its folder is created)."""
    import optuna

    _commit_optuna_schema_stamp()
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return optuna.storages.get_storage(f"sqlite:///{path}")


def _open_storage(storage_cfg):
    if storage_cfg is None:
        return None
    if isinstance(storage_cfg, str):
        if storage_cfg.startswith("sqlite:///"):
            return sqlite_storage(storage_cfg[len("sqlite:///"):])
        import optuna

        return optuna.storages.get_storage(storage_cfg)
    from hydra.utils import instantiate

    return instantiate(storage_cfg)


def stored_study(sweeper_cfg: DictConfig, create: bool = False):
    """The sweeper's study in its storage; None when it keeps none on disk (no storage, no study
    name, or not the Optuna sweeper) or, unless ``create``, when the study does not exist yet."""
    if sweeper_cfg.get("storage") is None or not sweeper_cfg.get("study_name"):
        return None
    import optuna

    storage = _open_storage(sweeper_cfg.storage)
    if create:
        direction = sweeper_cfg.get("direction", "minimize")
        directions = [str(d) for d in direction] if OmegaConf.is_list(direction) else [str(direction)]
        return optuna.create_study(study_name=sweeper_cfg.study_name, storage=storage, directions=directions,
                                   load_if_exists=True)
    try:
        return optuna.load_study(study_name=sweeper_cfg.study_name, storage=storage)
    except KeyError:  # optuna 2.x: no study of that name yet
        return None


def study_trial_states(sweeper_cfg: DictConfig) -> list[str] | None:
    """States of the trials already in the stored study ([] for a new one; None: nothing stored)."""
    if sweeper_cfg.get("storage") is None or not sweeper_cfg.get("study_name"):
        return None
    study = stored_study(sweeper_cfg)
    return [t.state.name for t in study.get_trials(deepcopy=False)] if study is not None else []


def config_values_in_space(config: DictConfig) -> dict:
    """The composed config's own values of the searched parameters (the shipped defaults plus any
    fixed overrides), keeping those the search space contains."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = config.hydra.sweeper.get("params") or {}
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    out = {}
    for name, distribution in distributions.items():
        value = OmegaConf.select(config, name.lstrip("+"), default=None)
        try:
            if value is not None and distribution._contains(distribution.to_internal_repr(value)):
                out[name] = value
        except (ValueError, TypeError):  # a categorical without that value
            pass
    return out


def enqueue_config_values(config: DictConfig) -> dict | None:
    """Queue the config's own values as the next trial unless a trial already has them, so a sweep
    always measures the defaults it is meant to beat. Returns what was queued."""
    values = config_values_in_space(config)
    study = stored_study(config.hydra.sweeper, create=True)
    if not values or study is None:
        return None
    for trial in study.get_trials(deepcopy=False):
        if all(trial.params.get(k) == v for k, v in values.items()) and trial.state.name != "FAIL":
            return None
    study.enqueue_trial(values)
    return values


def _next_free_number(sweep_dir: str) -> int:
    numbers = [int(name) for name in os.listdir(sweep_dir) if name.isdigit()] if os.path.isdir(sweep_dir) else []
    return max(numbers) + 1 if numbers else 0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class SweepRecorder(Callback):
    """Resumes a stored Optuna study and writes ``budget.json`` in the sweep folder after every job:
    the trials run (folder, overrides, status, objective, seconds) and each session's wall time, so
    that models can be compared at equal tuning budget even when a sweep was interrupted.

    With ``try_config_values`` the config's own values of the searched parameters (the defaults) are
    queued as a trial unless one already has them: a sweep's best is never worse than what it tunes."""

    def __init__(self, filename: str = BUDGET_FILE, try_config_values: bool = True) -> None:
        self.filename = filename
        self.try_config_values = try_config_values
        self.path: str | None = None
        self.record: dict = {}
        self.session: dict = {}
        self._t0 = self._job_t0 = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)
        self.path = os.path.join(sweep_dir, self.filename)
        self.record = self._load() or {
            "objective": config.get("optimized_metric"),
            "direction": str(config.hydra.sweeper.get("direction", "")) or None,
            "study_name": config.hydra.sweeper.get("study_name"),
            "sessions": [], "trials": [],
        }
        states = study_trial_states(config.hydra.sweeper)
        requested = config.hydra.sweeper.get("n_trials")
        finished = sum(s in FINISHED_STATES for s in states or [])
        self._number_trials_on(config, len(states or []))
        if states is not None and requested is not None:
            self._resume(config.hydra.sweeper, len(states), max(int(requested) - finished, 0))
            if states:
                log.info("resuming study %s: %d of %d trials finished, running %d more",
                         config.hydra.sweeper.study_name, finished, requested, config.hydra.sweeper.n_trials)
            if self.try_config_values and config.hydra.sweeper.n_trials > 0:
                queued = enqueue_config_values(config)
                if queued:
                    log.info("next trial: the config's own values %s", queued)
        self.session = {"started": _now(), "ended": None, "n_trials_requested": requested,
                        "n_trials_finished_before": finished, "n_trials_run": 0, "wall_seconds": 0.0}
        self.record["sessions"].append(self.session)
        self._t0 = time.perf_counter()
        self._write()

    @staticmethod
    def _number_trials_on(config: DictConfig, n_existing: int) -> None:
        """Folder k is Optuna trial k when nothing else writes to the study; never overwrite one."""
        global _trial_offset
        _trial_offset = max(n_existing, _next_free_number(str(config.hydra.sweep.dir)))
        # Each job's config is recomposed from the hydra overrides; one set here beats any config file.
        with read_write(config.hydra.overrides):
            config.hydra.overrides.hydra.append("hydra.sweep.subdir='${trial_dir:${hydra.job.num}}'")

    @staticmethod
    def _resume(sweeper_cfg: DictConfig, n_existing: int, remaining: int) -> None:
        """n_trials becomes the study's total budget, so re-running the same command finishes the
        rest; a seeded sampler restarted with its seed would replay the trials it proposed first."""
        with read_write(sweeper_cfg), open_dict(sweeper_cfg):
            sweeper_cfg.n_trials = remaining
            sampler = sweeper_cfg.get("sampler")
            if n_existing and sampler is not None and sampler.get("seed") is not None:
                sampler.seed = int(sampler.seed) + n_existing

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self._job_t0 = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.path is None:  # a single run (no -m): nothing to record
            return
        completed = job_return.status == JobStatus.COMPLETED
        value = job_return.return_value if completed else None
        self.record["trials"].append({
            "dir": os.path.relpath(str(config.hydra.runtime.output_dir), os.path.dirname(self.path)),
            "overrides": list(job_return.overrides or []),
            "status": job_return.status.name,
            "objective": float(value) if isinstance(value, (int, float)) else None,
            "seconds": round(time.perf_counter() - self._job_t0, 3),
        })
        self.session["n_trials_run"] += 1
        self._write()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.session["ended"] = _now()
        self._write()

    def _load(self) -> dict | None:
        if not os.path.exists(self.path):
            return None
        with open(self.path) as fh:
            return json.load(fh)

    def _write(self) -> None:
        self.session["wall_seconds"] = round(time.perf_counter() - self._t0, 3)
        trials = self.record["trials"]
        totals = {
            "n_trials": len(trials),
            "n_completed": sum(t["status"] == "COMPLETED" for t in trials),
            "trial_seconds": round(sum(t["seconds"] for t in trials), 3),
            "wall_seconds": round(sum(s["wall_seconds"] for s in self.record["sessions"]), 3),
        }
        self.record = {**totals, **{k: v for k, v in self.record.items() if k not in totals}}
        atomic_json(self.path, self.record)
