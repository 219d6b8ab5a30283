"""Split schemes: pure, seeded functions of an :class:`Interactions`.

Every scheme returns a list of :class:`Split` (one element, or one per fold for ``kfold``); every part
keeps the full id space, so ids never need re-encoding and unknown users/items can be counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from recsys_torch.data.interactions import Interactions
from recsys_torch.checks import number
from recsys_torch.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Split:
    train: Interactions
    val: Interactions
    test: Interactions
    name: str = "split"
    assign: np.ndarray | None = None  # the part of each row of the split data: 0 train, 1 val, 2 test
    final_fit: bool = False  # after the folds, train one model on all the data (k-fold's final model)


def _check_fraction(name: str, value: float, allow_zero: bool = True) -> float:
    value = number(f"split.{name}", value, float)
    if not (0.0 <= value < 1.0) or (value == 0.0 and not allow_zero):
        raise ConfigError(f"split.{name} must be a fraction in [0, 1), got {value}")
    return value


def _make(inter: Interactions, assign: np.ndarray, name: str, need_val: bool = True) -> Split:
    """assign: 0 train, 1 val, 2 test per row."""
    parts = [inter.subset(torch.from_numpy(np.flatnonzero(assign == k))) for k in range(3)]
    if len(parts[0]) == 0:
        raise ConfigError(f"split {name!r} leaves the training set empty ({len(inter)} ratings in all)")
    if len(parts[2]) == 0:
        raise ConfigError(f"split {name!r} leaves the test set empty; raise split.test or use more data")
    if need_val and len(parts[1]) == 0:
        log.warning("split %r leaves the validation set empty: no early stopping", name)
    return Split(*parts, name=name, assign=assign)


def _random_parts(n: int, rng: np.random.Generator, val: float, test: float) -> np.ndarray:
    perm = rng.permutation(n)
    n_test = int(round(test * n))
    n_val = int(round(val * n))
    assign = np.zeros(n, dtype=np.int8)
    assign[perm[:n_test]] = 2
    assign[perm[n_test:n_test + n_val]] = 1
    return assign


def random_split(inter: Interactions, seed: int = 42, val: float = 0.1, test: float = 0.1) -> list[Split]:
    """Shuffle the ratings and hold out ``val`` and ``test`` fractions."""
    val, test = _check_fraction("val", val), _check_fraction("test", test, allow_zero=False)
    if val + test >= 1:
        raise ConfigError(f"split.val + split.test must be below 1, got {val + test}")
    assign = _random_parts(len(inter), np.random.default_rng(seed), val, test)
    return [_make(inter, assign, "random")]


def kfold(inter: Interactions, seed: int = 42, folds: int = 5, val: float = 0.02, final_fit: bool = True) -> list[Split]:
    """K folds of the shuffled ratings (fold of row ``perm[j]`` is ``j % folds``, as in
    ``../shared/BENCHMARKS.md``). Each fold's training part gives up ``val`` of itself for early
    stopping. ``final_fit``: the folds estimate the error; then one model trains on all the data
    (for the folds' mean number of epochs), and that is the run's saved model."""
    folds = number("split.folds", folds, int)
    if folds < 2:
        raise ConfigError(f"split.folds must be at least 2, got {folds}")
    if folds > len(inter):
        raise ConfigError(f"split.folds={folds} is more than the {len(inter)} ratings")
    val = _check_fraction("val", val)
    n = len(inter)
    perm = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[perm] = np.arange(n) % folds
    out = []
    for k in range(folds):
        assign = np.where(fold_of == k, 2, 0).astype(np.int8)
        train_rows = np.flatnonzero(assign == 0)
        rng = np.random.default_rng([seed, k])
        n_val = int(round(val * len(train_rows)))
        assign[rng.choice(train_rows, size=n_val, replace=False)] = 1
        split = _make(inter, assign, f"fold{k}")
        split.final_fit = bool(final_fit)
        out.append(split)
    return out


def _rank_within_user(users: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each row within its user when ordered by ``key``, and each row's user count."""
    order = np.lexsort((key, users))
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - starts[users[order]]
    return rank, counts[users]


def user_split(
    inter: Interactions, seed: int = 42, val: float = 0.1, test: float = 0.2, min_ratings: int = 3
) -> list[Split]:
    """Per-user holdout: each user with at least ``min_ratings`` ratings puts ``floor(test*n + 0.5)`` of
    them (at random) into test and ``floor(val*n + 0.5)`` into validation; the rest train."""
    val, test = _check_fraction("val", val), _check_fraction("test", test, allow_zero=False)
    if val + test >= 1:
        raise ConfigError(f"split.val + split.test must be below 1, got {val + test}")
    users = inter.users.cpu().numpy()
    rng = np.random.default_rng(seed)
    rank, n = _rank_within_user(users, rng.random(len(users)))
    eligible = n >= max(number("split.min_ratings", min_ratings, int, 0), 1)
    n_test = np.floor(test * n + 0.5).astype(np.int64)
    n_val = np.floor(val * n + 0.5).astype(np.int64)
    assign = np.zeros(len(users), dtype=np.int8)
    assign[eligible & (rank < n_test)] = 2
    assign[eligible & (rank >= n_test) & (rank < n_test + n_val)] = 1
    return [_make(inter, assign, "user")]


def _require_timestamps(inter: Interactions, scheme: str) -> np.ndarray:
    if inter.timestamps is None:
        raise ConfigError(f"split={scheme} needs timestamps, and these ratings have none")
    return inter.timestamps.cpu().numpy()


def temporal(inter: Interactions, seed: int = 42, val: float = 0.1, test: float = 0.1) -> list[Split]:
    """One global time cut (back-testing): the oldest ratings train, the newest ``test`` fraction
    tests and the ``val`` fraction before it validates. No test rating is older than a training one."""
    val, test = _check_fraction("val", val), _check_fraction("test", test, allow_zero=False)
    if val + test >= 1:
        raise ConfigError(f"split.val + split.test must be below 1, got {val + test}")
    ts = _require_timestamps(inter, "temporal")
    order = np.argsort(ts, kind="stable")
    n = len(ts)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    assign = np.zeros(n, dtype=np.int8)
    assign[order[n - n_test:]] = 2
    assign[order[n - n_test - n_val:n - n_test]] = 1
    return [_make(inter, assign, "temporal")]


def leave_last(inter: Interactions, seed: int = 42, n_test: int = 1, n_val: int = 1) -> list[Split]:
    """Per user, the last ``n_test`` ratings by time test and the ``n_val`` before them validate
    (users need more than ``n_test + n_val`` ratings to contribute)."""
    log.warning(
        "split=leave_last cuts each user at a different time, so the model trains on other users' "
        "future; use split=temporal for an honest back-test"
    )
    n_test, n_val = number("split.n_test", n_test, int, 1), number("split.n_val", n_val, int, 0)
    ts = _require_timestamps(inter, "leave_last")
    users = inter.users.cpu().numpy()
    # rank from the newest: ties broken by row order
    rank, n = _rank_within_user(users, -ts.astype(np.float64) - np.arange(len(ts)) * 1e-9)
    eligible = n > n_test + n_val
    assign = np.zeros(len(users), dtype=np.int8)
    assign[eligible & (rank < n_test)] = 2
    assign[eligible & (rank >= n_test) & (rank < n_test + n_val)] = 1
    return [_make(inter, assign, "leave_last")]


def _cold(inter: Interactions, seed: int, val: float, test: float, side: str) -> list[Split]:
    val, test = _check_fraction("val", val), _check_fraction("test", test, allow_zero=False)
    if val + test >= 1:
        raise ConfigError(f"split.val + split.test must be below 1, got {val + test}")
    codes = (inter.items if side == "item" else inter.users).cpu().numpy()
    n_entities = inter.n_items if side == "item" else inter.n_users
    present = np.flatnonzero(np.bincount(codes, minlength=n_entities) > 0)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(present)
    n_test, n_val = int(round(test * len(perm))), int(round(val * len(perm)))
    role = np.zeros(n_entities, dtype=np.int8)
    role[perm[:n_test]] = 2
    role[perm[n_test:n_test + n_val]] = 1
    return [_make(inter, role[codes], f"cold_{side}")]


def cold_item(inter: Interactions, seed: int = 42, val: float = 0.1, test: float = 0.2) -> list[Split]:
    """A ``test`` fraction of the items, with all their ratings, go to test (``val`` to validation):
    at test time those items have never been seen."""
    return _cold(inter, seed, val, test, "item")


def cold_user(inter: Interactions, seed: int = 42, val: float = 0.1, test: float = 0.2) -> list[Split]:
    """A ``test`` fraction of the users, with all their ratings, go to test (``val`` to validation)."""
    return _cold(inter, seed, val, test, "user")


def negative_parts(split: Split, positives: Interactions, negatives: Interactions, seed: int) -> np.ndarray:
    """The part (0 train, 1 val, 2 test) of each explicit negative of a ranking run (a rating below the
    threshold), so that training sees only the negatives its scheme would have let it see, never
    those that belong with the held-out positives:

    - ``cold_item``: an item's negatives go where its positives went (a new item stays unseen);
    - ``temporal``: a negative as new as the oldest held-out positive is held out with the newest part
      it reaches, like the positives at the cut;
    - ``leave_last``: per user, negatives as new as the user's oldest held-out positive are held out;
    - every other scheme (random, user, the k-fold folds, ``cold_user``): each user holds out, at random
      (seeded), the same share of their negatives as of their positives (``floor(share * n + 0.5)``),
      so a new user's negatives stay unseen too.

    A user or item without positives keeps its negatives in training."""
    assign = np.asarray(split.assign, dtype=np.int8)
    users, items = positives.users.cpu().numpy(), positives.items.cpu().numpy()
    neg_users, neg_items = negatives.users.cpu().numpy(), negatives.items.cpu().numpy()
    parts = np.zeros(len(negatives), dtype=np.int8)
    if split.name == "cold_item":
        role = np.zeros(positives.n_items, dtype=np.int8)
        role[items] = assign  # an item's positives all share its part
        return role[neg_items]
    if split.name in ("temporal", "leave_last"):
        pos_ts = _require_timestamps(positives, split.name).astype(np.float64)
        neg_ts = _require_timestamps(negatives, split.name).astype(np.float64)
        for part in (1, 2):  # held out from the oldest held-out positive of that part (or a newer one) on
            held = assign >= part
            if split.name == "temporal":
                if held.any():
                    parts[neg_ts >= pos_ts[held].min()] = part
                continue
            first = np.full(positives.n_users, np.inf)
            np.minimum.at(first, users[held], pos_ts[held])
            parts[neg_ts >= first[neg_users]] = part
        return parts
    n_pos = np.bincount(users, minlength=positives.n_users)
    rng = np.random.default_rng([seed, 1, *split.name.encode()])  # each fold its own draw
    rank, n = _rank_within_user(neg_users, rng.random(len(neg_users)))
    for part in (1, 2):  # the first (share of val + test) go to validation, then the first (share of test) to test
        share = np.bincount(users, weights=(assign >= part).astype(np.float64), minlength=positives.n_users)
        share = np.divide(share, n_pos, out=np.zeros_like(share), where=n_pos > 0)
        parts[rank < np.floor(share[neg_users] * n + 0.5)] = part
    return parts
