"""The synthetic generator: shapes, determinism, valid ratings, planted popularity and feature signal."""

from __future__ import annotations

import os
import resource
import time

import numpy as np
import pandas as pd
import pytest

from recsys_torch.data.raw import RawDataset
from recsys_torch.data.synthetic import synthetic
from recsys_torch.errors import ConfigError

SMALL = dict(n_users=300, n_items=200, n_ratings=6000)


@pytest.fixture(scope="module")
def small() -> RawDataset:
    return synthetic(**SMALL, seed=0)


# --- shapes and schema -------------------------------------------------------------------------------


def test_shapes_columns_and_dtypes(small):
    r = small.ratings
    assert list(r.columns) == ["user", "item", "rating", "timestamp"]
    assert len(r) == SMALL["n_ratings"]
    assert r["rating"].dtype == np.float64 and r["timestamp"].dtype == np.int64
    assert np.issubdtype(r["user"].dtype, np.integer) and np.issubdtype(r["item"].dtype, np.integer)
    assert r["user"].between(0, SMALL["n_users"] - 1).all()
    assert r["item"].between(0, SMALL["n_items"] - 1).all()
    assert small.name == "synthetic" and small.rating_scale == (1.0, 5.0)
    assert small.item_spec == {"genres": "multi:|", "era": "categorical", "quality": "numeric"}
    assert small.user_spec == {"segment": "categorical", "activity": "numeric"}
    assert small.item_title in small.items.columns
    assert small.items["title"].iloc[17] == "Item 17"


def test_feature_tables_cover_every_id(small):
    items, users = small.items, small.users
    assert items["item"].tolist() == list(range(SMALL["n_items"]))
    assert users["user"].tolist() == list(range(SMALL["n_users"]))
    assert not items.isna().any().any() and not users.isna().any().any()
    genres = items["genres"].str.split("|")
    assert genres.map(len).between(1, 3).all()
    assert genres.map(lambda g: len(set(g)) == len(g)).all()  # no genre twice on one item
    assert set().union(*genres) <= {f"g{g}" for g in range(12)}
    assert items["era"].nunique() > 1 and users["segment"].nunique() > 1
    assert np.isfinite(items["quality"]).all() and (users["activity"] > 0).all()


def test_few_genres_and_no_timestamps():
    ds = synthetic(n_users=20, n_items=15, n_ratings=100, n_genres=2, with_timestamps=False)
    assert list(ds.ratings.columns) == ["user", "item", "rating"]
    assert set("|".join(ds.items["genres"]).split("|")) <= {"g0", "g1"}


def test_zero_ratings():
    ds = synthetic(n_users=5, n_items=4, n_ratings=0)
    assert len(ds.ratings) == 0 and len(ds.items) == 4 and len(ds.users) == 5


# --- determinism -------------------------------------------------------------------------------------


def test_same_seed_same_data_other_seed_other_data(small):
    again = synthetic(**SMALL, seed=0)
    for a, b in [(small.ratings, again.ratings), (small.items, again.items), (small.users, again.users)]:
        pd.testing.assert_frame_equal(a, b)
    other = synthetic(**SMALL, seed=1)
    assert not small.ratings.equals(other.ratings)
    assert not small.items.equals(other.items)
    assert not small.users.equals(other.users)


def test_feature_tables_do_not_depend_on_n_ratings(small):
    fewer = synthetic(**{**SMALL, "n_ratings": 500}, seed=0)
    pd.testing.assert_frame_equal(small.items, fewer.items)
    pd.testing.assert_frame_equal(small.users, fewer.users)


# --- valid pairs and ratings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        SMALL,
        dict(n_users=30, n_items=20, n_ratings=540),  # 90%: the densest allowed
        dict(n_users=3000, n_items=1000, n_ratings=30000),  # sparse: drawn with replacement, deduplicated
    ],
)
def test_pairs_are_unique(sizes):
    r = synthetic(**sizes, seed=3).ratings
    assert len(r) == sizes["n_ratings"]
    assert not r.duplicated(["user", "item"]).any()


def test_integer_ratings_inside_the_scale(small):
    rating = small.ratings["rating"]
    assert rating.between(1.0, 5.0).all()
    assert (rating == rating.round()).all()
    assert rating.nunique() == 5  # the whole scale is used
    assert 3.0 < rating.mean() < 4.0 and rating.std() > 0.5


def test_half_step_ratings_on_another_scale():
    rating = synthetic(**SMALL, rating_scale=(0.5, 5.0), integer_ratings=False, seed=2).ratings["rating"]
    assert rating.between(0.5, 5.0).all()
    assert (rating * 2 == (rating * 2).round()).all()
    assert (rating != rating.round()).any()  # some half stars


def test_global_mean_and_noise_move_the_ratings():
    low = synthetic(**SMALL, global_mean=2.0, rating_scale=(0.0, 10.0)).ratings["rating"]
    high = synthetic(**SMALL, global_mean=8.0, rating_scale=(0.0, 10.0)).ratings["rating"]
    assert abs(low.mean() - 2.0) < 0.3 and abs(high.mean() - 8.0) < 0.3
    quiet = synthetic(**SMALL, noise=0.0, integer_ratings=False, rating_scale=(-10.0, 10.0))
    loud = synthetic(**SMALL, noise=2.0, integer_ratings=False, rating_scale=(-10.0, 10.0))
    assert loud.ratings["rating"].std() > quiet.ratings["rating"].std() + 0.5


