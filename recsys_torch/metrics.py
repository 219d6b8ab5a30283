"""Evaluation: rating error and full-ranking top-N metrics. Pure functions of a model and data.

Full ranking scores every candidate item for each user (a matmul, chunked over users), masks the
user's training (and validation) items, and breaks ties by item code, so results do not depend on the
evaluation batch size or the device.
"""

from __future__ import annotations

import math

import torch

from recsys_torch.data.interactions import Interactions
from recsys_torch.models.base import FactorizationModel

RANKING_METRICS = ("precision", "recall", "ndcg", "hr", "map", "mrr", "coverage", "avg_popularity")


def _device(model: torch.nn.Module) -> torch.device:
    return model.global_bias.device


@torch.no_grad()
def predict(model: FactorizationModel, users: torch.Tensor, items: torch.Tensor,
            rating_scale: tuple[float, float] | None = None, batch_size: int = 65536,
            times: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted ratings for (user, item) pairs, clipped to ``rating_scale``; returned on the CPU.
    ``times``: the pairs' timestamps, for a model that :attr:`~.FactorizationModel.uses_time`."""
    was_training = model.training
    model.eval()
    device = _device(model)
    out = []
    times = times if times is not None and getattr(model, "uses_time", False) else None
    for n, (u, i) in enumerate(zip(users.split(batch_size), items.split(batch_size))):
        t = None if times is None else times[n * batch_size:(n + 1) * batch_size].to(device)
        pair = (u.to(device), i.to(device)) if t is None else (u.to(device), i.to(device), t)
        out.append(model(*pair).float().cpu())
    model.train(was_training)
    pred = torch.cat(out) if out else torch.zeros(0)
    if rating_scale is not None:
        pred = pred.clamp(rating_scale[0], rating_scale[1])
    return pred


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((pred.double() - target.double()) ** 2))) if len(pred) else math.nan


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean((pred.double() - target.double()).abs())) if len(pred) else math.nan


