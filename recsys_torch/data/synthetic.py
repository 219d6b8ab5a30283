"""A seeded synthetic rating data set with planted ground truth.

:func:`synthetic` draws users, items, their features and ratings from a known model, so that models
can be checked against what is really there, from tiny test sets up to tens of millions of ratings:

``rating = global_mean + b_user + b_item + <p_user, q_item> + feature_strength * <f_user, g_item>
+ noise * N(0, 1)``, clipped to ``rating_scale`` and rounded.

* ``b_user ~ N(0, 0.35)`` minus a small effect of the user's ``activity`` (heavy users are a bit
  harsher); ``b_item = 0.25 * quality + N(0, 0.3)``. Both biases and the feature term are centered
  (biases weighted by how often users / items are expected to be rated), so the mean rating stays
  near ``global_mean`` (clipping to the scale moves it a little).
* ``p_user``, ``q_item``: ``rank``-dimensional latent factors whose dot product has std ~0.5.
* ``g_item``: the item's genre vectors (summed, divided by sqrt of their count) plus its era vector;
  ``f_user``: its segment's vector, a shared taste vector plus a per-segment deviation. The shared
  part gives genres and eras a main effect on the rating, the deviation a per-segment one, so
  content-based models learn something real and items without ratings can be scored from features.
* Item of each rating drawn with probability ∝ (popularity rank + 1) ** -popularity_exponent over a
  random permutation of the items; users' shares of the ratings are lognormal. (user, item) pairs are
  unique: more pairs are drawn than needed and duplicates dropped (or, when the pairs are few, an
  exact weighted sample without replacement over all of them).
* Timestamps: each user is active over an interval (start uniform over ten years, length
  exponential), ratings fall uniformly inside it. The ratings come sorted by user, then time.

Everything is vectorized numpy with int32/float32 working arrays; the feature tables and planted
parameters come from their own random streams, so they depend on ``seed`` and the table sizes but not
on ``n_ratings``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import pandas as pd

from recsys_torch.data.raw import FLOAT32_MAX, RawDataset
from recsys_torch.errors import ConfigError

ERAS = ("1970s", "1980s", "1990s", "2000s", "2010s")
SEGMENTS = tuple(f"seg{s}" for s in range(6))
N_SEGMENTS = len(SEGMENTS)
MAX_GENRES_PER_ITEM = 3
T_START = 946_684_800  # 2000-01-01 UTC
T_SPAN = 10 * 365 * 86_400
MAX_DENSITY = 0.9
_CHUNK = 1 << 21  # ratings per vectorized chunk when computing ratings
_DENSE_MAX_PAIRS = 1 << 25  # above this many pairs, never score all of them at once


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"synthetic: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"synthetic: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"synthetic: {name} must be >= {minimum}, got {value!r}")
    return float(value)


def _rounding(rating_scale, integer_ratings: bool) -> tuple[float, float, float]:
    """Checks the scale; returns (low, high, step) with low/high on the step's grid."""
    try:
        low, high = rating_scale
    except (TypeError, ValueError):
        raise ConfigError(
            f"synthetic: rating_scale must be a (low, high) pair, got {rating_scale!r}"
        ) from None
    low = _check_real("rating_scale low", low)
    high = _check_real("rating_scale high", high)
    for what, value in (("low", low), ("high", high)):
        if abs(value) > FLOAT32_MAX:  # ratings are float32
            raise ConfigError(f"synthetic: rating_scale {what} must be a finite float32 number "
                              f"(at most {FLOAT32_MAX:.4g} in size), got {value!r}")
    if not np.float32(low) < np.float32(high):
        raise ConfigError(f"synthetic: rating_scale must have low < high, got {rating_scale!r}")
    step = 1.0 if integer_ratings else 0.5
    grid_low = math.ceil(low / step - 1e-9) * step
    grid_high = math.floor(high / step + 1e-9) * step
    if grid_low > grid_high:
        raise ConfigError(f"synthetic: rating_scale {rating_scale!r} holds no multiple of {step}")
    return grid_low, grid_high, step


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique for a large int64 array via an in-place sort (numpy's hash path is far slower)."""
    a.sort()
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _guide_table(cdf: np.ndarray, factor: int = 4) -> np.ndarray:
    """guide[j] = first index whose cdf exceeds j / len(guide) (a start for inverse-cdf search)."""
    k = factor * len(cdf)
    return np.searchsorted(cdf, np.arange(k) / k, side="right").astype(np.int64)


def _inverse_cdf(cdf: np.ndarray, guide: np.ndarray, u: np.ndarray, max_steps: int = 8) -> np.ndarray:
    """np.searchsorted(cdf, u, side="right") for uniform u in [0, 1), about twice as fast.

    Starts from the guide table and steps forward; the few values still unresolved after
    ``max_steps`` steps (buckets holding many tiny-probability entries) fall back to a binary search.
    """
    idx = guide[(u * len(guide)).astype(np.int64)]
    np.minimum(idx, len(cdf) - 1, out=idx)
    active = np.flatnonzero(cdf[idx] <= u)
    for _ in range(max_steps):
        if not len(active):
            break
        idx[active] += 1
        active = active[cdf[idx[active]] <= u[active]]
    if len(active):
        idx[active] = np.searchsorted(cdf, u[active], side="right")
    return np.minimum(idx, len(cdf) - 1, out=idx)


def _sample_pairs(
    rng: np.random.Generator, user_w: np.ndarray, item_w: np.ndarray, n_ratings: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draws n_ratings distinct (user, item) pairs, weight ∝ user_w[u] * item_w[i].

    Returns int32 user and item arrays sorted by (user, item).
    """
    n_users, n_items = len(user_w), len(item_w)
    n_pairs = n_users * n_items
    if n_ratings == 0:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32)
    if n_pairs <= _DENSE_MAX_PAIRS and n_pairs <= max(3 * n_ratings, 1 << 21):
        # Dense enough: exact weighted sampling without replacement over all pairs
        # (Efraimidis-Spirakis: keep the n largest log(w) + Gumbel noise), in place.
        score = rng.random(n_pairs)
        np.log(score, out=score)
        np.negative(score, out=score)
        np.log(score, out=score)
        np.negative(score, out=score)
        grid = score.reshape(n_users, n_items)
        grid += np.log(user_w)[:, None]
        grid += np.log(item_w)[None, :]
        keys = np.argpartition(score, n_pairs - n_ratings)[n_pairs - n_ratings :]
        del score, grid
        keys.sort()
    else:
        pu = user_w / user_w.sum()
        item_cdf = np.cumsum(item_w / item_w.sum())
        item_cdf[-1] = 1.0
        guide = _guide_table(item_cdf)
        keys = np.empty(0, dtype=np.int64)
        weighted = True
        yield_rate = 1.0  # share of the last round's draws that were new pairs
        for _ in range(200):
            missing = n_ratings - len(keys)
            if missing <= 0:
                break
            if weighted:
                m = int(missing * 1.1 / yield_rate) + 1000
                counts = rng.multinomial(m, pu)
                users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
                del counts
                items = _inverse_cdf(item_cdf, guide, rng.random(m))
            else:  # the popular pairs are used up: fill the rest uniformly
                free = 1.0 - len(keys) / n_pairs
                m = int(missing * 1.15 / free) + 1000
                users = rng.integers(0, n_users, m, dtype=np.int64)
                items = rng.integers(0, n_items, m, dtype=np.int64)
            users *= n_items
            users += items
            del items
            before = len(keys)
            users = _sorted_unique(users)
            if before:  # drop pairs already drawn, then merge two sorted runs
                pos = np.searchsorted(keys, users)
                np.minimum(pos, before - 1, out=pos)
                users = users[keys[pos] != users]
                del pos
                keys = np.concatenate([keys, users])
                keys.sort(kind="stable")  # timsort merges the two runs in linear time
            else:
                keys = users
            del users
            yield_rate = (len(keys) - before) / m
            if yield_rate < 0.25:
                weighted = False
        if len(keys) < n_ratings:  # pragma: no cover - needs an astronomically unlucky draw
            raise ConfigError("synthetic: could not draw enough distinct (user, item) pairs")
        extra = len(keys) - n_ratings
        if extra:
            keep = np.ones(len(keys), dtype=bool)
            keep[rng.choice(len(keys), extra, replace=False)] = False
            keys = keys[keep]
            del keep
    users = (keys // n_items).astype(np.int32)
    items = (keys % n_items).astype(np.int32)
    return users, items


def _genres(rng: np.random.Generator, n_items: int, n_genres: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item 1-3 distinct genres: (index array [n_items, k_max] sorted, -1 padded; counts)."""
    k_max = min(MAX_GENRES_PER_ITEM, n_genres)
    counts = rng.integers(1, k_max + 1, n_items)
    # k_max distinct random genres per item: the k_max smallest of n_genres random keys.
    order = np.argsort(rng.random((n_items, n_genres), dtype=np.float32), axis=1)[:, :k_max]
    order = order.astype(np.int64)
    order[np.arange(k_max)[None, :] >= counts[:, None]] = n_genres  # pad, sorts last
    order.sort(axis=1)
    order[order == n_genres] = -1
    return order, counts


def _join_genres(idx: np.ndarray, n_genres: int) -> pd.Series:
    names = np.array([f"g{g}" for g in range(n_genres)], dtype=object)
    joined = pd.Series(names[idx[:, 0]], dtype=object)
    for j in range(1, idx.shape[1]):
        has = idx[:, j] >= 0
        extra = pd.Series(names[np.where(has, idx[:, j], 0)], dtype=object)
        joined = joined.where(~has, joined + "|" + extra)
    return joined.astype(str)


def synthetic(
    n_users: int = 1000,
    n_items: int = 500,
    n_ratings: int = 20000,
    rank: int = 8,
    feature_rank: int = 4,
    n_genres: int = 12,
    noise: float = 0.3,
    popularity_exponent: float = 1.0,
    feature_strength: float = 1.0,
    global_mean: float = 3.5,
    rating_scale: tuple[float, float] = (1.0, 5.0),
    integer_ratings: bool = True,
    with_timestamps: bool = True,
    seed: int | None = 0,
    duplicates: str = "last",
    shuffle: bool = False,
) -> RawDataset:
    """Generates a synthetic :class:`RawDataset` with planted biases, factors and feature effects.

    Ratings are rounded to integers when ``integer_ratings``, else to multiples of 0.5, and clipped to
    the grid points inside ``rating_scale``. Users and items are ints ``0..n-1``; every one of them has
    a row in ``users`` / ``items``, rated or not. See the module docstring for the model.

    Raises ConfigError for invalid parameters or when ``n_ratings`` exceeds 90% of all pairs.
    """
    n_users = _check_int("n_users", n_users, 1)
    n_items = _check_int("n_items", n_items, 1)
    n_ratings = _check_int("n_ratings", n_ratings, 0)
    rank = _check_int("rank", rank, 0)
    feature_rank = _check_int("feature_rank", feature_rank, 0)
    n_genres = _check_int("n_genres", n_genres, 1)
    noise = _check_real("noise", noise, 0.0)
    popularity_exponent = _check_real("popularity_exponent", popularity_exponent, 0.0)
    feature_strength = _check_real("feature_strength", feature_strength)
    global_mean = _check_real("global_mean", global_mean)
    low, high, step = _rounding(rating_scale, bool(integer_ratings))
    if n_ratings > MAX_DENSITY * n_users * n_items:
        raise ConfigError(
            f"synthetic: n_ratings={n_ratings} is more than {MAX_DENSITY:.0%} of the "
            f"{n_users} x {n_items} possible (user, item) pairs"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0):
        raise ConfigError(f"synthetic: seed must be a non-negative integer or None, got {seed!r}")

    streams = np.random.SeedSequence(seed).spawn(6)
    rng_users, rng_items, rng_latent, rng_pairs, rng_noise, rng_time = (
        np.random.default_rng(s) for s in streams
    )

    # --- users: activity (share of ratings), segment, bias -------------------------------------
    log_act = rng_users.standard_normal(n_users)
    activity = np.exp(log_act)
    activity /= activity.mean()
    segment = rng_users.integers(0, N_SEGMENTS, n_users).astype(np.int32)
    user_bias = (0.35 * rng_users.standard_normal(n_users) - 0.1 * log_act).astype(np.float32)

    # --- items: popularity, genres, era, quality, bias ----------------------------------------
    pop_rank = rng_items.permutation(n_items)
    item_w = (pop_rank + 1.0) ** -popularity_exponent
    genre_idx, genre_counts = _genres(rng_items, n_items, n_genres)
    era = rng_items.integers(0, len(ERAS), n_items)
    quality = rng_items.standard_normal(n_items)
    item_bias = (0.25 * quality + 0.3 * rng_items.standard_normal(n_items)).astype(np.float32)

    # --- latent parts ---------------------------------------------------------------------------
    if rank:
        scale = math.sqrt(0.5 / math.sqrt(rank))  # <p, q> has std 0.5
        user_f = (scale * rng_latent.standard_normal((n_users, rank))).astype(np.float32)
        item_f = (scale * rng_latent.standard_normal((n_items, rank))).astype(np.float32)
    # Feature effect per (segment, item): a small table, looked up per rating.
    feat_table = np.zeros((N_SEGMENTS, n_items), dtype=np.float32)
    if feature_rank:
        genre_vec = math.sqrt(0.8) * rng_latent.standard_normal((n_genres + 1, feature_rank))
        genre_vec[n_genres] = 0.0  # padding row for index -1
        era_vec = math.sqrt(0.2) * rng_latent.standard_normal((len(ERAS), feature_rank))
        item_side = genre_vec[genre_idx].sum(axis=1) / np.sqrt(genre_counts)[:, None] + era_vec[era]
        shared = rng_latent.standard_normal(feature_rank)
        shared *= 0.25 / max(np.linalg.norm(shared), 1e-12)  # main effect of features: std ~0.25
        deviation = rng_latent.standard_normal((N_SEGMENTS, feature_rank))
        deviation *= 0.3 / math.sqrt(feature_rank)  # per-segment effect: std ~0.3
        seg_vec = shared[None, :] + deviation
        feat_table[:] = feature_strength * (seg_vec @ item_side.T)
        feat_table -= feat_table.mean()
    # Center the biases on the expected rating mix, so the ratings' mean stays near global_mean.
    user_bias -= np.float32(np.average(user_bias, weights=activity))
    item_bias -= np.float32(np.average(item_bias, weights=item_w))

    # --- which (user, item) pairs are rated --------------------------------------------------------
    users, items = _sample_pairs(rng_pairs, activity, item_w, n_ratings)

    # --- ratings, in chunks to keep the per-rating temporaries small ------------------------------
    ratings = np.empty(n_ratings, dtype=np.float64)
    flat_table = feat_table.ravel()
    for start in range(0, n_ratings, _CHUNK):
        u = users[start : start + _CHUNK]
        i = items[start : start + _CHUNK]
        r = user_bias[u] + item_bias[i]
        r += flat_table[segment[u].astype(np.int64) * n_items + i]
        if rank:
            r += np.einsum("ij,ij->i", user_f[u], item_f[i])
        if noise:
            r += noise * rng_noise.standard_normal(len(u), dtype=np.float32)
        r += np.float32(global_mean)
        r = np.round(r / step) * step
        np.clip(r, low, high, out=r)
        ratings[start : start + len(u)] = r

    columns = {"user": users, "item": items, "rating": ratings}

    # --- timestamps: per-user activity windows, sorted by user then time ---------------------------
    if with_timestamps:
        starts = rng_time.random(n_users) * (0.9 * T_SPAN)
        lengths = np.minimum(rng_time.exponential(0.1 * T_SPAN, n_users), T_SPAN - starts)
        offsets = np.empty(n_ratings, dtype=np.int64)
        for start in range(0, n_ratings, _CHUNK):
            u = users[start : start + _CHUNK]
            offsets[start : start + len(u)] = starts[u] + lengths[u] * rng_time.random(len(u))
        # users are already sorted; sort within user by time with one int64 key
        key = users.astype(np.int64)
        key *= T_SPAN + 1
        key += offsets
        order = np.argsort(key, kind="stable")
        del key
        offsets += T_START
        users, items, ratings, offsets = users[order], items[order], ratings[order], offsets[order]
        del order
        columns = {"user": users, "item": items, "rating": ratings, "timestamp": offsets}
    ratings_df = pd.DataFrame(columns, copy=False)

    items_df = pd.DataFrame(
        {
            "item": np.arange(n_items, dtype=np.int32),
            "title": "Item " + pd.Series(np.arange(n_items)).astype(str),
            "genres": _join_genres(genre_idx, n_genres),
            "era": pd.Series(np.array(ERAS, dtype=object)[era], dtype=str),
            "quality": quality,
        }
    )
    users_df = pd.DataFrame(
        {
            "user": np.arange(n_users, dtype=np.int32),
            "segment": pd.Series(np.array(SEGMENTS, dtype=object)[segment], dtype=str),
            "activity": activity,
        }
    )
    if shuffle:  # rows in a seeded random order, not grouped by user (SGD visits rows in the order given)
        ratings_df = ratings_df.iloc[np.random.default_rng(seed).permutation(len(ratings_df))].reset_index(drop=True)
    return RawDataset(
        ratings=ratings_df,
        items=items_df,
        item_spec={"genres": "multi:|", "era": "categorical", "quality": "numeric"},
        item_title="title",
        users=users_df,
        user_spec={"segment": "categorical", "activity": "numeric"},
        rating_scale=(float(rating_scale[0]), float(rating_scale[1])),
        name="synthetic",
        duplicates=duplicates,
    )
