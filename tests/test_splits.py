"""Split schemes: disjoint parts, sizes, the full id space, seeds, and each scheme's own promise.

``indexed_inter`` carries each row's number as its rating, so a part's ratings say which rows it got.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_inter
from recsys_torch import splits
from recsys_torch.errors import ConfigError

SCHEMES = {
    "random": splits.random_split,
    "kfold": splits.kfold,
    "user": splits.user_split,
    "temporal": splits.temporal,
    "leave_last": splits.leave_last,
    "cold_item": splits.cold_item,
    "cold_user": splits.cold_user,
}
SEEDED = ["random", "kfold", "user", "cold_item", "cold_user"]  # temporal and leave_last use no randomness


def rows(part) -> np.ndarray:
    return part.ratings.numpy().astype(np.int64)


def parts(split):
    return split.train, split.val, split.test


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parts_are_disjoint_cover_every_row_and_keep_the_id_space(indexed_inter, scheme):
    result = SCHEMES[scheme](indexed_inter, seed=3)
    assert len(result) == (5 if scheme == "kfold" else 1)
    for split in result:
        got = np.concatenate([rows(p) for p in parts(split)])
        assert np.array_equal(np.sort(got), np.arange(len(indexed_inter)))  # each row exactly once
        for part in parts(split):
            assert (part.n_users, part.n_items) == (indexed_inter.n_users, indexed_inter.n_items)
            assert part.user_ids is indexed_inter.user_ids and part.item_ids is indexed_inter.item_ids
            assert part.rating_scale == indexed_inter.rating_scale
            # a row keeps its own user, item and time
            r = rows(part)
            assert torch.equal(part.users, indexed_inter.users[r]) and torch.equal(part.items, indexed_inter.items[r])
            assert torch.equal(part.timestamps, indexed_inter.timestamps[r])
        assert len(split.train) > 0 and len(split.test) > 0 and len(split.val) > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_split(indexed_inter, scheme):
    a, b = SCHEMES[scheme](indexed_inter, seed=7), SCHEMES[scheme](indexed_inter, seed=7)
    for sa, sb in zip(a, b):
        for pa, pb in zip(parts(sa), parts(sb)):
            assert np.array_equal(rows(pa), rows(pb))


@pytest.mark.parametrize("scheme", SEEDED)
def test_other_seed_other_split(indexed_inter, scheme):
    a, b = SCHEMES[scheme](indexed_inter, seed=7)[0], SCHEMES[scheme](indexed_inter, seed=8)[0]
    assert not np.array_equal(np.sort(rows(a.test)), np.sort(rows(b.test)))


def test_random_sizes(indexed_inter):
    n = len(indexed_inter)
    (split,) = splits.random_split(indexed_inter, seed=0, val=0.15, test=0.25)
    assert (len(split.test), len(split.val), len(split.train)) == (round(0.25 * n), round(0.15 * n), n - 300 - 180)


def test_random_without_validation(indexed_inter):
    (split,) = splits.random_split(indexed_inter, seed=0, val=0.0, test=0.2)
    assert len(split.val) == 0 and len(split.test) == 240


def test_kfold_follows_the_benchmark_protocol(indexed_inter):
    n, k, seed = len(indexed_inter), 4, 42
    perm = np.random.default_rng(seed).permutation(n)
    expected = np.empty(n, dtype=np.int64)
    for j in range(n):
        expected[perm[j]] = j % k
    folds = splits.kfold(indexed_inter, seed=seed, folds=k, val=0.1)
    assert [s.name for s in folds] == ["fold0", "fold1", "fold2", "fold3"]
    seen = np.zeros(n, dtype=np.int64)
    for f, split in enumerate(folds):
        test = rows(split.test)
        assert np.array_equal(np.sort(test), np.flatnonzero(expected == f))
        seen[test] += 1
        # validation comes out of the fold's training part
        assert len(split.val) == round(0.1 * (n - len(test)))
        assert np.isin(rows(split.val), np.flatnonzero(expected != f)).all()
    assert (seen == 1).all()  # every rating is in exactly one test fold


def test_user_split_holds_out_per_user(indexed_inter):
    val, test, min_ratings = 0.1, 0.2, 5
    (split,) = splits.user_split(indexed_inter, seed=0, val=val, test=test, min_ratings=min_ratings)
    n = torch.bincount(indexed_inter.users, minlength=indexed_inter.n_users).numpy()
    n_test = torch.bincount(split.test.users, minlength=indexed_inter.n_users).numpy()
    n_val = torch.bincount(split.val.users, minlength=indexed_inter.n_users).numpy()
    eligible = n >= min_ratings
    assert (~eligible).any() and eligible.any()  # the fixture exercises both cases
    assert np.array_equal(n_test[eligible], np.floor(test * n[eligible] + 0.5))
    assert np.array_equal(n_val[eligible], np.floor(val * n[eligible] + 0.5))
    assert (n_test[~eligible] == 0).all() and (n_val[~eligible] == 0).all()


def test_temporal_never_tests_on_the_past(indexed_inter):
    (split,) = splits.temporal(indexed_inter, val=0.1, test=0.2)
    n = len(indexed_inter)
    assert (len(split.test), len(split.val)) == (round(0.2 * n), round(0.1 * n))
    assert split.train.timestamps.max() <= split.val.timestamps.min()
    assert split.val.timestamps.max() <= split.test.timestamps.min()
    assert split.train.timestamps.max() <= split.test.timestamps.min()


def test_leave_last_holds_out_each_users_newest(indexed_inter):
    (split,) = splits.leave_last(indexed_inter, n_test=1, n_val=1)
    eligible = np.flatnonzero(np.bincount(indexed_inter.users.numpy()) > 2)
    assert np.array_equal(np.sort(split.test.users.numpy()), eligible)  # one test rating per eligible user
    assert np.array_equal(np.sort(split.val.users.numpy()), eligible)
    assert len(split.train) == len(indexed_inter) - 2 * len(eligible)
    for part, older in ((split.test, (split.val, split.train)), (split.val, (split.train,))):
        for u, t in zip(part.users.tolist(), part.timestamps.tolist()):
            for other in older:
                assert (other.timestamps[other.users == u] <= t).all()


def test_leave_last_breaks_time_ties_by_row_order():
    inter = make_inter([0, 0, 0, 0], [0, 1, 2, 3], [0, 1, 2, 3], timestamps=[5, 5, 5, 5])
    (split,) = splits.leave_last(inter, n_test=1, n_val=1)
    assert rows(split.test).tolist() == [3] and rows(split.val).tolist() == [2]


@pytest.mark.parametrize("side", ["item", "user"])
def test_cold_entities_are_never_seen_in_training(indexed_inter, side):
    (split,) = splits.cold_item(indexed_inter, seed=1) if side == "item" else splits.cold_user(indexed_inter, seed=1)
    codes = lambda part: set((part.items if side == "item" else part.users).tolist())  # noqa: E731
    train, val, test = codes(split.train), codes(split.val), codes(split.test)
    assert train.isdisjoint(test) and train.isdisjoint(val) and val.isdisjoint(test)
    n_entities = indexed_inter.n_items if side == "item" else indexed_inter.n_users
    assert (len(test), len(val)) == (round(0.2 * n_entities), round(0.1 * n_entities))
    assert split.name == f"cold_{side}"


# --- impossible splits --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, kwargs, message", [
    ("random", dict(test=0.0), r"split.test must be a fraction in \[0, 1\)"),
    ("random", dict(test=1.0), r"split.test must be a fraction"),
    ("random", dict(val=-0.1), r"split.val must be a fraction"),
    ("random", dict(val=0.5, test=0.5), "split.val \\+ split.test must be below 1"),
    ("user", dict(val=0.6, test=0.4), "must be below 1"),
    ("cold_item", dict(val=0.5, test=0.6), "must be below 1"),
    ("cold_user", dict(test=0.0), "split.test must be a fraction"),
    ("temporal", dict(test=0.0), "split.test must be a fraction"),
    ("kfold", dict(folds=1), "split.folds must be at least 2"),
    ("kfold", dict(folds=2000), "split.folds=2000 is more than the 1200 ratings"),
    ("user", dict(min_ratings=1000), "leaves the test set empty"),
    ("temporal", dict(val=0.6, test=0.4), r"split.val \+ split.test must be below 1, got 1.0"),
])
def test_impossible_splits(tiny_inter, scheme, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SCHEMES[scheme](tiny_inter, seed=0, **kwargs)


@pytest.mark.parametrize("scheme", ["temporal", "leave_last"])
def test_time_schemes_need_timestamps(scheme):
    inter = make_inter([0, 1, 2], [0, 1, 2], [1, 2, 3])
    with pytest.raises(ConfigError, match=f"split={scheme} needs timestamps"):
        SCHEMES[scheme](inter)


def test_too_few_ratings_to_test():
    inter = make_inter([0, 1], [0, 1], [1, 2], timestamps=[1, 2])
    with pytest.raises(ConfigError, match="split 'random' leaves the test set empty"):
        splits.random_split(inter, test=0.1)
    with pytest.raises(ConfigError, match="split 'leave_last' leaves the test set empty"):
        splits.leave_last(inter)  # nobody has more than n_test + n_val ratings


def test_one_item_cannot_be_cold():
    inter = make_inter([0, 1, 2], [0, 0, 0], [1, 2, 3])
    with pytest.raises(ConfigError, match="split 'cold_item' leaves the test set empty"):
        splits.cold_item(inter, test=0.2)  # round(0.2 * 1 item) = 0 items held out


# ---- a ranking run's explicit negatives (ratings below the threshold) -----------------------------------
def _ratings_with_negatives(seed=0, n_users=30, n_items=25, n=500):
    """Positives and negatives on distinct (user, item) pairs, with timestamps."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(n_users * n_items, size=n, replace=False)
    users, items = cells // n_items, cells % n_items
    ts = rng.integers(0, 10_000, size=n)
    liked = rng.random(n) < 0.55
    def part(mask):
        return make_inter(users[mask], items[mask], np.ones(mask.sum()), timestamps=ts[mask], n_users=n_users,
                          n_items=n_items)
    return part(liked), part(~liked)