def unknown_masks(train: Interactions, data: Interactions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``data``: is its user / item unknown to ``train``?"""
    known_u = train.known_users().cpu()
    known_i = train.known_items().cpu()
    return ~known_u[data.users.cpu()], ~known_i[data.items.cpu()]


def unknown_counts(train: Interactions, data: Interactions) -> dict[str, int]:
    """Distinct users and items of ``data`` that ``train`` has never seen."""
    unk_u, unk_i = unknown_masks(train, data)
    return {
        "unknown_users": int(torch.unique(data.users.cpu()[unk_u]).numel()),
        "unknown_items": int(torch.unique(data.items.cpu()[unk_i]).numel()),
    }


def rating_metrics(model: FactorizationModel, data: Interactions, train: Interactions | None = None,
                   batch_size: int = 65536) -> dict[str, float]:
    """RMSE and MAE; with ``train`` given, also ``cold/...`` (rows whose user or item training never
    saw) and ``warm/...`` (the rest) when there are cold rows."""
    pred = predict(model, data.users, data.items, data.rating_scale, batch_size, data.timestamps)
    target = data.ratings.cpu()
    out = {"rmse": rmse(pred, target), "mae": mae(pred, target)}
    if train is not None:
        unk_u, unk_i = unknown_masks(train, data)
        cold = unk_u | unk_i
        if bool(cold.any()):
            out["cold/rmse"], out["cold/mae"] = rmse(pred[cold], target[cold]), mae(pred[cold], target[cold])
            out["cold/n_ratings"] = float(cold.sum())
            warm = ~cold
            if bool(warm.any()):  # a cold split may leave no warm rows: no NaN keys then
                out["warm/rmse"], out["warm/mae"] = rmse(pred[warm], target[warm]), mae(pred[warm], target[warm])
                out["warm/n_ratings"] = float(warm.sum())
    return out


def _csr(data: Interactions, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and item codes of each user's rows, users in code order."""
    order = torch.argsort(data.users.cpu(), stable=True)
    counts = torch.bincount(data.users.cpu(), minlength=n_users)
    indptr = torch.zeros(n_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, data.items.cpu()[order]


def user_entries(indptr: torch.Tensor, indices: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR entries of ``users``: (position in ``users``, item code) per entry."""
    starts, ends = indptr[users], indptr[users + 1]
    lengths = ends - starts
    row = torch.repeat_interleave(torch.arange(len(users)), lengths)
    offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return row, indices[torch.repeat_interleave(starts, lengths) + offset]


def _tie_broken(scores: torch.Tensor, items: torch.Tensor, n_items: int) -> torch.Tensor:
    """Scores in float64 less ``item code x 1e-9 / n_items``: ties go to the lower item code, below
    float32 resolution of real score differences."""
    return scores.double() - items.double() * (1e-9 / max(n_items, 1))


def _shares_storage(t: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether ``t`` lies in the memory of one of the model's parameters or buffers."""
    ptr = t.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def top_k(model: FactorizationModel, users: torch.Tensor, k: int,
          exclude: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
          candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items for each user (codes and scores, on the CPU), best first.

    ``exclude``: items not to recommend (e.g. already rated), as a boolean ``[len(users), n_items]``
    or as ``(rows, items)`` index pairs; ``candidates``: boolean ``[n_items]`` of items allowed at
    all. Ties go to the lower item code: the order of the scores in float64 less ``code x 1e-9 /
    n_items``. That order is found on the scores' own precision: a row's top ``k + 1`` there, and the
    exact tie-broken order of its top ``k`` whenever its ``k + 1``-th score lies more than the largest
    tie-break below its ``k``-th (every other row, one with near-ties at the cut, is ranked in float64
    whole), so the result is that of ranking every row in float64 at a fraction of the cost.
    """
    device = _device(model)
    scores = model.score_all(users.to(device)).cpu()
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    elif _shares_storage(scores, model):  # masked in place below: never a model's own tensor
        scores = scores.clone()
    n_items = scores.shape[1]
    if candidates is not None and not bool(candidates.all()):
        scores[:, torch.nonzero(~candidates.cpu()).squeeze(1)] = -math.inf
    if isinstance(exclude, tuple):
        scores[exclude] = -math.inf
    elif exclude is not None:
        scores.masked_fill_(exclude, -math.inf)
    k = min(k, n_items)
    if k == 0:
        return torch.zeros(len(scores), 0, dtype=torch.long), torch.zeros(len(scores), 0)
    if k == n_items:
        values, idx = torch.topk(_tie_broken(scores, torch.arange(n_items), n_items), k, dim=1, sorted=True)
        return idx, values.float()
    best, idx = torch.topk(scores, k + 1, dim=1, sorted=True)
    best = best.double()
    # the tie-break moves no score by 1e-9 or more: a row whose (k+1)-th score lies farther below its
    # k-th has the same top k set in float64, only possibly reordered among near-ties
    clear = (best[:, k] < best[:, k - 1] - 1e-9) & ~torch.isnan(best).any(1)
    broken = _tie_broken(best[:, :k], idx[:, :k], n_items)
    values, order = torch.sort(broken, dim=1, descending=True, stable=True)
    idx = torch.gather(idx[:, :k], 1, order)
    rest = torch.nonzero(~clear).squeeze(1)
    if len(rest):  # near-ties at the cut (or fewer than k + 1 unmasked items): every item in float64
        whole, whole_idx = torch.topk(_tie_broken(scores[rest], torch.arange(n_items), n_items), k, dim=1, sorted=True)
        values[rest], idx[rest] = whole, whole_idx
    return idx, values.float()


def _per_user_at_k(hits: torch.Tensor, n_true: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-user precision, recall, ndcg, hr, map and mrr at ``k`` from ``hits`` ``[U, >=k]``."""
    h = hits[:, :k].double()
    n_hit = h.sum(1)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)[(torch.clamp(n_true, max=k) - 1).long()]
    rank = torch.arange(1, k + 1, dtype=torch.float64)
    first = torch.where(h.any(1), 1.0 / (h.argmax(1).double() + 1), torch.zeros_like(n_hit))
    return {
        "precision": n_hit / k,
        "recall": n_hit / n_true,
        "ndcg": (h * discounts).sum(1) / ideal,
        "hr": (n_hit > 0).double(),
        "map": ((torch.cumsum(h, 1) / rank) * h).sum(1) / torch.clamp(n_true, max=k),
        "mrr": first,
    }


@torch.no_grad()
def ranking_metrics(
    model: FactorizationModel,
    data: Interactions,
    exclude: list[Interactions],
    train: Interactions,
    ks: list[int] | tuple[int, ...] = (10,),
    batch_size: int = 1024,
    candidates: torch.Tensor | None = None,
) -> dict[str, float]:
    """Full-ranking metrics at each K for the users with at least one item in ``data``.

    ``exclude``: parts whose items are masked per user (training, and validation when testing);
    ``train`` gives popularity counts; ``candidates`` (boolean over items) restricts the catalog,
    by default to the items seen in ``train``. Test items outside the candidates count as misses.
    Users are scored ``batch_size`` at a time; only their top ``max(ks)`` are kept, and every sum
    is taken once over all users, so the result is the same for any ``batch_size``.
    """
    was_training = model.training
    model.eval()
    n_items, n_users = model.n_items, model.n_users
    if candidates is None:
        candidates = train.known_items().cpu()
    popularity = train.item_counts().cpu().double()
    # each user's distinct test items, as sorted (user, item) keys
    keys = torch.unique(data.users.cpu() * n_items + data.items.cpu())
    n_true_all = torch.bincount(keys // n_items, minlength=n_users).double()
    ex_ptrs = [_csr(part, n_users) for part in exclude]
    eval_users = torch.nonzero(n_true_all).squeeze(1)
    k_max = max(ks)
    tops, reals, hits, n_true = [], [], [], []
    for users in eval_users.split(batch_size):
        pairs = [user_entries(ptr, idx, users) for ptr, idx in ex_ptrs]
        excl = (torch.cat([r for r, _ in pairs]), torch.cat([i for _, i in pairs])) if pairs else None
        top, values = top_k(model, users, k_max, excl, candidates)
        real = torch.isfinite(values)  # a masked item is never a recommendation
        wanted = users.unsqueeze(1) * n_items + top
        at = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
        tops.append(top)
        reals.append(real)
        hits.append((keys[at] == wanted) & real)
        n_true.append(n_true_all[users])
    model.train(was_training)
    if len(eval_users) == 0:
        return {**{f"{m}@{k}": math.nan for k in ks for m in RANKING_METRICS}, "n_users": 0.0}
    top, real, hit, n_true = torch.cat(tops), torch.cat(reals), torch.cat(hits), torch.cat(n_true)
    out: dict[str, float] = {}
    for k in ks:
        for name, per_user in _per_user_at_k(hit, n_true, k).items():
            out[f"{name}@{k}"] = float(per_user.mean())
        shown = top[:, :k][real[:, :k]]
        out[f"coverage@{k}"] = float(torch.unique(shown).numel()) / max(int(candidates.sum()), 1)
        # per item shown: a catalog smaller than k shows fewer than k items
        out[f"avg_popularity@{k}"] = float(popularity[shown].mean()) if len(shown) else 0.0
    out["n_users"] = float(len(eval_users))
    return out


def aggregate_folds(folds: list[dict]) -> dict:
    """Several folds' metrics as one: the mean over folds under each plain key, the sample standard
    deviation (n - 1 in the denominator) of every ``val/`` and ``test/`` metric beside it as
    ``<key>_std``, and the per-fold dicts under ``folds``. One fold is returned as it is."""
    if len(folds) == 1:
        return dict(folds[0])
    out: dict = {}
    for key in folds[0]:
        values = [f[key] for f in folds if isinstance(f.get(key), (int, float))]
        if len(values) != len(folds):
            continue
        t = torch.tensor(values, dtype=torch.float64)
        out[key] = float(t.mean())
        if key.startswith(("val/", "test/")):
            out[f"{key}_std"] = float(t.std(unbiased=True))
    out["folds"] = folds
    return out
