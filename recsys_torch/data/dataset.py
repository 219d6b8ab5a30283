"""Encode a :class:`RawDataset` once, before any split, into tensors and feature bags."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from recsys_torch.data.features import Features, build_features, id_strings
from recsys_torch.data.interactions import Interactions
from recsys_torch.data.raw import FLOAT32_MAX, RawDataset, check_rating_scale
from recsys_torch.errors import DataError

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("last", "first", "mean", "error")


@dataclass
class Dataset:
    interactions: Interactions
    item_features: Features | None = None
    user_features: Features | None = None
    item_titles: list[str] | None = None  # by item code
    name: str = "dataset"
    report: dict = field(default_factory=dict)  # what encoding dropped or fixed

    @property
    def n_users(self) -> int:
        return self.interactions.n_users

    @property
    def n_items(self) -> int:
        return self.interactions.n_items


def _encode_ids(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes and raw ids (as strings). Integer ids are ordered numerically, others as strings."""
    if pd.api.types.is_integer_dtype(values):
        codes, uniques = pd.factorize(values, sort=True)
        return codes.astype(np.int64), np.asarray([str(u) for u in uniques], dtype=object)
    as_str = values.astype(str)
    codes, uniques = pd.factorize(as_str, sort=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _shown(value) -> str:
    """A cell for a message: text quoted, numbers plain (numpy 2's repr would say np.float64(nan))."""
    return repr(value) if isinstance(value, str) else str(value)


def _check_ratings(ratings: pd.DataFrame, scale: tuple[float, float] | None, name: str) -> pd.DataFrame:
    for column in ("user", "item", "rating"):
        if column not in ratings.columns:
            raise DataError(f"{name}: ratings have no {column!r} column (columns: {list(ratings.columns)})")
    if len(ratings) == 0:
        raise DataError(f"{name}: there are no ratings")
    empty = ratings["user"].isna() | ratings["item"].isna()
    if empty.any():
        first = ratings.index[empty.to_numpy()][0]
        raise DataError(f"{name}: {int(empty.sum())} rating row(s) have an empty user or item id "
                        f"(first at row {first})")
    values = pd.to_numeric(ratings["rating"], errors="coerce")
    with np.errstate(invalid="ignore"):  # ratings are float32: 1e39 is as infinite as inf
        bad = ~(np.abs(values.to_numpy(dtype=np.float64, na_value=np.nan)) <= FLOAT32_MAX)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        number = float(values.iloc[pos])
        hint = "" if math.isinf(number) or math.isnan(number) else (
            f"; ratings are float32, at most {FLOAT32_MAX:.4g} in size")
        raise DataError(
            f"{name}: {int(bad.sum())} rating(s) are not finite numbers "
            f"(first at row {ratings.index[pos]}: {_shown(ratings['rating'].iloc[pos])}){hint}"
        )
    ratings = ratings.assign(rating=values.astype(np.float64))
    if scale is not None:
        lo, hi = scale
        outside = (ratings["rating"] < lo) | (ratings["rating"] > hi)
        if outside.any():
            first = ratings.index[outside.to_numpy()][0]
            raise DataError(
                f"{name}: {int(outside.sum())} rating(s) fall outside the declared scale [{lo}, {hi}] "
                f"(first at row {first}: {ratings['rating'].loc[first]})"
            )
    if "timestamp" in ratings.columns:
        ts = pd.to_numeric(ratings["timestamp"], errors="coerce")
        # inf, and numbers past the int64 range, are no more a time than text is
        ts = ts.where(ts.abs() < 2.0 ** 63) if ts.dtype.kind in "fu" else ts
        if ts.isna().any():
            numbers = ts
            with warnings.catch_warnings():  # pandas warns on stderr when it guesses date formats
                warnings.simplefilter("ignore")
                ts = pd.to_datetime(ratings["timestamp"], errors="coerce", utc=True)  # ISO dates and the like
            if ts.isna().any():
                # name the cells that the reading which understood most of the column could not read
                bad = (numbers if numbers.notna().sum() >= ts.notna().sum() else ts).isna()
                first = ratings.index[bad.to_numpy()][0]
                raise DataError(f"{name}: {int(bad.sum())} timestamp(s) could not be read "
                                f"(first at row {first}: {_shown(ratings['timestamp'].loc[first])})")
            # pandas 3 may pick a microsecond (not nanosecond) unit: divide by a timedelta, not 10**9
            ts = (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        ratings = ratings.assign(timestamp=ts.astype(np.int64))
    if "weight" in ratings.columns:  # float32 like every loss that uses it; negative weights mean nothing
        weight = pd.to_numeric(ratings["weight"], errors="coerce")
        bad = weight.isna() | ~np.isfinite(weight.to_numpy(dtype=np.float32, na_value=np.nan)) | (weight < 0)
        if bad.any():
            first = ratings.index[bad.to_numpy()][0]
            raise DataError(f"{name}: {int(bad.sum())} weight(s) are not finite numbers >= 0 "
                            f"(first at row {first}: {_shown(ratings['weight'].loc[first])})")
        ratings = ratings.assign(weight=weight.astype(np.float64))
    return ratings


def _drop_duplicates(ratings: pd.DataFrame, policy: str, name: str) -> tuple[pd.DataFrame, int]:
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"unknown duplicates policy {policy!r} (use one of {DUPLICATE_POLICIES})")
    dup = ratings.duplicated(subset=["user", "item"], keep=False)
    if not dup.any():
        return ratings, 0
    n_before = len(ratings)
    if policy == "error":
        user, item = (ratings.loc[dup, c].iloc[0] for c in ("user", "item"))  # a row would upcast ints
        raise DataError(
            f"{name}: {int(dup.sum())} rows repeat a (user, item) pair "
            f"(e.g. user {_shown(user)}, item {_shown(item)})"
        )
    if policy == "mean":
        agg = {"rating": "mean"}
        if "timestamp" in ratings.columns:
            agg["timestamp"] = "max"
        if "weight" in ratings.columns:
            agg["weight"] = "sum"  # the repeats of a pair count together
        ratings = ratings.groupby(["user", "item"], sort=False, as_index=False).agg(agg)
    else:
        if "timestamp" in ratings.columns:
            ratings = ratings.sort_values("timestamp", kind="stable")
        ratings = ratings.drop_duplicates(subset=["user", "item"], keep=policy).sort_index()
    return ratings, n_before - len(ratings)


def _side_features(table, spec: dict, ids, what: str, raw: RawDataset, report: dict) -> Features:
    """Feature bags of one side (``what``: item or user) over its encoded ids; rows naming ids
    without ratings are dropped, counted in ``report`` and logged. A table none of whose rows
    names a rated id (ids written another way, e.g. ``001`` for ``1``) is a DataError."""
    index = {r: i for i, r in enumerate(ids)}
    path = raw.files.get(f"{what}s")
    where = f"{what} file {path}" if path else f"{raw.name}: {what} feature table"
    features, n_unknown = build_features(table, what, spec, index, len(ids), what, where)
    report[f"n_{what}_feature_rows_unknown"] = n_unknown
    n_without = len(ids) - int(features.present.sum())
    if len(table) and n_without == len(ids):
        theirs = id_strings(table[what].dropna().head(3)).tolist()
        article = "an" if what == "item" else "a"
        raise DataError(
            f"{where}: none of its {len(table)} row(s) names {article} {what} with ratings (its ids: {theirs}; "
            f"rated {what}s: {list(ids[:3])}): are the ids written the same way in both files?"
        )
    without = f"{n_without} of the {len(ids)} rated {what}s have no feature row" if n_without else ""
    if n_unknown:
        log.warning("%s: %d %s feature row(s) name %ss with no ratings; ignored%s",
                    raw.name, n_unknown, what, what, f"; {without}" if without else "")
    elif without:
        log.warning("%s: %s", raw.name, without)
    return features


def encode(raw: RawDataset, duplicates: str | None = None) -> Dataset:
    """Encode ids and features. ``duplicates`` says which of repeated (user, item) rows to keep:
    ``last`` (by timestamp when known, else file order), ``first``, ``mean`` or ``error``; by
    default the data set's own policy (``raw.duplicates``)."""
    duplicates = raw.duplicates if duplicates is None else duplicates
    scale = raw.rating_scale
    if scale is not None:
        scale = check_rating_scale(scale, f"{raw.name}: rating_scale")
    ratings = _check_ratings(raw.ratings, scale, raw.name)
    ratings, n_dup = _drop_duplicates(ratings, duplicates, raw.name)
    if n_dup:
        log.warning("%s: dropped %d duplicate (user, item) rating(s), keeping %s", raw.name, n_dup, duplicates)

    user_codes, user_ids = _encode_ids(ratings["user"])
    item_codes, item_ids = _encode_ids(ratings["item"])
    if scale is None:
        scale = (float(ratings["rating"].min()), float(ratings["rating"].max()))
        log.info("%s: rating scale [%g, %g] taken from the data (data.rating_scale sets another)", raw.name, *scale)
    timestamps = None
    if "timestamp" in ratings.columns:
        timestamps = torch.from_numpy(ratings["timestamp"].to_numpy(dtype=np.int64, copy=True))
    weights = None
    if "weight" in ratings.columns:
        weights = torch.from_numpy(ratings["weight"].to_numpy(dtype=np.float32, copy=True))
    inter = Interactions(
        users=torch.from_numpy(user_codes),
        items=torch.from_numpy(item_codes),
        ratings=torch.from_numpy(ratings["rating"].to_numpy(dtype=np.float32, copy=True)),
        n_users=len(user_ids),
        n_items=len(item_ids),
        timestamps=timestamps,
        user_ids=user_ids,
        item_ids=item_ids,
        rating_scale=(float(scale[0]), float(scale[1])),
        weights=weights,
    )
    report = {"n_duplicates_dropped": n_dup}

    item_features = user_features = titles = None
    if raw.items is not None:
        item_features = _side_features(raw.items, raw.item_spec, item_ids, "item", raw, report)
        if raw.item_title:
            if raw.item_title not in raw.items.columns:
                raise DataError(f"{raw.name}: item table has no title column {raw.item_title!r}")
            title_of = dict(zip(id_strings(raw.items["item"]), raw.items[raw.item_title].astype(str)))
            titles = [title_of.get(r, str(r)) for r in item_ids]
    if raw.users is not None:
        user_features = _side_features(raw.users, raw.user_spec, user_ids, "user", raw, report)
    return Dataset(inter, item_features, user_features, titles, raw.name, report)