@pytest.mark.parametrize("scheme", ["random", "user", "cold_user"])
def test_each_user_holds_out_the_share_of_negatives_it_holds_out_of_positives(scheme):
    positives, negatives = _ratings_with_negatives()
    split = SCHEMES[scheme](positives, seed=3)[0]
    parts = splits.negative_parts(split, positives, negatives, seed=3)
    for u in range(positives.n_users):
        mine_pos, mine_neg = split.assign[positives.users.numpy() == u], parts[negatives.users.numpy() == u]
        for part in (1, 2):
            share = (mine_pos >= part).mean() if len(mine_pos) else 0.0
            assert (mine_neg >= part).sum() == np.floor(share * len(mine_neg) + 0.5)
    if scheme == "cold_user":  # a new user's negatives are as unseen as their positives
        cold = np.unique(positives.users.numpy()[split.assign == 2])
        assert (parts[np.isin(negatives.users.numpy(), cold)] == 2).all()
    assert (parts == 0).any() and (parts == 2).any()
    again = splits.negative_parts(SCHEMES[scheme](positives, seed=3)[0], positives, negatives, seed=3)
    assert (again == parts).all()
    other = splits.negative_parts(SCHEMES[scheme](positives, seed=4)[0], positives, negatives, seed=4)
    assert (other != parts).any()


