"""Recommend from a trained run: top-N for a user of the run (with a reason per item), items similar
to an item, and fold-in of a new user from a few ratings and/or user features.

Every model shares ``score = mu + b_u + b_i + <user_vector, item_vector>``, so one routine serves
them all: the item side is computed once, frozen, and a user (known, or folded in) is scored against
it. Only torch is imported at module level; the checkpoint machinery is imported when a run is
loaded, so ``scripts/recommend.py`` starts fast.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recsys_torch.errors import CheckpointError, ConfigError, RecsysError, UnknownIdError

CHECKPOINT_NAME = "checkpoint.pt"
N_REASONS = 2  # liked items named per recommendation


@dataclass
class Recommendation:
    item: str  # raw id
    title: str
    score: float
    reason: str | None = None

    def as_dict(self) -> dict:
        out = {"item": self.item, "title": self.title, "score": self.score}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class UserVector:
    """A user scored against the frozen item side: a vector (``None`` for bias-only models) and a
    bias, plus the item codes the user gave and which of those the user liked."""

    vector: torch.Tensor | None
    bias: float
    rated: torch.Tensor  # item codes to exclude
    liked: torch.Tensor  # item codes to explain recommendations with


def _task_of(config: dict) -> tuple[bool, float | None, str]:
    """(implicit?, positive threshold, loss) of the run's task."""
    task = (config or {}).get("task") or {}
    if not str(task.get("_target_", "")).endswith("RankingTask"):
        return False, None, "mse"
    threshold = task.get("threshold", 4.0)
    return True, None if threshold is None else float(threshold), str(task.get("loss", "bpr"))


