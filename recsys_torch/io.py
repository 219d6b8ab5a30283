"""Run outputs written atomically (temporary file, then rename) and checkpoints that load with
``torch.load(weights_only=True)``: tensors, strings, numbers, lists and dicts only, never pickled code."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import warnings

import torch

from recsys_torch.data.features import Features
from recsys_torch.errors import CheckpointError

CHECKPOINT_FORMAT = "recsys_torch/1"
TMP_PREFIX = ".tmp-"  # files of unfinished atomic writes
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


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


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def atomic_json(path: str, data: dict) -> None:
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n"
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_npz(path: str, arrays: dict) -> None:
    """numpy arrays into one ``.npz`` file (loadable with ``allow_pickle=False``)."""
    import numpy as np

    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def atomic_torch_save(path: str, obj: dict) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(path: str, model, cfg, dataset, train, metrics: dict | None = None, seen=None) -> None:
    """Weights, id maps, feature tables, the training interactions (to exclude rated items when
    recommending) and the resolved config; then ``recommend.npz`` beside it (see
    :mod:`recsys_torch.recommend`). ``seen``: other rows to exclude when recommending (a ranking
    run's ratings below its threshold)."""
    from omegaconf import DictConfig, OmegaConf  # only for writing: loading stays light

    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    inter = dataset.interactions
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_target": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": {k: v for k, v in (config.get("model") or {}).items() if k != "_target_"},
        "n_users": inter.n_users,
        "n_items": inter.n_items,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "user_ids": [str(x) for x in inter.user_ids],
        "item_ids": [str(x) for x in inter.item_ids],
        "item_titles": list(dataset.item_titles) if dataset.item_titles else None,
        "item_features": dataset.item_features.state() if dataset.item_features is not None else None,
        "user_features": dataset.user_features.state() if dataset.user_features is not None else None,
        "rating_scale": list(inter.rating_scale) if inter.rating_scale else None,
        "train": {"users": train.users.cpu(), "items": train.items.cpu(), "ratings": train.ratings.cpu()},
        "seen": None if seen is None else {"users": seen.users.cpu(), "items": seen.items.cpu()},
        "config": config,
        "metrics": _json_safe({k: v for k, v in (metrics or {}).items() if k != "folds"}),
    }
    atomic_torch_save(path, state)
    # the frozen tables, beside it, so that recommending for a user starts without torch
    from recsys_torch.recommend import INDEX_NAME, Recommender

    uf = state["user_features"] or {}
    rec = Recommender(model, state["user_ids"], state["item_ids"], state["item_titles"], train.users.cpu(),
                      train.items.cpu(), train.ratings.cpu(), config, state["rating_scale"], uf.get("vocab"),
                      uf.get("dense_names"), None if seen is None else seen.users.cpu(),
                      None if seen is None else seen.items.cpu())
    rec.save_index(os.path.join(os.path.dirname(os.path.abspath(path)), INDEX_NAME), path)


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only. A file that
    needs any other pickled object (a class, a function such as ``os.system``) is refused before that
    object is built, so nothing in it runs."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely; refuse anything that needs pickled code."""
    state = safe_torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a recsys_torch checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def model_from_checkpoint(state: dict):
    """Rebuild the model of a checkpoint (only classes inside recsys_torch.models are allowed)."""
    import importlib

    target = state["model_target"]
    module_name, _, cls_name = target.rpartition(".")
    if not module_name.startswith("recsys_torch.models"):
        raise CheckpointError(f"checkpoint names a model outside recsys_torch.models: {target}")
    cls = getattr(importlib.import_module(module_name), cls_name)
    item_features = Features.from_state(state["item_features"]) if state.get("item_features") else None
    user_features = Features.from_state(state["user_features"]) if state.get("user_features") else None
    model = cls(n_users=state["n_users"], n_items=state["n_items"], item_features=item_features,
                user_features=user_features, **state["model_config"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model