def test_timestamps_spread_over_time_and_sorted_within_user(small):
    r = small.ratings
    ts = r["timestamp"]
    assert ts.min() >= 946_684_800 and ts.max() - ts.min() > 5 * 365 * 86_400
    assert r["user"].is_monotonic_increasing
    assert r.groupby("user")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    # users start at different times: a temporal split has old and new users on both sides
    first = r.groupby("user")["timestamp"].min()
    assert first.std() > 365 * 86_400


# --- planted structure -----------------------------------------------------------------------------------


def _top_decile_share(ratings: pd.DataFrame, n_items: int) -> float:
    counts = ratings["item"].value_counts()
    return counts.iloc[: n_items // 10].sum() / len(ratings)


def test_popularity_is_skewed(small):
    assert _top_decile_share(small.ratings, SMALL["n_items"]) > 0.3
    flat = synthetic(**SMALL, popularity_exponent=0.0, seed=0).ratings
    assert _top_decile_share(flat, SMALL["n_items"]) < 0.2


def test_user_activity_drives_rating_counts(small):
    counts = small.ratings["user"].value_counts().reindex(range(SMALL["n_users"]), fill_value=0)
    rho = counts.rank().corr(small.users["activity"].rank())
    assert rho > 0.6
    assert counts.max() > 5 * counts.median()


def _one_hot_r2(ratings: pd.DataFrame, items: pd.DataFrame, permutation: np.ndarray | None = None) -> float:
    """R^2 of a least-squares fit of the rating on the rated item's genre / era one-hots and quality."""
    feats = pd.concat(
        [items["genres"].str.get_dummies("|"), pd.get_dummies(items["era"]), items[["quality"]]], axis=1
    ).to_numpy(dtype=np.float64)
    if permutation is not None:
        feats = feats[permutation]
    x = np.column_stack([np.ones(len(ratings)), feats[ratings["item"].to_numpy()]])
    y = ratings["rating"].to_numpy()
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return 1.0 - np.var(y - x @ coef) / np.var(y)


# Many items, so that 20 one-hot coefficients cannot fit the items' own biases by chance.
WIDE = dict(n_users=400, n_items=1000, n_ratings=8000)


def test_item_features_carry_signal():
    ds = synthetic(**WIDE, seed=0)
    r2 = _one_hot_r2(ds.ratings, ds.items)
    rng = np.random.default_rng(0)
    shuffled = max(_one_hot_r2(ds.ratings, ds.items, rng.permutation(WIDE["n_items"])) for _ in range(3))
    assert r2 > 0.08 and r2 > 2 * shuffled + 0.02


def test_without_feature_vectors_genres_and_eras_explain_little():
    def genre_era_r2(feature_rank: int) -> float:
        ds = synthetic(**WIDE, feature_rank=feature_rank, seed=0)
        return _one_hot_r2(ds.ratings, ds.items.assign(quality=0.0))

    with_features, without = genre_era_r2(4), genre_era_r2(0)
    assert without < 0.04 and with_features > 2 * without + 0.03


def test_feature_effect_differs_by_segment():
    """The segment x genre interaction is real: per-segment genre means disagree beyond chance."""
    ds = synthetic(**SMALL, noise=0.0, rank=0, feature_strength=3.0, seed=4)
    r = ds.ratings.merge(ds.users[["user", "segment"]], on="user")
    r = r.merge(ds.items[["item", "genres"]].assign(genre=lambda d: d["genres"].str.split("|")), on="item")
    r = r.explode("genre")
    means = r.groupby(["segment", "genre"])["rating"].mean().unstack()
    centered = means.sub(means.mean(axis=0), axis=1).sub(means.mean(axis=1), axis=0)
    assert centered.abs().to_numpy().mean() > 0.1


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_users=10, n_items=10, n_ratings=91),  # more than 90% of all pairs
        dict(n_users=0),
        dict(n_items=-1),
        dict(n_ratings=2.5),
        dict(rank=-1),
        dict(n_genres=0),
        dict(noise=-0.1),
        dict(noise=float("nan")),
        dict(popularity_exponent=-1.0),
        dict(rating_scale=(5.0, 1.0)),
        dict(rating_scale=(1.2, 1.8)),  # no integer inside
        dict(rating_scale=3.0),
        dict(seed=-1),
    ],
)
def test_bad_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        synthetic(**{**dict(n_users=20, n_items=20, n_ratings=50), **kwargs})


# --- timing (opt-in, prints only) ------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("RECSYS_BENCH"), reason="set RECSYS_BENCH=1 to time 5M ratings")
def test_time_five_million_ratings():
    start = time.perf_counter()
    ds = synthetic(n_users=50_000, n_items=20_000, n_ratings=5_000_000, seed=0)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nsynthetic 5M ratings, 50k x 20k: {seconds:.2f}s, peak RSS of the process {peak_mb:.0f} MB")
    assert len(ds.ratings) == 5_000_000