class Recommender:
    """A trained model with its id maps, titles and training interactions.

    ``Recommender.load(run_dir)`` reads ``run_dir/checkpoint.pt``; the constructor takes the parts
    directly (``train_*``: the training rows, to exclude already rated items and to explain).
    """

    def __init__(self, model, user_ids, item_ids, item_titles=None, train_users=None, train_items=None,
                 train_ratings=None, config: dict | None = None, rating_scale=None,
                 user_vocab: list[str] | None = None, user_dense: list[str] | None = None) -> None:
        self.model = model.eval()
        self.user_ids = [str(u) for u in user_ids]
        self.item_ids = [str(i) for i in item_ids]
        self.titles = [str(t) for t in item_titles] if item_titles else list(self.item_ids)
        self.implicit, self.threshold, self.loss = _task_of(config or {})
        self.rating_scale = tuple(rating_scale) if rating_scale else None
        self.user_vocab = user_vocab
        self.user_dense = user_dense or []
        self._user_index: dict[str, int] | None = None
        self._item_index: dict[str, int] | None = None
        with torch.no_grad():
            self.items = model.item_table()  # Side: frozen vectors [n_items, d] (or None) and biases
            self.global_bias = float(model.global_bias)
        self.candidates = model.known_items.cpu().clone()
        if getattr(model, "scores_unknown_items", False):
            self.candidates[:] = True
        self._train = None
        if train_users is not None:
            self._train = (train_users.long(), train_items.long(), train_ratings.float())

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, run: str) -> "Recommender":
        """A run folder (holding ``checkpoint.pt``) or a checkpoint file."""
        from recsys_torch.io import load_checkpoint, model_from_checkpoint

        path = os.path.join(run, CHECKPOINT_NAME) if os.path.isdir(run) else run
        if not os.path.exists(path):
            where = f"no {CHECKPOINT_NAME} in {run}" if os.path.isdir(run) else f"{run} does not exist"
            raise CheckpointError(f"{where}: give run_dir= the output folder of a finished scripts/train.py run")
        state = load_checkpoint(path)
        for key in ("state_dict", "model_target", "user_ids", "item_ids"):
            if key not in state:
                raise CheckpointError(f"{path} has no {key!r}: it was not written by recsys_torch.train")
        try:
            model = model_from_checkpoint(state)
        except RecsysError:
            raise
        except Exception as exc:  # a checkpoint whose weights do not fit its model class
            raise CheckpointError(f"cannot rebuild the model of {path}: {str(exc).splitlines()[0][:200]}") from None
        train = state.get("train") or {}
        uf = state.get("user_features") or {}
        return cls(model, state["user_ids"], state["item_ids"], state.get("item_titles"),
                   train.get("users"), train.get("items"), train.get("ratings"), state.get("config"),
                   state.get("rating_scale"), uf.get("vocab"), uf.get("dense_names"))

    # ---- ids ----------------------------------------------------------------------------------
    def user_code(self, user) -> int:
        if self._user_index is None:
            self._user_index = {u: c for c, u in enumerate(self.user_ids)}
        code = self._user_index.get(str(user).strip())
        if code is None:
            raise UnknownIdError(f"unknown user {str(user)!r}: not among the {len(self.user_ids)} users of this run "
                                 "(give ratings=ITEM:R,... to recommend for a new user)")
        return code

    def item_code(self, item) -> int:
        if self._item_index is None:
            self._item_index = {i: c for c, i in enumerate(self.item_ids)}
        code = self._item_index.get(str(item).strip())
        if code is None:
            raise UnknownIdError(f"unknown item {str(item)!r}: not among the {len(self.item_ids)} items of this run")
        return code

    def title(self, code: int) -> str:
        return self.titles[code]

    # ---- the user's history ---------------------------------------------------------------------
    def history(self, code: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item codes and ratings of a user's training rows."""
        if self._train is None:
            raise CheckpointError("this run saved no training interactions, so it cannot tell what a user "
                                  "rated: pass exclude_rated=false")
        users, items, ratings = self._train
        # one pass over the rows: cheaper than any index for the single user a query asks about
        mine = users == code
        return items[mine], ratings[mine]

    def _liked(self, items: torch.Tensor, ratings: torch.Tensor, trained: bool = False) -> torch.Tensor:
        """The items a user rated highly. Ranking runs: the positives (a ranking run's training rows
        are all positives, stored with rating 1). Rating runs: the ratings at or above the user's own
        mean and above the middle of the rating scale."""
        if len(items) == 0:
            return items
        if self.implicit:
            return items if trained or self.threshold is None else items[ratings >= self.threshold]
        middle = sum(self.rating_scale) / 2 if self.rating_scale else float(ratings.min())
        return items[(ratings >= ratings.mean()) & (ratings > middle)]

    # ---- top-N --------------------------------------------------------------------------------
    def recommend(self, user, k: int = 10, exclude_rated: bool = True) -> list[Recommendation]:
        """The top ``k`` items for a user of the run, best first, each with a reason."""
        code = self.user_code(user)
        if not bool(self.model.known_users[code]) and getattr(self.model, "user_tower", None) is None:
            raise UnknownIdError(f"user {str(user)!r} has no training data in this run, so no trained vector "
                                 "(give their ratings=ITEM:R,... to fold them in)")
        if self._train is not None or exclude_rated:
            items, ratings = self.history(code)  # raises when the run saved no training rows
        else:
            items, ratings = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        with torch.no_grad():
            scores = self.model.score_all(torch.tensor([code]), self.items)[0].float()
        return self._top(scores, k, items if exclude_rated else None, self._liked(items, ratings.float(), trained=True),
                         f"user {user}")

    def recommend_for(self, vec: UserVector, k: int = 10, exclude_rated: bool = True) -> list[Recommendation]:
        """The top ``k`` items for a folded-in user (see :meth:`fold_in`)."""
        scores = self.global_bias + vec.bias + self.items.bias.float()
        if vec.vector is not None and self.items.vector is not None:
            scores = scores + self.items.vector.float() @ vec.vector.float()
        return self._top(scores, k, vec.rated if exclude_rated else None, vec.liked, "this user")

    def _check_k(self, k, available: int, who: str, n_excluded: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        n_catalog = int(self.candidates.sum())
        if k > n_catalog:
            raise ConfigError(f"k={k} is more than the {n_catalog} items this run can recommend")
        if k > available:
            raise ConfigError(f"k={k} but only {available} items are left for {who} "
                              f"({n_catalog} in the catalog, {n_excluded} excluded)")
        return k

    def _top(self, scores: torch.Tensor, k: int, exclude: torch.Tensor | None, liked: torch.Tensor,
             who: str) -> list[Recommendation]:
        allowed = self.candidates.clone()
        n_excluded = 0
        if exclude is not None and len(exclude):
            n_excluded = int(allowed[exclude].sum())
            allowed[exclude] = False
        k = self._check_k(k, int(allowed.sum()), who, n_excluded)
        masked = torch.where(allowed, scores.double(), torch.tensor(-math.inf, dtype=torch.float64))
        # a stable sort: equal scores go to the lower item code, whatever the platform
        top = torch.sort(masked, descending=True, stable=True).indices[:k]
        reasons = self._reasons(top, liked)
        return [Recommendation(self.item_ids[c], self.titles[c], float(scores[c]), r)
                for c, r in zip(top.tolist(), reasons)]

    def _reasons(self, top: torch.Tensor, liked: torch.Tensor) -> list[str | None]:
        """Per recommended item, the user's liked items closest to it (cosine of item vectors)."""
        if self.items.vector is None:
            return ["popular with everyone (this model is not personalized)"] * len(top)
        if len(liked) == 0:
            return [None] * len(top)
        rec = F.normalize(self.items.vector[top].float(), dim=1)
        own = F.normalize(self.items.vector[liked].float(), dim=1)
        sim = rec @ own.T  # [k, n_liked]
        n = min(N_REASONS, len(liked))
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :n]
        out = []
        for row, idx in enumerate(order.tolist()):
            names = [self.titles[int(liked[j])] for j in idx if float(sim[row, j]) > 0]
            out.append("because you liked " + " and ".join(names) if names else None)
        return out

    # ---- similar items ------------------------------------------------------------------------
    def similar_items(self, item, k: int = 10) -> list[Recommendation]:
        """The ``k`` items whose vectors have the highest cosine with the item's vector."""
        code = self.item_code(item)
        if self.items.vector is None:
            raise CheckpointError(f"this run's model ({type(self.model).__name__}) has no item vectors, so it "
                                  "cannot find similar items: use a run of model=mf, content or hybrid")
        if not bool(self.candidates[code]):
            raise UnknownIdError(f"item {str(item)!r} ({self.titles[code]}) has no ratings in this run's training "
                                 "data, so it has no trained vector")
        table = F.normalize(self.items.vector.float(), dim=1)
        sim = table @ table[code]
        return self._top(sim, k, torch.tensor([code]), torch.zeros(0, dtype=torch.long), f"item {item}")

    # ---- fold-in ------------------------------------------------------------------------------
    def parse_ratings(self, ratings) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(raw item, rating), ...]`` (or a dict) -> item codes and ratings; a repeated item keeps
        its last rating."""
        pairs = list(ratings.items()) if isinstance(ratings, dict) else list(ratings)
        by_code: dict[int, float] = {}
        for item, value in pairs:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"the rating of item {item!r} is not a finite number: {value}")
            if self.rating_scale and not self.rating_scale[0] <= value <= self.rating_scale[1]:
                raise ConfigError(f"the rating {value:g} of item {item!r} is outside this run's rating scale "
                                  f"[{self.rating_scale[0]:g}, {self.rating_scale[1]:g}]")
            by_code[self.item_code(item)] = value
        codes = torch.tensor(list(by_code), dtype=torch.long)
        return codes, torch.tensor(list(by_code.values()), dtype=torch.float32)

    def fold_in(self, ratings=(), user_features=None, steps: int = 100) -> UserVector:
        """Fit a new user's vector and bias against the frozen item side.

        ``ratings``: ``(raw item, rating)`` pairs. Runs trained on ratings solve the ridge regression
        of the training objective in closed form; ranking runs minimize their loss (softmax or BPR)
        against every item with L-BFGS (``steps`` iterations at most). The L2 weight is the model's own
        (``reg`` times the user's count to the power ``1 - reg_exponent``, as in training).
        ``user_features``: ``{"column": value or [values]}`` for models with a user feature tower:
        they give the starting vector that the ratings then correct.
        """
        codes, values = self.parse_ratings(ratings)
        prior_vec, prior_bias = self._prior(codes, user_features)
        if len(codes) == 0:
            if user_features is None:
                raise ConfigError("give at least one rating (ratings=ITEM:R,...) or user features to fold in a new user")
            return UserVector(prior_vec, prior_bias, codes, codes)
        # an item training never saw has no trained vector: it tells nothing about the user, and is
        # only excluded from the recommendations
        known = self.candidates[codes]
        if not bool(known.any()):
            vec, bias = prior_vec, prior_bias
        elif self.implicit:
            vec, bias = self._fit_ranking(codes[known], values[known], prior_vec, prior_bias, steps)
        else:
            vec, bias = self._fit_ratings(codes[known], values[known], prior_vec, prior_bias)
        return UserVector(vec, bias, codes, self._liked(codes[known], values[known]))

    def _reg(self, n: int) -> tuple[float, float]:
        scale = max(n, 1) ** (1.0 - float(getattr(self.model, "reg_exponent", 0.0)))
        reg = float(getattr(self.model, "reg", 0.0))
        reg_bias = float(getattr(self.model, "reg_bias", 0.0))
        return reg * scale + 1e-6, reg_bias * scale + 1e-6  # jitter: solvable with reg=0 and few ratings

    def _fit_ratings(self, codes, values, prior_vec, prior_bias) -> tuple[torch.Tensor | None, float]:
        """Ridge regression of ``r - mu - b_i`` on ``[q_i, 1]``, shrunk towards the prior."""
        resid = values.double() - self.global_bias - self.items.bias[codes].double() - prior_bias
        lam_vec, lam_bias = self._reg(len(codes))
        if self.items.vector is None:
            return None, prior_bias + float(resid.sum() / (len(codes) + lam_bias))
        q = self.items.vector[codes].double()
        resid = resid - q @ prior_vec.double()
        x = torch.cat([q, torch.ones(len(codes), 1, dtype=torch.float64)], 1)
        penalty = torch.full((x.shape[1],), lam_vec, dtype=torch.float64)
        penalty[-1] = lam_bias
        w = torch.linalg.solve(x.T @ x + torch.diag(penalty), x.T @ resid)
        return (prior_vec.double() + w[:-1]).float(), prior_bias + float(w[-1])

    def _fit_ranking(self, codes, values, prior_vec, prior_bias, steps) -> tuple[torch.Tensor | None, float]:
        """Minimize the run's ranking loss of the user's positives against every candidate item."""
        positives = codes if self.threshold is None else codes[values >= self.threshold]
        if self.items.vector is None or len(positives) == 0:
            return prior_vec, prior_bias  # a bias does not change one user's ranking
        cand = torch.nonzero(self.candidates).squeeze(1)
        q, b = self.items.vector[cand].double(), self.items.bias[cand].double()
        position = torch.full((len(self.item_ids),), -1, dtype=torch.long)
        position[cand] = torch.arange(len(cand))
        pos = position[positives]
        is_pos = torch.zeros(len(cand), dtype=torch.bool)
        is_pos[pos] = True
        lam, _ = self._reg(len(pos))
        start = prior_vec.double()
        delta = torch.zeros_like(start, requires_grad=True)
        opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            s = b + q @ (start + delta)
            if self.loss == "softmax":
                loss = (torch.logsumexp(s, 0) - s[pos]).sum()
            else:  # BPR: each positive against every non-positive item
                loss = -F.logsigmoid(s[pos].unsqueeze(1) - s[~is_pos].unsqueeze(0)).mean(1).sum()
            loss = loss + lam * delta.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return (start + delta.detach()).float(), prior_bias

    def _prior(self, codes: torch.Tensor, user_features) -> tuple[torch.Tensor, float]:
        """Where a new user starts: the user feature tower's output (when features are given) plus the
        SVD++ term of the rated items (for models with one); zero otherwise."""
        d = self.items.vector.shape[1] if self.items.vector is not None else 0
        vec, bias = torch.zeros(d), 0.0
        if user_features is not None:
            vec, bias = self._from_features(user_features)
        implicit = getattr(self.model, "implicit", None)
        if len(codes) and d and implicit is not None and hasattr(implicit, "y"):
            with torch.no_grad():
                vec = vec + implicit.y.weight[codes].sum(0) / math.sqrt(len(codes))
        return vec.float(), float(bias)

    def _from_features(self, user_features: dict) -> tuple[torch.Tensor, float]:
        tower = getattr(self.model, "user_tower", None)
        if tower is None or self.user_vocab is None:
            raise CheckpointError(f"this run's model ({type(self.model).__name__}) has no user feature tower: "
                                  "recommending from user features needs model=content or hybrid trained on data "
                                  "with user features")
        index, weight = self._feature_bag(user_features)
        n_dense = tower.dense.shape[1]
        with torch.no_grad():
            # the tower reads its bags from buffers indexed by user code: give it a one-user table
            probe = copy.copy(tower)
            probe._buffers = {**tower._buffers, "index": index, "weight": weight, "dense": torch.zeros(1, n_dense)}
            vec, bias, _ = probe(torch.zeros(1, dtype=torch.long))
            fusion = getattr(self.model, "user_fusion", None)
            if fusion is not None:  # hybrid: fuse with an id part that a new user does not have
                zero = torch.zeros(1)
                vec, bias = fusion(torch.zeros_like(vec), zero, vec, bias, zero)
        return vec[0], float(bias[0])

    def _feature_bag(self, user_features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = {name: i for i, name in enumerate(self.user_vocab)}
        columns = sorted({name.split("=", 1)[0] for name in self.user_vocab[1:]})
        ids, weights = [], []
        for column, value in user_features.items():
            if column in self.user_dense:
                raise ConfigError(f"user feature {column!r} is numeric, and the run does not keep its scaling: "
                                  "give only categorical user features")
            if column not in columns:
                raise UnknownIdError(f"unknown user feature {column!r} (this run knows: {', '.join(columns)})")
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                fid = vocab.get(f"{column}={v}")
                if fid is None:
                    known = [n.split("=", 1)[1] for n in self.user_vocab if n.startswith(column + "=")]
                    raise UnknownIdError(f"unknown value {v!r} for user feature {column!r} "
                                         f"(known: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''})")
                ids.append(fid)
                weights.append(1.0 / len(values))  # a column sums to one, as when the run was built
        if not ids:
            ids, weights = [0], [0.0]
        return torch.tensor([ids]), torch.tensor([weights], dtype=torch.float32)
