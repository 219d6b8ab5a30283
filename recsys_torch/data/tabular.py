"""`data=csv`: any ratings file (csv, tsv or parquet) plus optional item and user feature tables."""

from __future__ import annotations

import csv as csv_module  # the sniffer behind sep=None raises csv.Error
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from recsys_torch.data.raw import RawDataset, check_rating_scale
from recsys_torch.errors import DataError

DEFAULT_COLUMNS = {"user": "user", "item": "item", "rating": "rating", "timestamp": None, "weight": None}


def read_table(path: str | os.PathLike, sep: str | None = None, what: str = "ratings",
               id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a csv, tsv or parquet file into a DataFrame; every failure is a one-line DataError.
    ``id_columns`` are read as text (see :func:`_ids`): only an empty cell is a missing id, while
    ``NA``, ``null`` or ``None`` are ids like any other. A row whose number of fields differs from
    the header's is an error (pandas would shift the columns or fill the row up with missing cells)."""
    path = os.fspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DataError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{what} path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{what} file is empty: {path}")
    lower = path.lower()
    delimited = not lower.endswith((".parquet", ".pq"))
    try:
        if not delimited:
            frame = pd.read_parquet(path)  # typed columns: its nulls are real nulls
        else:
            if sep is None:
                sep = "\t" if lower.endswith((".tsv", ".tab")) else ("," if lower.endswith(".csv") else None)
            frame = _read_delimited(path, sep, what, id_columns)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, ImportError, csv_module.Error) as exc:
        if delimited and isinstance(exc, pd.errors.ParserError):
            _check_field_counts(path, sep, what)  # a row with more fields than the header: say which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {what} file {path}: {first}") from None
    if len(frame) == 0:
        raise DataError(f"{what} file has a header but no rows: {path}")
    if delimited and len(frame.columns):
        last = frame.iloc[:, -1]
        if last.isna().any() or (last.astype(object) == "").any():  # pandas fills up a short row
            _check_field_counts(path, sep, what)
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in id_columns:
        if column in frame.columns:
            frame[column] = _ids(frame[column])
    return frame


#: pandas' default missing-value spellings, kept for every column but the ids (ids are text).
_NA_STRINGS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
               "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def _read_delimited(path: str, sep: str | None, what: str, id_columns: tuple[str, ...]) -> pd.DataFrame:
    options = dict(sep=sep, engine="python" if sep is None else "c", skipinitialspace=True)
    names = list(pd.read_csv(path, nrows=0, **options).columns)
    ids = [n for n in names if str(n).strip() in id_columns]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = pd.read_csv(
            path, **options, index_col=False,  # never take a header one name short as an index column
            dtype={n: str for n in ids}, keep_default_na=False,
            na_values={n: _NA_STRINGS for n in names if n not in ids},
        )
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):
            # "Length of header or names does not match length of data": pandas dropped fields
            _check_field_counts(path, sep, what)
            raise DataError(f"cannot read {what} file {path}: {_one_line(warning.message)}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return frame


def _check_field_counts(path: str, sep: str | None, what: str) -> None:
    """Raise a DataError naming the first row whose number of fields differs from the header's.
    The file is split as pandas splits it (same delimiter, quoting, blank lines skipped); when it
    cannot be, nothing is said here and the caller reports what pandas said."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if sep is None:  # what pandas' python engine does: sniff the first line
                sep = csv_module.Sniffer().sniff(fh.readline()).delimiter
                fh.seek(0)
            reader = csv_module.reader(fh, delimiter=sep, quotechar='"', doublequote=True, skipinitialspace=True)
            header, row, n_bad, first, line = None, -1, 0, None, 1
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):  # a blank line
                    continue
                if header is None:
                    header = len(fields)
                    continue
                row += 1
                if len(fields) != header:
                    n_bad += 1
                    first = first or (row, start, len(fields))
    except (OSError, UnicodeDecodeError, csv_module.Error, TypeError, ValueError):
        return
    if first is not None:
        row, start, count = first
        raise DataError(
            f"{what} file {path}: {n_bad} row(s) do not have the header's {header} fields "
            f"(first at row {row}, line {start}: {count} fields)"
        )


def _one_line(text) -> str:
    return " ".join(str(text).split())


_PLAIN_INTEGER = r"0|-?[1-9][0-9]{0,17}"  # fits int64, and int(text) gives the text back


def _ids(values: pd.Series) -> pd.Series:
    """Raw ids, stripped of surrounding spaces ("alice " is "alice"; a blank cell is a missing id).
    A column of plain integers becomes int64 so ids order numerically, unless that would change an
    id: "007" stays "007" rather than becoming 7, and integers beyond int64 stay text."""
    if not (pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)):
        return values  # typed already (parquet)
    missing = values.isna()  # a parquet null, or an empty cell: never the text "None" or "nan"
    text = values.astype("str").str.strip()
    text = text.mask(missing | (text == ""))
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
        raise DataError(f"data.columns has unknown key(s) {sorted(unknown)}; use user, item, rating, timestamp, weight")
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
    scale = check_rating_scale(rating_scale, "data.rating_scale") if rating_scale is not None else None
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
        files={k: str(v) for k, v in (("items", items), ("users", users)) if v},
    )
