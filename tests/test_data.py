"""`encode`: id encoding, duplicate policies, rating and timestamp checks (handmade frames)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_torch.data import encode
from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import DataError


def raw(scale=None, **columns) -> RawDataset:
    return RawDataset(pd.DataFrame(columns), rating_scale=scale, name="toy")


def decoded(inter) -> list[tuple[str, str, float]]:
    """(raw user, raw item, rating) per row, through the id maps."""
    return [
        (inter.user_ids[u], inter.item_ids[i], r)
        for u, i, r in zip(inter.users.tolist(), inter.items.tolist(), inter.ratings.tolist())
    ]


# --- id encoding ------------------------------------------------------------------------------------


def test_integer_ids_are_ordered_numerically_and_round_trip():
    data = encode(raw(user=[10, 2, 33, 2], item=[7, 100, 7, 9], rating=[1.0, 2.0, 3.0, 4.0]))
    inter = data.interactions
    assert list(inter.user_ids) == ["2", "10", "33"]  # not "10" < "2" as strings would sort
    assert list(inter.item_ids) == ["7", "9", "100"]
    assert inter.users.tolist() == [1, 0, 2, 0]
    assert inter.items.tolist() == [0, 2, 0, 1]
    assert (inter.n_users, inter.n_items) == (3, 3)
    assert inter.users.dtype == inter.items.dtype == torch.int64
    assert inter.ratings.dtype == torch.float32
    assert decoded(inter) == [("10", "7", 1.0), ("2", "100", 2.0), ("33", "7", 3.0), ("2", "9", 4.0)]


def test_string_ids_are_ordered_as_strings():
    inter = encode(raw(user=["bob", "al", "bob"], item=["x10", "x9", "x9"], rating=[3, 4, 5])).interactions
    assert list(inter.user_ids) == ["al", "bob"]
    assert list(inter.item_ids) == ["x10", "x9"]
    assert decoded(inter) == [("bob", "x10", 3.0), ("al", "x9", 4.0), ("bob", "x9", 5.0)]


def test_rating_scale_comes_from_the_data_unless_declared():
    assert encode(raw(user=[1, 2], item=[1, 1], rating=[2.0, 4.5])).interactions.rating_scale == (2.0, 4.5)
    declared = encode(raw((1, 5), user=[1, 2], item=[1, 1], rating=[2.0, 4.5]))
    assert declared.interactions.rating_scale == (1.0, 5.0)


def test_numeric_strings_as_ratings_are_read():
    inter = encode(raw(user=[1, 2], item=[1, 1], rating=["3.5", "4"])).interactions
    assert inter.ratings.tolist() == [3.5, 4.0]


# --- duplicates -------------------------------------------------------------------------------------

# u1 rated item 1 twice: first (in time) 1.0 at t=100, then 5.0 at t=200; the file lists the later one
# first, so "last" must go by time, not by row order.
DUPES = dict(user=["u1", "u1", "u2"], item=[1, 1, 2], rating=[5.0, 1.0, 3.0], timestamp=[200, 100, 50])


def rating_of(data, user, item):
    rows = [r for u, i, r in decoded(data.interactions) if (u, i) == (user, item)]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("policy, expected", [("last", 5.0), ("first", 1.0), ("mean", 3.0)])
def test_duplicate_policies_with_timestamps(policy, expected):
    data = encode(raw(**DUPES), duplicates=policy)
    assert len(data.interactions) == 2
    assert rating_of(data, "u1", "1") == expected
    assert rating_of(data, "u2", "2") == 3.0
    assert data.report["n_duplicates_dropped"] == 1


def test_mean_policy_keeps_the_latest_timestamp():
    data = encode(raw(**DUPES), duplicates="mean")
    by_user = dict(zip(data.interactions.users.tolist(), data.interactions.timestamps.tolist()))
    assert by_user[list(data.interactions.user_ids).index("u1")] == 200


@pytest.mark.parametrize("policy, expected", [("last", 1.0), ("first", 5.0)])
def test_duplicate_policies_without_timestamps_follow_file_order(policy, expected):
    columns = {k: v for k, v in DUPES.items() if k != "timestamp"}
    data = encode(raw(**columns), duplicates=policy)
    assert rating_of(data, "u1", "1") == expected


def test_mean_of_three_duplicates():
    data = encode(raw(user=[1, 1, 1, 2], item=[1, 1, 1, 1], rating=[1.0, 2.0, 4.5, 3.0]), duplicates="mean")
    assert rating_of(data, "1", "1") == pytest.approx(2.5)
    assert data.report["n_duplicates_dropped"] == 2


def test_duplicates_error_policy_names_the_pair():
    with pytest.raises(DataError, match=r"repeat a \(user, item\) pair.*'u1'"):
        encode(raw(**DUPES), duplicates="error")


def test_error_policy_accepts_unique_pairs():
    data = encode(raw(user=[1, 1], item=[1, 2], rating=[3.0, 4.0]), duplicates="error")
    assert len(data.interactions) == 2 and data.report["n_duplicates_dropped"] == 0


def test_unknown_duplicates_policy():
    with pytest.raises(DataError, match="unknown duplicates policy 'newest'"):
        encode(raw(**DUPES), duplicates="newest")


# --- malformed ratings --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "abc", None])
def test_non_finite_or_non_numeric_rating_is_a_data_error(bad):
    with pytest.raises(DataError, match=r"toy: 1 rating\(s\) are not finite numbers \(first at row 1"):
        encode(raw(user=[1, 2, 3], item=[1, 1, 1], rating=[4.0, bad, 3.0]))


@pytest.mark.parametrize("bad", [1e39, -1e39, 3.5e38, "1e39", 1e300])
def test_rating_beyond_float32_is_a_data_error(bad):
    """Ratings are float32: 1e39 is finite as a float64 but infinite once encoded (popularity then
    crashed and MF blamed the learning rate)."""
    with pytest.raises(DataError, match=r"toy: 1 rating\(s\) are not finite numbers \(first at row 1: .*\); "
                                        r"ratings are float32, at most 3\.403e\+38 in size$"):
        encode(raw(user=[1, 2, 3], item=[1, 1, 1], rating=[4.0, bad, 3.0]))


def test_the_largest_float32_rating_is_accepted():
    big = float(np.finfo(np.float32).max)
    inter = encode(raw(user=[1, 2], item=[1, 1], rating=[-big, big])).interactions
    assert torch.isfinite(inter.ratings).all()


@pytest.mark.parametrize("scale", [(math.nan, 5.0), (1.0, 1e39), (1.0, math.inf), (5.0, 1.0), (1.0, 1.0 + 1e-12)])
def test_declared_scale_must_be_two_finite_float32_numbers_low_below_high(scale):
    with pytest.raises(DataError, match=r"^toy: rating_scale must be \[low, high\]"):
        encode(raw(scale, user=[1, 2], item=[1, 1], rating=[3.0, 4.0]))


def test_scale_taken_from_the_data_is_logged(caplog):
    with caplog.at_level("INFO", logger="recsys_torch.data.dataset"):
        encode(raw(user=[1, 2], item=[1, 1], rating=[2.0, 4.5]))
    assert "toy: rating scale [2, 4.5] taken from the data" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="recsys_torch.data.dataset"):
        encode(raw((1, 5), user=[1, 2], item=[1, 1], rating=[2.0, 4.5]))
    assert "rating scale" not in caplog.text


@pytest.mark.parametrize("bad", [0.5, 5.5])
def test_rating_outside_the_declared_scale_is_a_data_error(bad):
    with pytest.raises(DataError, match=r"outside the declared scale \[1.0, 5.0\]"):
        encode(raw((1.0, 5.0), user=[1, 2], item=[1, 1], rating=[3.0, bad]))


def test_ratings_on_the_scale_edges_are_accepted():
    inter = encode(raw((1.0, 5.0), user=[1, 2], item=[1, 1], rating=[1.0, 5.0])).interactions
    assert inter.ratings.tolist() == [1.0, 5.0]


@pytest.mark.parametrize("column", ["user", "item"])
def test_empty_id_is_a_data_error(column):
    columns = dict(user=[1, 2], item=[1, 2], rating=[3.0, 4.0])
    columns[column] = [1, None]
    with pytest.raises(DataError, match="empty user or item id"):
        encode(raw(**columns))


@pytest.mark.parametrize("missing", ["user", "item", "rating"])
def test_missing_column_is_a_data_error(missing):
    columns = {k: v for k, v in dict(user=[1], item=[1], rating=[3.0]).items() if k != missing}
    with pytest.raises(DataError, match=f"no '{missing}' column"):
        encode(raw(**columns))


def test_no_ratings_is_a_data_error():
    with pytest.raises(DataError, match="there are no ratings"):
        encode(raw(user=[], item=[], rating=[]))


# --- timestamps ----------------------------------------------------------------------------------------


def test_iso_timestamps_become_unix_seconds():
    inter = encode(raw(user=[1, 2], item=[1, 1], rating=[3.0, 4.0],
                       timestamp=["2020-01-01", "2020-01-02"])).interactions
    assert inter.timestamps.tolist() == [1577836800, 1577923200]
    assert inter.timestamps.dtype == torch.int64


def test_numeric_timestamps_are_kept():
    inter = encode(raw(user=[1, 2], item=[1, 1], rating=[3.0, 4.0], timestamp=[881250949, 891717742])).interactions
    assert inter.timestamps.tolist() == [881250949, 891717742]


def test_unreadable_timestamp_is_a_data_error():
    with pytest.raises(DataError, match=r"1 timestamp\(s\) could not be read"):
        encode(raw(user=[1, 2], item=[1, 1], rating=[3.0, 4.0], timestamp=["2020-01-01", "yesterday"]))


def test_no_timestamp_column_means_no_timestamps():
    assert encode(raw(user=[1], item=[1], rating=[3.0])).interactions.timestamps is None


# --- the synthetic fixture end to end ---------------------------------------------------------------------


def test_synthetic_encodes_to_its_own_sizes(tiny_raw, tiny_inter):
    assert len(tiny_inter) == len(tiny_raw.ratings)
    assert tiny_inter.n_users == tiny_raw.ratings["user"].nunique()
    assert tiny_inter.n_items == tiny_raw.ratings["item"].nunique()
    back = np.asarray(tiny_inter.user_ids)[tiny_inter.users.numpy()].astype(np.int64)
    assert (back == tiny_raw.ratings["user"].to_numpy()).all()
    assert tiny_inter.rating_scale == (1.0, 5.0)
