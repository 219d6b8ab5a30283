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

The console of such a sweep (``configs/hydra/{hydra,job}_logging/sweep.yaml``) shows one line per trial
(its number, objective or failure, searched values), then the best trial, the folder and the report
command; each trial's ``train.log`` keeps its full log.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shlex
import time
import warnings

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from recsys_torch.io import atomic_json
from recsys_torch.runfolder import complete_metrics, read_manifest
from recsys_torch.tools.report import direction_of, scalar, split_override

log = logging.getLogger(__name__)

BUDGET_FILE = "budget.json"
# Optuna trial states that used up part of the budget; RUNNING ones were cut off and are redone.
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")

_trial_offset = 0
# What the entry point logs (at ERROR) when a user error ends a trial; the recorder's line says it.
TRIAL_FAILED = "trial failed: "
# Warnings a sweep's console has shown already: each is shown once per sweep, not once per trial.
_shown: set = set()


class _FailureListener(logging.Handler):
    """Hears the reason the entry point logs when a user error ends a trial (``trial failed: ...``,
    as the error path words it: better than the bare exception that ``run.json`` keeps)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reason: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(TRIAL_FAILED):
            self.reason = message[len(TRIAL_FAILED):]


class ConsoleFilter(logging.Filter):
    """The console of a trial in a quiet sweep (``configs/hydra/job_logging/sweep.yaml``): warnings
    and errors, each distinct one once per sweep, except the error a failed trial ends with (the
    recorder's line for the trial gives it); INFO only from the ``loud`` loggers (downloads)."""

    def __init__(self, loud=()) -> None:
        super().__init__()
        self.loud = tuple(loud)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return any(record.name == name or record.name.startswith(name + ".") for name in self.loud)
        message = record.getMessage()
        if record.levelno == logging.ERROR and message.startswith(TRIAL_FAILED):
            return False
        key = (record.name, record.levelno, message)
        if key in _shown:
            return False
        _shown.add(key)
        return True


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
    fixed overrides), keeping those the search space contains. The space is the sweeper's: the
    config's ``params``, then the command line (``'model.reg=interval(0.5, 2)'`` replaces a range,
    ``model.reg=1`` fixes it)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += [str(o) for o in config.hydra.overrides.get("task") or []]
    distributions, fixed = create_params_from_overrides(params)
    for name in fixed:
        distributions.pop(name, None)
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
    with warnings.catch_warnings():  # the one experimental Optuna feature we use, and what it calls
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", r"(enqueue_trial|create_trial|add_trial) is experimental",
                                ExperimentalWarning)
        study.enqueue_trial(values)
    return values


