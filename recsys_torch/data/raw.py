"""The raw, not yet encoded form of a data set, as every loader returns it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

RATING_COLUMNS = ("user", "item", "rating", "timestamp")


@dataclass
class RawDataset:
    """Ratings and optional feature tables with raw (string or integer) ids.

    ``ratings`` has columns ``user``, ``item``, ``rating`` (float) and, when known, ``timestamp``
    (int64 seconds). ``items`` / ``users`` hold one row per entity: an ``item`` / ``user`` id column
    plus feature columns whose kinds are given by ``item_spec`` / ``user_spec``, mapping a column to
    ``"categorical"``, ``"numeric"`` or ``"multi:SEP"`` (a multi-valued column split on SEP).
    ``item_title`` names a column of ``items`` kept for display only.
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
