"""The peer libraries the benchmark sets our models against (Surprise, cornac), each fitted on the
very same split: their training data built from our arrays, their prediction rule vectorized (and
tested equal to their own ``predict``), clipped to the rating scale.

A fitter is ``fit(params, data, part, threads, seed, device) -> Fitted``: ``params`` are the
library's own settings, ``data`` the benchmark's prepared arrays with one row of ``assign`` per part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recsys_torch.errors import ConfigError


@dataclass
class Fitted:
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (users, items) codes -> clipped ratings
    fit_seconds: float
    epochs_run: int
    n_train: int
    model: object = None  # the library's fitted model


def _inner(known: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``codes`` in the sorted ``known`` codes, and whether each is there."""
    pos = np.minimum(np.searchsorted(known, codes), max(len(known) - 1, 0))
    found = known[pos] == codes if len(known) else np.zeros(len(codes), dtype=bool)
    return pos, found


def _dot_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) if len(a) else np.zeros(0)


def _grouped(keys: np.ndarray, others: np.ndarray, values: np.ndarray) -> dict[int, list]:
    """``{key: [(other, value), ...]}`` in row order within each key: Surprise's ``ur`` / ``ir``."""
    order = np.argsort(keys, kind="stable")
    pairs = list(zip(others[order].tolist(), values[order].tolist()))
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(order)]
    return {int(sorted_keys[s]): pairs[s:e] for s, e in zip(starts, ends)}


def surprise_trainset(users, items, ratings, rating_scale):
    """A ``surprise.Trainset`` (what ``build_full_trainset`` makes) with raw ids = our codes, built
    from arrays without Surprise's per-row Python reader. Returns it and the sorted known codes."""
    from surprise import Trainset

    known_u, inner_u = np.unique(users, return_inverse=True)
    known_i, inner_i = np.unique(items, return_inverse=True)
    ratings = ratings.astype(np.float64)
    trainset = Trainset(_grouped(inner_u, inner_i, ratings), _grouped(inner_i, inner_u, ratings),
                        len(known_u), len(known_i), len(ratings), tuple(rating_scale),
                        {int(c): k for k, c in enumerate(known_u)}, {int(c): k for k, c in enumerate(known_i)})
    return trainset, known_u, known_i


def fit_surprise(params: dict, data: BenchData, part: int, threads: int, seed: int, device: str) -> Fitted:
    import surprise

    users, items, ratings = data.take(data.assign[part] != 2)  # no early stopping: train on train + val
    trainset, known_u, known_i = surprise_trainset(users, items, ratings, data.rating_scale)
    kwargs = dict(params["kwargs"])
    if params["algo"] == "SVD":
        algo = surprise.SVD(random_state=seed, verbose=False, **kwargs)
    elif params["algo"] == "BaselineOnly":
        algo = surprise.BaselineOnly(bsl_options=kwargs, verbose=False)
    else:
        raise ConfigError(f"surprise algorithm {params['algo']!r} is not wired into the benchmark")
    t0 = time.perf_counter()
    algo.fit(trainset)
    seconds = time.perf_counter() - t0
    svd = params["algo"] == "SVD"

    def predict_fn(u, i):  # SVD.estimate / BaselineOnly.estimate: mean plus whatever is known
        iu, ku = _inner(known_u, u)
        ii, ki = _inner(known_i, i)
        est = np.full(len(u), trainset.global_mean)
        est[ku] += algo.bu[iu[ku]]
        est[ki] += algo.bi[ii[ki]]
        if svd:
            both = ku & ki
            est[both] += _dot_rows(algo.pu[iu[both]], algo.qi[ii[both]])
        return np.clip(est, *data.rating_scale)

    epochs = kwargs.get("n_epochs", 20 if svd else 10)
    return Fitted(predict_fn, seconds, int(epochs), len(ratings), algo)


