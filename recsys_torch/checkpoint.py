"""The two files a run saves with torch, in one place.

``checkpoint.pt``: the trained run (weights, id maps, feature vocabularies, the training rows to
exclude when recommending, the resolved config and the metrics). :func:`model_from_checkpoint` and
:func:`task_from_checkpoint` rebuild what it describes, importing classes only from inside
``recsys_torch.models`` and ``recsys_torch.tasks``.

``last.pt`` (``last-<fold>.pt``, ``last-refit.pt``): the training state that lets a killed run go on
exactly where it stopped (the trainer's :class:`~recsys_torch.trainer.TrainState`, the model,
optimizer and scheduler states, and the random generators), refused when it was saved under other
settings or on other data.

Both load with ``torch.load(weights_only=True)`` (:func:`recsys_torch.io.safe_torch_load`).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass, field, fields

import torch

from recsys_torch.data.features import Features
from recsys_torch.errors import CheckpointError
from recsys_torch.io import atomic_torch_save, json_safe, safe_torch_load

CHECKPOINT_FORMAT = "recsys_torch/1"
LAST_FORMAT = "recsys_torch/last/2"
_OLD_LAST_FORMATS = ("recsys_torch/last/1",)

log = logging.getLogger(__name__)


# ---- checkpoint.pt -------------------------------------------------------------------------------
def save_checkpoint(path: str, model, config: dict, dataset, train, metrics: dict | None = None,
                    seen=None) -> dict:
    """Write ``checkpoint.pt`` atomically and return what was written. ``train``: the rows the model
    learned from (excluded when recommending); ``seen``: other rows to exclude (a ranking run's
    ratings below its threshold); ``config``: the resolved run config as a plain dict."""
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
        "metrics": json_safe({k: v for k, v in (metrics or {}).items() if k != "folds"}),
    }
    atomic_torch_save(path, state)
    return state


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely; refuse anything that needs pickled code or is not ours."""
    state = safe_torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a recsys_torch checkpoint (format {CHECKPOINT_FORMAT})")
    for key in ("state_dict", "model_target", "user_ids", "item_ids"):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r}: it was not written by recsys_torch.train")
    return state


def _class_inside(target: str, package: str, what: str):
    module_name, _, name = str(target).rpartition(".")
    if not (module_name == package or module_name.startswith(package + ".")):
        raise CheckpointError(f"checkpoint names a {what} outside {package}: {target}")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"checkpoint names a {what} this version does not have: {target}") from None


def model_from_checkpoint(state: dict):
    """Rebuild the model of a checkpoint, in eval mode (only classes inside recsys_torch.models)."""
    cls = _class_inside(state["model_target"], "recsys_torch.models", "model")
    item_features = Features.from_state(state["item_features"]) if state.get("item_features") else None
    user_features = Features.from_state(state["user_features"]) if state.get("user_features") else None
    try:
        model = cls(n_users=state["n_users"], n_items=state["n_items"], item_features=item_features,
                    user_features=user_features, **state["model_config"])
        model.load_state_dict(state["state_dict"])
    except Exception as exc:  # weights that do not fit the class, settings it does not take
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot rebuild the model of this checkpoint: {first[:200]}") from None
    return model.eval()


def task_from_config(node: dict | None):
    """A task from its config node (``_target_`` plus settings; only classes inside recsys_torch.tasks);
    the rating task when there is none."""
    from recsys_torch.tasks import RatingTask

    node = dict(node or {})
    target = node.pop("_target_", None)
    if target is None:
        return RatingTask()
    cls = _class_inside(target, "recsys_torch.tasks", "task")
    if target.endswith(".RankingTask") and "negative_weight" not in node:
        node["negative_weight"] = 0.0  # a run from before explicit negatives trained without them
    try:
        return cls(**node)
    except Exception as exc:
        raise CheckpointError(f"cannot rebuild the task of this checkpoint: {str(exc).splitlines()[0][:200]}") from None


def task_from_checkpoint(state: dict):
    """The run's task, rebuilt from the checkpoint's config."""
    return task_from_config((state.get("config") or {}).get("task"))


