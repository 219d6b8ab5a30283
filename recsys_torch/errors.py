"""User-facing errors.

Anything a user can cause (a bad file, a bad column, an unknown id, an impossible split) raises a
subclass of :class:`RecsysError`. The command-line entry points catch it and print one line on stderr
with a non-zero exit; library users get an ordinary exception with the same message.
"""


class RecsysError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


def user_error(exc: BaseException | None) -> "RecsysError | None":
    """The RecsysError behind ``exc``, if any (Hydra's instantiate wraps what a target raises)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RecsysError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class DataError(RecsysError):
    """A data file or table is missing, unreadable or malformed."""


class ConfigError(RecsysError):
    """A configuration value is invalid or impossible (e.g. a split that leaves a set empty)."""


class UnknownIdError(RecsysError):
    """A raw user or item id was asked for that the trained run does not know."""


class CheckpointError(RecsysError):
    """A checkpoint is missing, corrupt or unsafe to load."""


class TrainingError(RecsysError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped training after its state was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)


class OutputError(RecsysError):
    """A run's outputs cannot be written (a full disk, a read-only folder) or its folder is in use."""
