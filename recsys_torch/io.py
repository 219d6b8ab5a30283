"""The floor of the package: files written atomically (a temporary file, then a rename) and torch files
loaded safely (``torch.load(weights_only=True)``: tensors, strings, numbers, lists and dicts only, never
pickled code). Imports nothing of recsys_torch but its errors; the file formats live in
:mod:`recsys_torch.checkpoint`."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import warnings

from recsys_torch.errors import CheckpointError, OutputError

TMP_PREFIX = ".tmp-"  # files of unfinished atomic writes
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write) -> None:
    """Write ``path`` whole or not at all. A full disk or a folder that cannot be written is an
    :class:`OutputError` naming the file (the old file, if any, is left as it was)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(exc)
        if cause is not None:
            reason = cause.strerror or str(cause) or type(cause).__name__
            raise OutputError(f"cannot write {path}: {reason}") from None
        if isinstance(exc, RuntimeError) and _torch_write_failure(str(exc)):  # torch.save's own file writer
            raise OutputError(f"cannot write {path}: {str(exc).strip().splitlines()[0][:160]}") from None
        raise
    _fsync_folder(folder)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or one it was raised from or while handling: torch.save
    raises a RuntimeError of its own when the disk fills, while the OSError is being handled)."""
    if not isinstance(exc, Exception):  # an interrupt stays an interrupt, whatever it interrupted
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _torch_write_failure(message: str) -> bool:
    """torch.save's zip writer failing (``PytorchStreamWriter failed writing file``, ``[enforce fail
    at inline_container.cc] unexpected pos``), as on a full disk."""
    lowered = message.lower()
    return "write" in lowered or "inline_container" in lowered


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable: without it a power cut can still lose the new name."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str) -> int:
    """Delete the temporary files of writes that a killed process never finished; their count."""
    removed = 0
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def atomic_json(path: str, data: dict) -> None:
    text = json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_npz(path: str, arrays: dict) -> None:
    """numpy arrays into one ``.npz`` file (loadable with ``allow_pickle=False``)."""
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def atomic_torch_save(path: str, obj: dict) -> None:
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only. A file that
    needs any other pickled object (a class, a function such as ``os.system``) is refused before that
    object is built, so nothing in it runs."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = _UNSAFE_GLOBAL.search(str(exc))
        named = f" (it asks for {culprit.group(1)})" if culprit else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects that a recsys_torch checkpoint "
            f"never contains{named}; do not load it unless you trust where it came from"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zip errors... on corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: not a readable checkpoint ({first[:200]})") from None