# ---- last.pt -------------------------------------------------------------------------------------
def save_state(path: str, state: dict) -> None:
    atomic_torch_save(path, {"format": LAST_FORMAT, **state})


def load_state(path: str, meta: dict | None = None) -> dict:
    """Read a training state safely; refuse one saved under a different configuration (``meta``)."""
    state = safe_torch_load(path)
    found = state.get("format") if isinstance(state, dict) else None
    if found in _OLD_LAST_FORMATS:
        raise CheckpointError(f"{path} was saved by an older version of recsys_torch and cannot be resumed: "
                              "start over in another run folder, or delete it")
    if found != LAST_FORMAT:
        raise CheckpointError(f"{path} is not a recsys_torch training state (format {LAST_FORMAT})")
    if meta is not None:
        saved_meta, meta = dict(state.get("meta") or {}), dict(meta)
        saved_data, data = saved_meta.pop("data_fingerprint", None), meta.pop("data_fingerprint", None)
        if saved_data is not None and data is not None and saved_data != data:
            raise CheckpointError(f"{path} was saved on other data (the ratings or the split changed since): resume "
                                  "only on the data it was saved on; start over in another run folder, or with "
                                  "overwrite=true")
        diff = config_diff(saved_meta, meta)
        if diff:
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise CheckpointError(
                f"{path} was saved by a run with other settings ({shown}): resume with the same "
                "settings, or start a new run folder"
            )
    return state


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, f"{name}."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The trainer's generator and torch's global ones (models may draw from those, e.g. dropout)."""
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """What the trainer's epoch loop carries from one epoch to the next, and ``last.pt`` across
    processes. Each field is declared once, here; :meth:`to_dict` and :meth:`from_dict` follow them."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    history: list = field(default_factory=list)
    best_metric: float = math.nan
    best_epoch: int = 0
    best_state: dict | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0  # inside the batch loop (throughput)
    fit_seconds: float = 0.0  # wall time of the fit, earlier processes included (as of the last save)
    partial: dict | None = None  # where a signal stopped the epoch in progress

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def save_training(path: str, meta: dict | None, state: TrainState, model, optimizers, schedulers,
                  generator: torch.Generator, device: torch.device) -> None:
    """Everything a resumed fit needs to go on exactly where this one is (see :func:`restore_training`)."""
    save_state(path, {"meta": meta, "finished": False, "device": device.type,
                      "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "optimizers": optimizers.state_dict(), "schedulers": [s.state_dict() for s in schedulers],
                      "rng": rng_state(generator, device), "progress": state.to_dict()})


def restore_training(path: str, meta: dict | None, model, optimizers, schedulers, generator: torch.Generator,
                     device: torch.device) -> tuple[TrainState, dict | None]:
    """Load the training state in ``path`` into the model and, unless that fit had finished (then the
    state's epoch is -1), the optimizers, schedulers and generators. A missing file starts afresh."""
    if not os.path.exists(path):
        log.warning("trainer.resume: no saved state in %s; starting from the beginning", path)
        return TrainState(), None
    saved = load_state(path, meta)
    try:
        model.load_state_dict(saved["model"])
        if saved.get("finished"):
            log.info("resumed %s: training had finished; nothing to do", path)
            return TrainState(epoch=-1), saved
        if saved.get("device") != device.type:
            raise CheckpointError(f"{path} was saved on {saved.get('device')}, this run is on {device.type}: "
                                  "resume on the same kind of device")
        optimizers.load_state_dict(saved["optimizers"])
        if len(saved["schedulers"]) != len(schedulers):
            raise ValueError("it was saved with another learning-rate schedule")
        for scheduler, sch_state in zip(schedulers, saved["schedulers"]):
            scheduler.load_state_dict(sch_state)
        set_rng_state(saved["rng"], generator, device)
        state = TrainState.from_dict(saved["progress"])
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not fit this model: {first[:200]}") from None
    at = f"epoch {state.partial['epoch']}, step {state.partial['step']}" if state.partial else f"the end of epoch {state.epoch}"
    log.info("resuming from %s at %s", path, at)
    return state, saved
