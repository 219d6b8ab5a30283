"""One-line checks of settings: a value of the wrong type, out of range or not finite is a
:class:`~recsys_torch.errors.ConfigError` naming the key, never a traceback from deep inside torch."""

from __future__ import annotations

import math

from recsys_torch.errors import ConfigError


def number(key: str, value, kind=int, low=None, high=None, allow_none: bool = False, above=None):
    """``value`` as ``kind`` (int or float), finite, within ``[low, high]`` and ``> above``."""
    if value is None and allow_none:
        return None
    try:
        out = kind(value) if not isinstance(value, bool) else None
        if kind is int and out is not None and out != float(value):
            out = None  # 2.5 is not an integer
    except (TypeError, ValueError, OverflowError):
        out = None
    if (out is None or not math.isfinite(out) or (low is not None and out < low) or (high is not None and out > high)
            or (above is not None and not out > above)):
        what = "an integer" if kind is int else "a finite number"
        bounds = (f" in [{low}, {high}]" if low is not None and high is not None else f" >= {low}" if low is not None
                  else f" > {above}" if above is not None else f" <= {high}" if high is not None else "")
        raise ConfigError(f"{key} must be {what}{bounds}, got {value!r}")
    return out


def choice(key: str, value, allowed) -> object:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def probability(key: str, value) -> float:
    return number(key, value, float, 0.0, 1.0)