def _next_free_number(sweep_dir: str) -> int:
    numbers = [int(name) for name in os.listdir(sweep_dir) if name.isdigit()] if os.path.isdir(sweep_dir) else []
    return max(numbers) + 1 if numbers else 0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _short(value: str) -> str:
    """An override value for the console: floats to four significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value or "e" in value.lower() else value


def _same(a: str, b: str) -> bool:
    """Two override values that mean the same (``false`` and ``False``, ``1e-3`` and ``0.001``)."""
    try:
        return scalar(a) == scalar(b)
    except Exception:  # noqa: BLE001 -- not YAML: compare the text
        return a == b


def _is_budget(record) -> bool:
    """What :meth:`SweepRecorder._write` adds up: trials with their seconds, sessions with theirs."""
    def numbers(items, key):
        return isinstance(items, list) and all(
            isinstance(x, dict) and isinstance(x.get(key), (int, float)) and not isinstance(x.get(key), bool)
            for x in items)

    return isinstance(record, dict) and numbers(record.get("trials"), "seconds") and \
        numbers(record.get("sessions"), "wall_seconds")


def _first_line(text: str, limit: int = 200) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


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
        self.sweep_dir = ""
        self.record: dict = {}
        self.session: dict = {}
        self._t0 = self._job_t0 = 0.0
        self._fixed: dict[str, str] = {}  # the command line's overrides: what a trial changes was searched
        self._queued: dict | None = None  # the config's own values, queued as this session's first trial
        self._width = 1                   # of the trial numbers, to align the console lines
        self._listener: _FailureListener | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = self.sweep_dir = str(config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)
        _shown.clear()
        self._fixed = dict(split_override(str(o)) for o in config.hydra.overrides.get("task") or [])
        self.path = os.path.join(sweep_dir, self.filename)
        if config.hydra.sweeper.get("storage") is not None:
            self._quiet_optuna(config)
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
        self._width = len(str(_trial_offset + max(int(requested or 1), 1) - 1))
        objective = self.record.get("objective") or "the objective"
        direction = self.record.get("direction") or ""
        if states is not None and requested is not None:
            self._resume(config.hydra.sweeper, len(states), max(int(requested) - finished, 0))
            if states:
                log.info("resuming study %s: %d of %d trials finished, running %d more",
                         config.hydra.sweeper.study_name, finished, requested, config.hydra.sweeper.n_trials)
            else:
                log.info("study %s: %s trial%s, %s %s, in %s", config.hydra.sweeper.study_name, requested,
                         "" if requested == 1 else "s", direction, objective, sweep_dir)
            if self.try_config_values and config.hydra.sweeper.n_trials > 0:
                self._queued = enqueue_config_values(config)
                if self._queued:
                    log.debug("next trial: the config's own values %s", self._queued)
        elif self.record.get("objective"):
            log.info("sweep in %s: %s", sweep_dir, objective)
        else:
            log.info("sweep in %s", sweep_dir)
        self.session = {"started": _now(), "ended": None, "n_trials_requested": requested,
                        "n_trials_finished_before": finished, "n_trials_run": 0, "wall_seconds": 0.0}
        self.record["sessions"].append(self.session)
        self._t0 = time.perf_counter()
        self._write()

    @staticmethod
    def _quiet_optuna(config: DictConfig) -> None:
        """Optuna installs its own colored console handler when first imported: apply Hydra's logging
        config again, so that it decides what Optuna prints too (``hydra_logging/sweep.yaml``:
        warnings only, no color codes)."""
        import optuna  # noqa: F401

        from hydra.core.utils import configure_log

        configure_log(config.hydra.hydra_logging, config.hydra.get("verbose", False))

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
        # after Hydra configured the job's logging, which would drop a handler added before
        self._listener = _FailureListener()
        logging.getLogger("recsys_torch").addHandler(self._listener)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.path is None:  # a single run (no -m): nothing to record
            return
        output_dir = str(config.hydra.runtime.output_dir)
        listener, self._listener = self._listener, None
        if listener is not None:
            logging.getLogger("recsys_torch").removeHandler(listener)
        value, error = None, None
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                # a trial a user error ended returns no objective, or NaN; the Optuna sweeper records
                # None as a failed trial but crashes on being told NaN
                error = (listener.reason if listener is not None else None) or \
                    (read_manifest(output_dir) or {}).get("error") or f"the trial returned {value!r}, no objective"
                value = job_return.return_value = None
        else:  # the trial raised something that is not a user error (a bug): its traceback, then the line
            exc = job_return._return_value
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, BaseException):
                logging.getLogger("recsys_torch.trial").error("the trial in %s raised:", output_dir,
                                                              exc_info=(type(exc), exc, exc.__traceback__))
        trial = {
            "dir": os.path.relpath(output_dir, os.path.dirname(self.path)),
            "overrides": list(job_return.overrides or []),
            "status": "COMPLETED" if error is None else "FAILED",
            "objective": float(value) if value is not None else None,
            "seconds": round(time.perf_counter() - self._job_t0, 3),
        }
        if error is not None:
            trial["error"] = _first_line(error, 300)
        if not self.record.get("objective"):  # a grid without optimized_metric: the task's own
            named = (complete_metrics(output_dir) or {}).get("optimized_metric")
            if isinstance(named, str):
                self.record["objective"] = named
        self.record["trials"].append(trial)
        self.session["n_trials_run"] += 1
        self._write()
        log.info("%s", self.trial_line(trial, first=self.session["n_trials_run"] == 1))

    def trial_line(self, trial: dict, first: bool = False) -> str:
        """``trial 3  val/rmse 0.9041  2.1 s  trainer.lr=0.002 model.reg=1.383 ...``; a failed trial
        has ``failed`` in the objective's column and ``failed: <reason>`` at the end."""
        objective = self.record.get("objective") or "objective"
        params = " ".join(f"{k}={_short(v)}" for k, v in map(split_override, trial["overrides"])
                          if k not in self._fixed or not _same(self._fixed[k], v))
        column = f"{objective} {trial['objective']:.4f}" if trial["objective"] is not None else "failed"
        notes = []
        if trial["objective"] is None:
            notes.append(f"failed: {trial.get('error', 'no objective')}")
        elif self._best() is trial and len(self._finished()) > 1:
            notes.append("best so far")
        if first and self._queued:
            notes.append("the config's own values")
        return (f"trial {trial['dir']:>{self._width}}  {column:<{len(objective) + 7}}  {trial['seconds']:5.1f} s  "
                f"{params}" + "".join(f"  ({note})" for note in notes))

    def _finished(self) -> list[dict]:
        return [t for t in self.record.get("trials", []) if isinstance(t.get("objective"), (int, float))]

    def _best(self) -> dict | None:
        finished = self._finished()
        if not finished:
            return None
        direction = self.record.get("direction") or direction_of(self.record.get("objective") or "")
        return (min if direction == "minimize" else max)(finished, key=lambda t: t["objective"])

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.session["ended"] = _now()
        self._write()
        best = self._best()
        trials = self.record["trials"]
        done = f"{len(self._finished())} of {len(trials)} trials completed, {self.record['trial_seconds']:.0f} s"
        if best is None:
            log.info("no trial completed (%s): see train.log in the trial folders", done)
        else:
            log.info("best: trial %s, %s = %.4f (%s)", best["dir"], self.record.get("objective") or "objective",
                     best["objective"], done)
        log.info("sweep folder: %s", self.sweep_dir)
        log.info("report: python scripts/report.py %s", shlex.quote(self.sweep_dir))

    def _load(self) -> dict | None:
        """The budget of earlier sessions; an unreadable one is set aside as ``budget.json.bad`` and the
        record starts over (the study itself, in optuna.db, is not affected)."""
        if not os.path.exists(self.path):
            return None
        try:
            with open(self.path) as fh:
                record = json.load(fh)
            if _is_budget(record):
                return record
            reason = "not a budget record"
        except (OSError, ValueError) as exc:
            reason = _first_line(exc)
        os.replace(self.path, self.path + ".bad")
        log.warning("%s is unreadable (%s): kept as %s.bad, the budget starts over", self.path, reason, self.filename)
        return None

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