def cornac_dataset(users, items, ratings):
    """A ``cornac.data.Dataset`` (what ``Dataset.build`` makes: known ids compacted, rows in the
    given order) and the sorted known codes."""
    from cornac.data import Dataset

    known_u, inner_u = np.unique(users, return_inverse=True)
    known_i, inner_i = np.unique(items, return_inverse=True)
    dataset = Dataset(len(known_u), len(known_i), {int(c): k for k, c in enumerate(known_u)},
                      {int(c): k for k, c in enumerate(known_i)},
                      (inner_u.astype(np.int64), inner_i.astype(np.int64), ratings.astype(np.float32)))
    return dataset, known_u, known_i


def fit_cornac(params: dict, data: BenchData, part: int, threads: int, seed: int, device: str) -> Fitted:
    import cornac.models.mf.backend_cpu  # noqa: F401  (imported by the first fit otherwise: not fitting)
    from cornac.models import MF

    if params["algo"] != "MF":
        raise ConfigError(f"cornac model {params['algo']!r} is not wired into the benchmark")
    users, items, ratings = data.take(data.assign[part] != 2)
    dataset, known_u, known_i = cornac_dataset(users, items, ratings)
    # cornac runs single-threaded whenever a seed is given, so only the 1-thread rows are seeded
    model = MF(num_threads=threads, seed=seed if threads == 1 else None, verbose=False, **params["kwargs"])
    t0 = time.perf_counter()
    model.fit(dataset)
    seconds = time.perf_counter() - t0

    def predict_fn(u, i):  # MF.score, and Recommender.rate's global mean for an unknown item
        iu, ku = _inner(known_u, u)
        ii, ki = _inner(known_i, i)
        est = np.full(len(u), float(model.global_mean))
        est[ki] += model.i_biases[ii[ki]]
        both = ku & ki
        est[both] += model.u_biases[iu[both]] + _dot_rows(model.u_factors[iu[both]], model.i_factors[ii[both]])
        return np.clip(est, *data.rating_scale)

    return Fitted(predict_fn, seconds, int(params["kwargs"].get("max_iter", 20)), len(ratings), model)


# ---- top-N ranking peers (implicit, cornac BPR / EASE, LightFM) ------------------------------------
# A ranking fitter is ``fit(params, users, items, n_users, n_items, threads, seed) -> RankFitted``:
# ``users``/``items`` are the training positives in our codes (every code below n_users / n_items
# is valid, seen or not); ``RankFitted.scores(users)`` gives ``[len(users), n_items]`` float32 scores
# in our item codes, the peer's own scoring rule (-inf where the peer knows no such item).
@dataclass
class RankFitted:
    scores: Callable[[np.ndarray], np.ndarray]
    fit_seconds: float
    iterations: int
    n_train: int
    model: object = None  # the library's fitted model
    iteration_seconds: list | None = None  # per iteration, where the library reports it


def _user_items(users, items, n_users: int, n_items: int):
    """The positives as a ``users x items`` CSR of ones (float32): what implicit and LightFM fit."""
    import scipy.sparse as sp

    ones = np.ones(len(users), dtype=np.float32)
    return sp.csr_matrix((ones, (users.astype(np.int64), items.astype(np.int64))), shape=(n_users, n_items))