def test_kfold_folds_hold_out_other_negatives():
    positives, negatives = _ratings_with_negatives()
    folds = splits.kfold(positives, seed=3, folds=3)
    held = [splits.negative_parts(f, positives, negatives, seed=3) == 2 for f in folds]
    users = negatives.users.numpy()
    # one shared draw would make each user's held-out negatives the first few of one order in every
    # fold, so one fold's set would always contain the other's
    crossed = [u for u in range(negatives.n_users)
               if (held[0] & ~held[1] & (users == u)).any() and (held[1] & ~held[0] & (users == u)).any()]
    assert crossed


def test_a_new_items_negatives_stay_unseen():
    positives, negatives = _ratings_with_negatives()
    split = splits.cold_item(positives, seed=3)[0]
    parts = splits.negative_parts(split, positives, negatives, seed=3)
    role = np.zeros(positives.n_items, dtype=np.int8)
    role[positives.items.numpy()] = split.assign
    assert (parts == role[negatives.items.numpy()]).all() and (parts == 2).any()


@pytest.mark.parametrize("scheme", ["temporal", "leave_last"])
def test_no_training_negative_is_as_new_as_a_held_out_positive(scheme):
    positives, negatives = _ratings_with_negatives()
    split = SCHEMES[scheme](positives, seed=3)[0]
    parts = splits.negative_parts(split, positives, negatives, seed=3)
    pos_ts, neg_ts = positives.timestamps.numpy(), negatives.timestamps.numpy()
    pos_users, neg_users = positives.users.numpy(), negatives.users.numpy()
    for part in (1, 2):
        for u in range(positives.n_users):
            held = (split.assign >= part) & ((pos_users == u) if scheme == "leave_last" else True)
            mine = (neg_users == u) if scheme == "leave_last" else np.ones(len(neg_ts), dtype=bool)
            cut = pos_ts[held].min() if held.any() else np.inf
            assert ((parts[mine] >= part) == (neg_ts[mine] >= cut)).all()
    assert (parts == 0).any() and (parts == 2).any()
