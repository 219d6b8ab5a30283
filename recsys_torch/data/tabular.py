"""`data=csv`: any ratings file (csv, tsv or parquet) plus optional item and user feature tables."""

from __future__ import annotations

import csv as csv_module  # the sniffer behind sep=None raises csv.Error
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import DataError

DEFAULT_COLUMNS = {"user": "user", "item": "item", "rating": "rating", "timestamp": None}


def read_table(path: str | os.PathLike, sep: str | None = None, what: str = "ratings",
               id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a csv, tsv or parquet file into a DataFrame; every failure is a one-line DataError.
    ``id_columns`` are read as text (see :func:`_ids`)."""
    path = os.fspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DataError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{what} path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{what} file is empty: {path}")
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        else:
            if sep is None:
                sep = "\t" if lower.endswith((".tsv", ".tab")) else ("," if lower.endswith(".csv") else None)
            frame = pd.read_csv(path, sep=sep, engine="python" if sep is None else "c", skipinitialspace=True,
                                dtype={c: str for c in id_columns})
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, ImportError, csv_module.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {what} file {path}: {first}") from None
    if len(frame) == 0:
        raise DataError(f"{what} file has a header but no rows: {path}")
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in id_columns:
        if column in frame.columns:
            frame[column] = _ids(frame[column])
    return frame


_PLAIN_INTEGER = r"0|-?[1-9][0-9]{0,17}"  # fits int64, and int(text) gives the text back


def _ids(values: pd.Series) -> pd.Series:
    """Raw ids, stripped of surrounding spaces ("alice " is "alice"; a blank cell is a missing id).
    A column of plain integers becomes int64 so ids order numerically, unless that would change an
    id: "007" stays "007" rather than becoming 7, and integers beyond int64 stay text."""
    if not (pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)):
        return values  # typed already (parquet)
    text = values.astype("str").str.strip()
    text = text.mask(text == "")
    if len(text) and text.notna().all() and text.str.fullmatch(_PLAIN_INTEGER).all():
        return text.astype(np.int64)
    return text


def _id_names(mapping: Mapping[str, str | None]) -> tuple[str, ...]:
    return tuple(c for c in (mapping.get("user"), mapping.get("item")) if c is not None)


def _pick(frame: pd.DataFrame, mapping: Mapping[str, str | None], path: str, what: str) -> pd.DataFrame:
    out = {}
    for name, column in mapping.items():
        if column is None:
            continue
        if column not in frame.columns:
            hint = ""
            if len(frame.columns) == 1:
                hint = " (only one column was found: is the delimiter right?)"
            raise DataError(
                f"{what} file {path} has no column {column!r} for {name}; columns are {list(frame.columns)}{hint}"
            )
        out[name] = frame[column]
    return pd.DataFrame(out)


def csv(
    ratings: str,
    columns: Mapping[str, str | None] | None = None,
    sep: str | None = None,
    rating_scale: tuple[float, float] | None = None,
    items: str | None = None,
    item_id: str = "item",
    item_title: str | None = None,
    item_features: Mapping[str, str] | None = None,
    users: str | None = None,
    user_id: str = "user",
    user_features: Mapping[str, str] | None = None,
    name: str | None = None,
    duplicates: str = "last",
) -> RawDataset:
    """Load ratings and optional feature tables. ``columns`` maps ``user``, ``item``, ``rating`` and
    ``timestamp`` (optional) to the file's column names; ``item_features`` maps feature columns to
    ``categorical``, ``numeric`` or ``multi:SEP``."""
    mapping = dict(DEFAULT_COLUMNS)
    mapping.update({k: v for k, v in (columns or {}).items()})
    unknown = set(mapping) - set(DEFAULT_COLUMNS)
    if unknown:
        raise DataError(f"data.columns has unknown key(s) {sorted(unknown)}; use user, item, rating, timestamp")
    frame = read_table(ratings, sep, "ratings", _id_names(mapping))
    picked = _pick(frame, mapping, ratings, "ratings")

    item_table = user_table = None
    if items:
        table = read_table(items, None, "item", (item_id,))
        keep = {"item": item_id, **{c: c for c in (item_features or {})}}
        if item_title:
            keep["title"] = item_title
        item_table = _pick(table, keep, items, "item")
    if users:
        table = read_table(users, None, "user", (user_id,))
        keep = {"user": user_id, **{c: c for c in (user_features or {})}}
        user_table = _pick(table, keep, users, "user")
    scale = tuple(float(x) for x in rating_scale) if rating_scale is not None else None
    if scale is not None and (len(scale) != 2 or scale[0] >= scale[1]):
        raise DataError(f"data.rating_scale must be [low, high] with low < high, got {list(rating_scale)}")
    return RawDataset(
        ratings=picked,
        items=item_table,
        item_spec=dict(item_features or {}),
        item_title="title" if (items and item_title) else None,
        users=user_table,
        user_spec=dict(user_features or {}),
        rating_scale=scale,
        name=name or os.path.basename(str(ratings)),
        duplicates=duplicates,
    )
