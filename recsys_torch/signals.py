"""SIGINT and SIGTERM: a run they reach always stops, with one line and exit status 128 + the signal.

* :func:`install` (the scripts call it first) makes both raise :class:`Interrupted` (a
  ``KeyboardInterrupt``; Python's default leaves SIGTERM to kill the process silently, with its run
  folder still marked running) and records them in the process.
* An exception raised by a signal handler can be swallowed: Python only prints it ("Exception ignored
  in ...") when the signal lands inside a finalizer or a callback. :func:`check` raises
  :class:`~recsys_torch.errors.TrainingInterrupted` for any signal recorded so far; the run folder
  calls it before it marks a run complete, so a swallowed signal still fails the run.
* :class:`SignalGuard`, during training, only records the signal: the trainer looks at it between
  steps, saves its state and stops. A signal it recorded that no step saw (it came after the last
  one) stops the run when the guard is left. A second signal interrupts at once.
"""

from __future__ import annotations

import signal
import threading

from recsys_torch.errors import TrainingInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # every SIGINT / SIGTERM this process got through our handlers


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`install`'s handler; ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def record(signum: int) -> None:
    _received.append(int(signum))


def received() -> int | None:
    """The first signal recorded in this process, or None."""
    return _received[0] if _received else None


def _raise(signum, frame) -> None:
    record(signum)
    raise Interrupted(signum)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` from now on (main thread only: elsewhere Python
    does not allow handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


def forget() -> None:
    """A new run starts: signals that stopped an earlier one in this process (a notebook) are not its."""
    _received.clear()


def check(what: str = "the run") -> None:
    """Raise :class:`TrainingInterrupted` if a SIGINT or SIGTERM reached this process."""
    signum = received()
    if signum is not None:
        raise TrainingInterrupted(f"{what} was stopped by {signal_name(signum)}", signum)


class SignalGuard:
    """While active (and on the main thread), SIGINT and SIGTERM only record ``signum``: the trainer
    looks at it between steps, saves its state and stops. A second signal interrupts at once; a
    recorded signal nobody acted on raises when the block ends."""

    SIGNALS = SIGNALS

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        record(signum)
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> "SignalGuard":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if kind is None and self.signum is not None:
            raise TrainingInterrupted(f"training was stopped by {signal_name(self.signum)} after its last step",
                                      self.signum)
        return False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
