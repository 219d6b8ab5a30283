"""How well fold-in serves users that training never saw (``scripts/foldin_eval.py``).

For each test user of a ``split=cold_user`` run, ``n_given`` of their ratings (any value, drawn at
random) are given at query time as if typed into ``scripts/recommend.py ratings=...``; the user is
folded in against the frozen item side and every item is ranked, the given items masked. The targets
are the user's other positives (ratings at or above the run's threshold; every other rating for runs
without one). The same users, targets and masks score most-popular (training counts) and the model's
own scores for an unseen user (no fold-in: item biases, or user features for hybrid/content models).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from recsys_torch.errors import ConfigError


def rebuild(config: dict):
    """The run's data (every rating, before the task keeps its positives) and its split, built as
    the run built them (:func:`recsys_torch.train.build`)."""
    from omegaconf import OmegaConf

    from recsys_torch.train import build

    experiment = build(OmegaConf.create(config))
    return experiment.dataset.interactions, experiment.splits[0]


def query_sets(inter, split, rec, n_given: int, seed: int):
    """Per held-out user: the given (item, rating) rows and the target positives."""
    known = split.train.known_users()
    cold = torch.unique(split.test.users[~known[split.test.users]])
    if len(cold) == 0:
        raise ConfigError("this run holds no user out of training: train it with split=cold_user")
    rng = np.random.default_rng(seed)
    users = inter.users.numpy()
    order = np.argsort(users, kind="stable")
    starts = np.searchsorted(users[order], np.arange(inter.n_users + 1))
    out = []
    for u in cold.tolist():
        rows = order[starts[u]:starts[u + 1]]
        if len(rows) <= n_given:
            continue
        given = rng.choice(rows, n_given, replace=False)
        rest = np.setdiff1d(rows, given)
        ratings = inter.ratings.numpy()
        targets = rest if rec.threshold is None else rest[ratings[rest] >= rec.threshold]
        if len(targets):
            out.append((u, given, targets))
    return out


class FoldedUsers(torch.nn.Module):
    """Scores of folded-in users against the frozen items, shaped like a model for ranking_metrics."""

    def __init__(self, rec, vectors: dict, n_users: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, len(rec.item_ids)
        self.register_buffer("global_bias", torch.tensor(rec.global_bias))
        self.rec, self.vectors = rec, vectors

    def score_all(self, users):
        return torch.stack([torch.from_numpy(self.rec.scores_for(self.vectors[u].vector, self.vectors[u].bias, new=True))
                            for u in users.tolist()])


def evaluate(args: dict) -> dict:
    from recsys_torch.checkpoint import load_checkpoint
    from recsys_torch.metrics import ranking_metrics
    from recsys_torch.models import PopularityModel
    from recsys_torch.recommend import Recommender

    rec = Recommender.load(args["run_dir"])
    state = load_checkpoint(os.path.join(args["run_dir"], "checkpoint.pt"))
    inter, split = rebuild(state["config"])
    sets = query_sets(inter, split, rec, args["n_given"], args["seed"])
    item_ids = rec.item_ids
    vectors = {}
    for u, given, _ in sets:
        pairs = [(item_ids[i], float(inter.ratings[i_row])) for i_row, i in zip(given, inter.items[given].tolist())]
        vectors[u] = rec.fold_in(pairs)
    given_part = inter.subset(torch.from_numpy(np.concatenate([g for _, g, _ in sets])))
    target_part = inter.subset(torch.from_numpy(np.concatenate([t for _, _, t in sets])))
    ks = [args["k"]]
    popularity = PopularityModel(inter.n_users, inter.n_items)
    popularity.prepare(split.train)
    runs = {
        "fold-in": FoldedUsers(rec, vectors, inter.n_users),
        "most popular": popularity,
        "no fold-in": rec.model,
    }
    out = {"n_users": len(sets), "n_given": args["n_given"], "n_targets": len(target_part)}
    for name, model in runs.items():
        m = ranking_metrics(model, target_part, [given_part], split.train, ks, 256, torch.from_numpy(rec.candidates))
        out[name] = {key: value for key, value in m.items() if key != "n_users"}
    return out


def render(result: dict, k: int) -> str:
    cols = [f"ndcg@{k}", f"recall@{k}", f"precision@{k}", f"hr@{k}"]
    lines = [f"{result['n_users']} users held out of training, {result['n_given']} ratings each given at query "
             f"time, {result['n_targets']} target positives; all items ranked, given items masked",
             f"{'':<14}" + "".join(f"{c:>14}" for c in cols)]
    for name in ("fold-in", "most popular", "no fold-in"):
        lines.append(f"{name:<14}" + "".join(f"{result[name][c]:>14.4f}" for c in cols))
    return "\n".join(lines)