def fit_implicit(params, users, items, n_users, n_items, threads, seed, negatives=None) -> RankFitted:
    """implicit's ``AlternatingLeastSquares`` (iALS, conjugate gradient; ``algo`` ALS) or
    ``BayesianPersonalizedRanking`` (``algo`` BPR; its item factors carry the item bias).

    ``negatives``: ``(users, items)`` of explicit negatives, entered as implicit documents them for ALS:
    a negative confidence (``-negative_value``, a setting of ours in ``kwargs``) marks a disliked item."""
    from threadpoolctl import threadpool_limits

    algo, kwargs = params["algo"], dict(params["kwargs"])
    if algo not in ("ALS", "BPR"):
        raise ConfigError(f"implicit model {algo!r} is not wired into the ranking benchmark")
    negative_value = kwargs.pop("negative_value", None)
    if negative_value is not None and algo != "ALS":
        raise ConfigError("implicit takes explicit negatives (negative_value) in ALS only")
    if algo == "ALS":  # imported before the BLAS limit below, so that it covers the BLAS they load
        from implicit.cpu.als import AlternatingLeastSquares as Model
    else:
        from implicit.cpu.bpr import BayesianPersonalizedRanking as Model
    X = _user_items(users, items, n_users, n_items)
    if negative_value is not None and negatives is not None and len(negatives[0]):
        X = X - float(negative_value) * _user_items(*negatives, n_users, n_items)
    # implicit parallelizes over users itself and asks for a single-threaded BLAS (it warns otherwise)
    with threadpool_limits(1, "blas"):
        model = Model(**kwargs, num_threads=threads, random_state=seed)
        times: list[float] = []
        t0 = time.perf_counter()
        model.fit(X, show_progress=False, callback=lambda iteration, elapsed, *rest: times.append(float(elapsed)))
        seconds = time.perf_counter() - t0
    user_factors, item_factors = model.user_factors, model.item_factors

    def scores(u):  # what its recommend ranks by: user_factors @ item_factors.T
        return user_factors[u] @ item_factors.T

    return RankFitted(scores, seconds, len(times), len(users), model, times)


def _known_scores(user_part: Callable, known_u, known_i, n_items: int) -> Callable:
    """Scores over our item codes from a peer that compacts ids (cornac): ``user_part(inner users)``
    gives ``[n, len(known_i)]``; items it never saw get -inf, users it never saw zeros."""
    def scores(u):
        iu, ku = _inner(known_u, u)
        out = np.full((len(u), n_items), -np.inf, dtype=np.float32)
        out[:, known_i] = 0.0
        if ku.any():
            rows = np.flatnonzero(ku)
            out[np.ix_(rows, known_i)] = user_part(iu[ku])
        return out

    return scores


def fit_cornac_ranking(params, users, items, n_users, n_items, threads, seed) -> RankFitted:
    """cornac ``BPR`` (score ``u_factors @ i_factors.T + i_biases``) or ``EASE`` (``X_u @ B``)."""
    import cornac.models

    dataset, known_u, known_i = cornac_dataset(users, items, np.ones(len(users), dtype=np.float32))
    kwargs = dict(params["kwargs"])
    if params["algo"] == "BPR":
        import cornac.models.bpr.recom_bpr  # noqa: F401  (imported by the first fit otherwise: not fitting)

        # cornac runs single-threaded whenever a seed is given, so only the 1-thread rows are seeded
        model = cornac.models.BPR(num_threads=threads, seed=seed if threads == 1 else None, verbose=False, **kwargs)
        iterations = int(kwargs.get("max_iter", 100))
    elif params["algo"] == "EASE":
        model = cornac.models.EASE(verbose=False, seed=seed, **kwargs)
        iterations = 1
    else:
        raise ConfigError(f"cornac model {params['algo']!r} is not wired into the ranking benchmark")
    t0 = time.perf_counter()
    model.fit(dataset)
    seconds = time.perf_counter() - t0
    if params["algo"] == "BPR":
        def part(iu):
            return model.u_factors[iu] @ model.i_factors.T + model.i_biases[None, :]
    else:
        def part(iu):
            return np.asarray(model.U[iu] @ model.B, dtype=np.float32)
    return RankFitted(_known_scores(part, known_u, known_i, n_items), seconds, iterations, len(users), model)


def fit_lightfm(params, users, items, n_users, n_items, threads, seed) -> RankFitted:
    """LightFM (``loss="warp"``), ids only: score ``user_embeddings @ item_embeddings.T + item_biases``."""
    from lightfm import LightFM

    kwargs = dict(params["kwargs"])
    epochs = int(kwargs.pop("epochs", 30))
    model = LightFM(random_state=seed, **kwargs)
    X = _user_items(users, items, n_users, n_items).tocoo()
    t0 = time.perf_counter()
    model.fit(X, epochs=epochs, num_threads=threads)
    seconds = time.perf_counter() - t0

    def scores(u):
        return (model.user_embeddings[u] @ model.item_embeddings.T + model.item_biases[None, :]).astype(np.float32)

    return RankFitted(scores, seconds, epochs, len(users), model)
