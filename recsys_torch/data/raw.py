"""The raw, not yet encoded form of a data set, as every loader returns it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recsys_torch.errors import DataError

RATING_COLUMNS = ("user", "item", "rating", "timestamp", "weight")

#: The largest finite float32: ratings and dense features are float32, so larger values are infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_rating_scale(scale, what: str = "rating_scale") -> tuple[float, float]:
    """``scale`` as ``(low, high)``: two numbers, finite as float32 (the ratings' type), low < high."""
    shown = list(scale) if isinstance(scale, (list, tuple)) else repr(scale)
    try:
        if isinstance(scale, (str, bytes)):
            raise TypeError
        low, high = (float(x) for x in scale)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be [low, high] with low < high, got {shown}") from None
    if not all(math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in (low, high)):
        raise DataError(f"{what} must be [low, high], two finite numbers (at most {FLOAT32_MAX:.4g} in size: "
                        f"ratings are float32), got {shown}")
    if not np.float32(low) < np.float32(high):
        raise DataError(f"{what} must be [low, high] with low < high, got {shown}")
    return low, high


@dataclass
class RawDataset:
    """Ratings and optional feature tables with raw (string or integer) ids.

    ``ratings`` has columns ``user``, ``item``, ``rating`` (float) and, when known, ``timestamp``
    (int64 seconds). ``items`` / ``users`` hold one row per entity: an ``item`` / ``user`` id column
    plus feature columns whose kinds are given by ``item_spec`` / ``user_spec``, mapping a column to
    ``"categorical"``, ``"numeric"`` or ``"multi:SEP"`` (a multi-valued column split on SEP).
    ``item_title`` names a column of ``items`` kept for display only. ``files`` names the file each
    table came from (``"items"``, ``"users"``), for messages.
    """

    def with_duplicates(self, policy: str) -> "RawDataset":
        """This data set, to be encoded with another duplicates policy (see ``data.duplicates``)."""
        from dataclasses import replace

        return replace(self, duplicates=policy)

    ratings: pd.DataFrame
    items: pd.DataFrame | None = None
    item_spec: dict[str, str] = field(default_factory=dict)
    item_title: str | None = None
    users: pd.DataFrame | None = None
    user_spec: dict[str, str] = field(default_factory=dict)
    rating_scale: tuple[float, float] | None = None
    name: str = "dataset"
    duplicates: str = "last"  # which of repeated (user, item) rows encoding keeps: last | first | mean | error
    files: dict[str, str] = field(default_factory=dict)  # "items" / "users" -> the file it was read from
