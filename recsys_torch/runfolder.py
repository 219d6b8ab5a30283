"""The output folder of one run: one run at a time, saved state never deleted unasked, and outputs
that form one set.

- **A lock.** ``.lock`` holds the pid of the run that writes the folder, under an OS file lock that
  dies with its process; a second launch in the same folder is refused before it touches anything.
- **Saved state.** A folder holding the training state of an unfinished run (``last*.pt``) is
  refused unless the run resumes it (``trainer.resume=true``) or asks to start over
  (``overwrite=true``); the finished states of a complete run are cleared when it is run again.
- **One set.** ``run.json`` names the run (a fresh ``run_id``) and says whether it is ``running``,
  ``complete`` or ``failed``; ``metrics.json``, ``checkpoint.pt`` and ``recommend.npz`` carry the same
  ``run_id`` and are written before ``run.json`` turns ``complete``. :func:`complete_metrics` (what
  readers use) accepts only a complete set, so a rerun that fails never leaves an old result that
  looks like its own.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import socket
import sys
import uuid

from recsys_torch.errors import ConfigError, OutputError, user_error
from recsys_torch.io import atomic_json, remove_stale_temporaries
from recsys_torch.signals import check as check_signals
from recsys_torch.signals import forget as forget_signals

LOCK_NAME = ".lock"
MANIFEST_NAME = "run.json"
METRICS_NAME = "metrics.json"
STATE_PATTERNS = ("last.pt", "last-*.pt")

try:
    import fcntl
except ImportError:  # Windows: the lock is the pid file alone
    fcntl = None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_manifest(folder: str) -> dict | None:
    """``run.json`` of a run folder, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def saved_states(folder: str) -> list[str]:
    return sorted(p for pattern in STATE_PATTERNS for p in glob.glob(os.path.join(folder, pattern)))


def holder(folder: str) -> str | None:
    """A description of the live run that holds ``folder``'s lock, or None when it is free."""
    path = os.path.join(folder, LOCK_NAME)
    if not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return _describe(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _describe(path) if _pid_alive(path) else None
    finally:
        os.close(fd)


def _describe(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "another process"


def _pid_alive(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        if info.get("host") != socket.gethostname():
            return True  # cannot tell: assume it lives
        os.kill(int(info["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


class RunFolder:
    """``with RunFolder(path, resume=..., overwrite=...) as run:`` holds the folder for one run;
    :meth:`finish` marks its outputs complete (call it after writing them). Leaving the block by an
    exception marks the run ``failed``."""

    def __init__(self, path: str, resume: bool = False, overwrite: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.resume, self.overwrite = bool(resume), bool(overwrite)
        self.run_id = uuid.uuid4().hex[:12]
        self._fd: int | None = None

    def __enter__(self) -> "RunFolder":
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the run folder {self.path}: {exc.strerror or exc}") from None
        self._lock()
        forget_signals()  # what stopped an earlier run in this process (a notebook) is not this run's
        try:
            self._check_saved_state()
            remove_stale_temporaries(self.path)
            self._write_manifest("running")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if kind is not None and (read_manifest(self.path) or {}).get("status") == "running":
                cause = user_error(exc) or exc  # the user error inside Hydra's wrapping, when there is one
                reason = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else kind.__name__
                try:
                    self._write_manifest("failed", error=reason)
                except OutputError:
                    pass  # a full disk: the running manifest stays, which readers also refuse
        finally:
            self._unlock()
        return False

    def finish(self, files: list[str]) -> None:
        """The run's outputs (``files``, names inside the folder) are written: mark the set complete,
        unless a SIGINT or SIGTERM reached the process (its exception may have been swallowed, e.g.
        inside a finalizer): then the run fails."""
        check_signals()
        self._write_manifest("complete", files=files)

    # ---- internals ------------------------------------------------------------------------------
    def _write_manifest(self, status: str, **extra) -> None:
        previous = read_manifest(self.path) or {}
        started = previous.get("started") if previous.get("run_id") == self.run_id else _now()
        manifest = {"run_id": self.run_id, "status": status, "started": started, "pid": os.getpid(),
                    "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else []}
        if status != "running":
            manifest["ended"] = _now()
        atomic_json(os.path.join(self.path, MANIFEST_NAME), {**manifest, **extra})

    def _lock(self) -> None:
        path = os.path.join(self.path, LOCK_NAME)
        who = holder(self.path)
        if who is not None:
            raise OutputError(f"{self.path} is in use by another run ({who}): wait for it to finish, or choose "
                              "another hydra.run.dir")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write in the run folder {self.path}: {exc.strerror or exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(f"{self.path} is in use by another run ({_describe(path)}): wait for it to "
                                  "finish, or choose another hydra.run.dir") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, info)
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot write in the run folder {self.path}: {exc.strerror or exc}") from None
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(os.path.join(self.path, LOCK_NAME))
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _check_saved_state(self) -> None:
        saved = saved_states(self.path)
        if not saved or self.resume:
            return
        manifest = read_manifest(self.path)
        completed = (manifest.get("status") == "complete" if manifest is not None
                     else os.path.exists(os.path.join(self.path, METRICS_NAME)))  # a folder from before run.json
        unfinished = [p for p in saved if not _finished_state(p)] if completed else saved
        if not unfinished or self.overwrite:
            for path in saved:  # the finished states of a run that completed, or asked to start over
                os.unlink(path)
            return
        names = ", ".join(os.path.basename(p) for p in unfinished)
        raise ConfigError(
            f"{self.path} holds the saved state of an unfinished run ({names}): add trainer.resume=true to "
            "continue it, overwrite=true to delete it and start over, or choose another hydra.run.dir"
        )


def _finished_state(path: str) -> bool:
    """Whether ``path`` is the small state a fit leaves when it is over (nothing to lose by deleting
    it); an unreadable file counts as unfinished."""
    from recsys_torch.errors import CheckpointError
    from recsys_torch.io import safe_torch_load

    try:
        state = safe_torch_load(path)
    except CheckpointError:
        return False
    return isinstance(state, dict) and state.get("finished") is True


def complete_metrics(folder: str) -> dict | None:
    """The metrics of a run whose outputs form a complete set, else None: ``run.json`` says
    ``complete`` and ``metrics.json`` carries its ``run_id``. A folder from before ``run.json``
    existed is taken as it is."""
    try:
        with open(os.path.join(folder, METRICS_NAME), encoding="utf-8") as fh:
            metrics = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    manifest = read_manifest(folder)
    if manifest is None:
        return None if os.path.exists(os.path.join(folder, MANIFEST_NAME)) else metrics
    if manifest.get("status") != "complete" or metrics.get("run_id") != manifest.get("run_id"):
        return None
    return metrics
