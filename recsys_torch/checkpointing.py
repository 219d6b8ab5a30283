"""Resumable training: the ``last.pt`` state file, the check that it belongs to this run, the random
number generator states and the SIGINT/SIGTERM guard.

``last.pt`` holds everything the trainer needs to go on exactly where it stopped: model, optimizer and
scheduler states, the shuffling/sampling generator and torch's global generator, the epoch (and, after
a signal, the step inside it), the best weights so far with their metric and the count of epochs
without improvement, the history and the global step. Once training is over it is replaced by a small
``finished`` state (the final weights and the fit result) so that a resumed run skips the work.
"""

from __future__ import annotations

import signal
import threading

import torch

from recsys_torch.errors import CheckpointError, TrainingError
from recsys_torch.io import atomic_torch_save, safe_torch_load

LAST_FORMAT = "recsys_torch/last/1"


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped training after its state was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)


def save_state(path: str, state: dict) -> None:
    atomic_torch_save(path, {"format": LAST_FORMAT, **state})


def load_state(path: str, meta: dict | None = None) -> dict:
    """Read a training state safely; refuse one saved under a different configuration (``meta``)."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != LAST_FORMAT:
        raise CheckpointError(f"{path} is not a recsys_torch training state (format {LAST_FORMAT})")
    if meta is not None:
        diff = config_diff(state.get("meta") or {}, meta)
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


class SignalGuard:
    """While active (and on the main thread), SIGINT and SIGTERM only record ``signum``: the trainer
    looks at it between steps, saves its state and stops. A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum

    def __enter__(self) -> "SignalGuard":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
