"""Hybrid factorization: id embeddings fused with feature towers on both sides, optionally with the
SVD++ implicit-feedback term."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from recsys_torch.data.features import Features
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError
from recsys_torch.checks import number
from recsys_torch.models.base import FactorizationModel, Side, bias_embedding, id_embedding
from recsys_torch.models.layers import FUSIONS, FeatureTower, Fusion, ImplicitFeedback, as_features, damped_biases
from recsys_torch.sparse import Pairs


def _probability(name: str, value) -> float:
    return number(f"model.{name}", value, float, 0.0, 1.0)


class HybridModel(FactorizationModel):
    """``user_vector = fuse(P[u], g(user features)) [+ |N(u)|^-1/2 sum_j y_j]``,
    ``item_vector = fuse(Q[i], f(item features))``, biases likewise (see :class:`.layers.Fusion`).

    A side without features (none in the data, or ``use_*_features=false``) is its id part alone, so
    with no features at all this is biased MF (plus SVD++ with ``implicit``). An id unseen in training
    has its id vector and id bias masked: it is scored from its features.

    ``id_prior`` (count-aware fusion): the id part of an entity with ``n`` training ratings weighs
    ``n / (n + id_prior)``, so a rarely seen id leans on its features and a new one (``n = 0``) uses them
    alone; 0 gives every known id its full weight. ``user_id_dropout`` / ``item_id_dropout`` (both
    ``id_dropout`` unless set): during training, each example's user (item) id part is dropped, as if
    the id were unseen, with this probability (times ``id_prior / (n + id_prior)`` when ``id_prior`` is
    set: rare ids are dropped most, as they are the most like new ones), so the feature towers also
    learn to score on their own, as they must for cold users (items) (DropoutNet). A dropped user also
    loses its SVD++ term: a new user has no rating history either.

    ``reg`` weighs the squared norms of the id rows used (times ``count ** -reg_exponent``),
    ``reg_bias`` the id biases, ``reg_features`` the feature towers, ``reg_implicit`` the ``y_j`` rows.
    ``bias_init_damping``: start the id biases at damped means (:func:`.layers.damped_biases`)
    rather than at zero.

    ``day_bias`` (where the ratings have timestamps): Koren's day-specific user bias of timeSVD++, a
    bias for each (user, day) that training saw, for the mood of a rating session; ``reg_day_bias``
    weighs its square per rating. With ``id_prior``, a day of n training ratings weighs
    n / (n + id_prior), as the id parts do. A (user, day) training never saw, a new user, or a score without a
    time (serving) has none: the user's static bias is what is left, as for Koren's future days.
    Days are UTC calendar days of the timestamp (seconds). ``day_scale`` (with ``day_bias``): Koren's
    day-specific scaling of the item bias, ``c_(u,day) * b_i``, the day's spread between liked and
    disliked items; ``reg_day_scale`` weighs its square per rating.

    ``new_user_bias`` (rating tasks): after training, each item gets an offset for users training
    never saw, the damped mean of its training ratings' residuals under the model's new-user score
    (the user side from features alone): ``sum(r - score_new) / (n_i + id_prior)``. A known item's bias
    is learned next to the user biases of the users who rated it, so it is the item's effect on top of
    those raters' own leniency; a new user has no such bias, and is scored with the item's mean effect
    on a user known only by features. Every score of an unknown user adds it (evaluation and serving);
    known users never see it, and training is unchanged (it is set by :meth:`finish`).
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_features: Features | None = None,
        user_features: Features | None = None,
        embedding_dim: int = 64,
        fusion: str = "sum",
        hidden: Sequence[int] = (),
        implicit: bool = False,
        use_item_features: bool = True,
        use_user_features: bool = True,
        id_dropout: float = 0.0,
        user_id_dropout: float | None = None,
        item_id_dropout: float | None = None,
        reg: float = 0.05,
        reg_bias: float = 0.01,
        reg_features: float | None = None,
        reg_implicit: float | None = None,
        init_std: float = 0.1,
        bias_init_damping: float | None = None,
        reg_exponent: float = 0.0,
        id_prior: float = 0.0,
        feature_alone: float = 0.0,
        day_bias: bool = False,
        reg_day_bias: float = 0.3,
        day_scale: bool = False,
        reg_day_scale: float = 0.3,
        new_user_bias: bool = False,
    ) -> None:
        super().__init__(n_users, n_items, reg_exponent)
        self.id_prior = number("model.id_prior", id_prior, float, 0)
        self.feature_alone = number("model.feature_alone", feature_alone, float, 0)
        # training ratings per id (set by prepare; saved with the weights)
        self.register_buffer("user_count", self.known_users.float())
        self.register_buffer("item_count", self.known_items.float())
        item_features, user_features = as_features(item_features), as_features(user_features)
        self.embedding_dim = d = number("model.embedding_dim", embedding_dim, int, 1)
        self.reg = number("model.reg", reg, float, 0)
        self.reg_bias = number("model.reg_bias", reg_bias, float, 0)
        self.bias_init_damping = number("model.bias_init_damping", bias_init_damping, float, 0, allow_none=True)
        init_std = number("model.init_std", init_std, float, 0)
        hidden = [number("model.hidden", h, int, 1) for h in hidden or ()]
        if fusion not in FUSIONS:  # checked even when the data has no features to fuse
            raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {fusion!r}")
        id_dropout = _probability("id_dropout", id_dropout)
        user_id_dropout = id_dropout if user_id_dropout is None else user_id_dropout
        item_id_dropout = id_dropout if item_id_dropout is None else item_id_dropout
        self.user_id_dropout = _probability("user_id_dropout", user_id_dropout)
        self.item_id_dropout = _probability("item_id_dropout", item_id_dropout)
        reg_features = number("model.reg_features", self.reg if reg_features is None else reg_features, float, 0)
        self.user_factors = id_embedding(n_users, d, init_std)
        self.item_factors = id_embedding(n_items, d, init_std)
        self.user_bias = bias_embedding(n_users)
        self.item_bias = bias_embedding(n_items)
        self.item_tower = self.user_tower = self.item_fusion = self.user_fusion = None
        if item_features is not None and use_item_features:
            self.item_tower = FeatureTower(item_features, d, hidden, reg_features, reg_bias, init_std)
            self.item_fusion = Fusion(fusion, d)
        if user_features is not None and use_user_features:
            self.user_tower = FeatureTower(user_features, d, hidden, reg_features, reg_bias, init_std)
            self.user_fusion = Fusion(fusion, d)
        self.implicit = None
        if implicit:
            reg_implicit = number("model.reg_implicit", self.reg if reg_implicit is None else reg_implicit, float, 0)
            self.implicit = ImplicitFeedback(n_users, n_items, d, reg_implicit, init_std=0.01)
        self.day_bias = bool(day_bias)
        self.reg_day_bias = number("model.reg_day_bias", reg_day_bias, float, 0)
        self.day_scale = bool(day_scale) and self.day_bias
        self.reg_day_scale = number("model.reg_day_scale", reg_day_scale, float, 0)
        if self.day_bias:  # one row per (user, day) of the training data: sized by prepare
            self.register_buffer("day_keys", torch.zeros(0, dtype=torch.long))
            self.register_buffer("day_counts", torch.zeros(0))  # training ratings of each (user, day)
            self.user_day_bias = bias_embedding(0)
            if self.day_scale:
                self.user_day_scale = bias_embedding(0)
        self.new_user_bias = bool(new_user_bias)
        if self.new_user_bias:  # set by finish, after training; zero until then
            self.register_buffer("new_user_offset", torch.zeros(n_items))

    wants_features = True

    @property
    def uses_time(self) -> bool:
        return self.day_bias and len(self.day_keys) > 0

    @staticmethod
    def _day_key(users: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """One integer per (user, UTC day): the user in the high 32 bits, the day in the low."""
        return users.long() * (1 << 32) + torch.div(times.long(), 86400, rounding_mode="floor") + (1 << 31)

    def _size_day_table(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        self.day_keys, self.day_counts = keys, counts
        for table in (self.user_day_bias, getattr(self, "user_day_scale", None)):
            if table is not None:
                table.weight = torch.nn.Parameter(torch.zeros(len(keys), 1, device=keys.device))
                table.num_embeddings = len(keys)

    def _day_term(self, users: torch.Tensor, times: torch.Tensor | None, kept: torch.Tensor | None = None):
        """Each pair's ``(day bias, day scale of the item bias or None, penalty)``, or None (no times,
        no table). A (user, day) that training never saw (or a dropped user: ``kept`` 0) gets 0."""
        if times is None or not self.uses_time:
            return None
        key = self._day_key(users, times)
        pos = torch.searchsorted(self.day_keys, key).clamp_(max=len(self.day_keys) - 1)
        seen = (self.day_keys.index_select(0, pos) == key).to(self.global_bias.dtype)
        seen = seen if kept is None else seen * kept
        # count-aware, as the id parts: a day of n ratings weighs n / (n + id_prior), so a day of one
        # rating cannot fit that rating's noise (a row that few ratings touch moves about lr per Adam
        # step, whatever its penalty)
        if self.id_prior > 0:
            n = self.day_counts.index_select(0, pos)
            seen = seen * n / (n + self.id_prior)
        b = self.user_day_bias(pos).squeeze(-1)
        c = self.user_day_scale(pos).squeeze(-1) if self.day_scale else None
        penalty = seen * (self.reg_day_bias * b * b + (0.0 if c is None else self.reg_day_scale * c * c))
        return b * seen, None if c is None else c * seen, penalty

    @staticmethod
    def _with_day(scores: torch.Tensor, day, item_bias: torch.Tensor) -> torch.Tensor:
        """``scores`` plus the day bias and the day's scaling of ``item_bias`` (per pair)."""
        if day is None:
            return scores
        b, c, _ = day
        return scores + b if c is None else scores + b + c * item_bias

    @property
    def scores_unknown_items(self) -> bool:
        return self.item_tower is not None

    @property
    def scores_unknown_users(self) -> bool:
        return self.user_tower is not None

    @property
    def new_user_needs_model(self) -> bool:
        return self.user_tower is not None or self.implicit is not None

    @torch.no_grad()
    def new_user(self, items: torch.Tensor, bag=None) -> Side:
        """The fused feature part (a new user has no id part) plus the SVD++ term of ``items``."""
        device = self.global_bias.device
        vector, bias = torch.zeros(self.embedding_dim, device=device), torch.zeros((), device=device)
        if bag is not None and self.user_tower is not None:
            f, fb, _ = self.user_tower.encode(*(t.to(device) for t in bag))
            zero = torch.zeros(1, device=device)
            fused, fused_bias = self.user_fusion(torch.zeros_like(f), zero, f, fb, zero)
            vector, bias = fused[0], fused_bias[0]
        if self.implicit is not None and len(items):
            vector = vector + self.implicit.y.weight[items.to(device)].sum(0) / math.sqrt(len(items))
        return Side(vector, bias, 0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before id_prior: every known id at full weight, as it was trained
        for side in ("user", "item"):
            if prefix + f"{side}_count" not in state_dict and prefix + f"known_{side}s" in state_dict:
                state_dict[prefix + f"{side}_count"] = state_dict[prefix + f"known_{side}s"].float() * 1e30
        keys = state_dict.get(prefix + "day_keys")
        # the tables of the data it was trained on; same-sized ones are filled in place, as a resumed
        # fit's optimizer already holds them
        if self.day_bias and keys is not None and keys.shape != self.day_keys.shape:
            self._size_day_table(torch.empty_like(keys, device=self.day_keys.device),
                                 torch.empty(len(keys), device=self.day_keys.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def prepare(self, train: Interactions) -> None:
        super().prepare(train)
        device = self.user_count.device
        self.user_count.copy_(train.user_counts().to(device).float())
        self.item_count.copy_(train.item_counts().to(device).float())
        if self.implicit is not None:
            self.implicit.set_items(train.users, train.items)
        if self.day_bias:
            keys, counts = (torch.zeros(0, dtype=torch.long), torch.zeros(0)) if train.timestamps is None else \
                torch.unique(self._day_key(train.users, train.timestamps), return_counts=True)
            self._size_day_table(keys.to(device), counts.to(device).float())
        if self.new_user_bias:  # set again by finish, from the weights trained on this data
            self.new_user_offset.zero_()
        if self.bias_init_damping is not None:
            b_u, b_i = damped_biases(train, self.global_bias, self.n_users, self.n_items, self.bias_init_damping)
            self.user_bias.weight.copy_(b_u.unsqueeze(1))
            self.item_bias.weight.copy_(b_i.unsqueeze(1))

    def _id_weight(self, known: torch.Tensor, count: torch.Tensor, ids: torch.Tensor, dropout: float) -> torch.Tensor:
        """The weight of each example's id part: 0 for an id unseen in training, ``n / (n + id_prior)``
        for one seen ``n`` times (1 without a prior), and 0 when id dropout drops it."""
        k = self._known(known, ids)
        rare = None
        if self.id_prior > 0:
            n = count.index_select(0, ids)
            k = k * n / (n + self.id_prior)
            rare = self.id_prior / (n + self.id_prior)
        if self.training and dropout > 0:
            p = dropout if rare is None else dropout * rare
            k = k * (torch.rand(k.shape, device=k.device) >= p).to(k.dtype)
        return k

    def _rows(self, side: str, ids: torch.Tensor, alone: bool = False):
        """One side of a batch computed once per distinct entity: ``(side, features, inverse,
        per_example, id_weight)``. Everything that belongs to an entity (id rows, tower output, SVD++ term,
        penalties, the fusion) is a row per distinct entity, ``inverse`` mapping each example to its row;
        but ``side`` is per example when id dropout draws a different id weight for each (``per_example``).
        ``features`` (with ``alone``): the side from its features alone, as for a new entity, per row."""
        if side == "user":
            factors, biases, tower, fusion = self.user_factors, self.user_bias, self.user_tower, self.user_fusion
            known, count, dropout = self.known_users, self.user_count, self.user_id_dropout
        else:
            factors, biases, tower, fusion = self.item_factors, self.item_bias, self.item_tower, self.item_fusion
            known, count, dropout = self.known_items, self.item_count, self.item_id_dropout
        uniq, inverse = torch.unique(ids, return_inverse=True)
        per_example = self.training and dropout > 0  # then each example draws its own id weight
        k = self._id_weight(known, count, ids if per_example else uniq, dropout)
        v, b = factors(uniq), biases(uniq).squeeze(-1)
        # only the id rows a prediction used are pulled towards zero
        id_penalty = self._reg_scale(side, uniq) * (self.reg * (v * v).sum(-1) + self.reg_bias * b * b)
        f = fb = fp = y = yp = None
        if tower is not None:
            f, fb, fp = tower.rows(uniq)
        if side == "user" and self.implicit is not None:
            y, yp = self.implicit.rows(uniq)

        def gather(t):
            return t if t is None or not per_example else t.index_select(0, inverse)

        penalty = k * gather(id_penalty) + (0.0 if fp is None else gather(fp))
        if y is not None:  # a dropped (or new) user also loses the term: no rating history either
            penalty = penalty + gather(yp) * k
        if fusion is None or fusion.kind == "sum":  # k * (id vector + SVD++ term) + feature vector
            idv = v if y is None else v + y
            vector, bias = gather(idv) * k.unsqueeze(-1), gather(b) * k
            if f is not None:
                vector, bias = vector + gather(f), bias + gather(fb)
        else:
            vector, bias = fusion(gather(v), gather(b), gather(f), gather(fb), k)
            if y is not None:
                vector = vector + gather(y) * k.unsqueeze(-1)
        features = None
        if alone:  # no id part, so no id weight
            if fusion is None:
                features = Side(v.new_zeros(v.shape), b.new_zeros(b.shape), 0.0)
            else:
                features = Side(*fusion(torch.zeros_like(f), torch.zeros_like(fb), f, fb, torch.zeros_like(fb)), 0.0)
        return Side(vector, bias, penalty), features, inverse, per_example, k

    def _batch_side(self, side: str, ids: torch.Tensor, alone: bool = False) -> tuple[Side, Side | None]:
        """One side of a batch per example, and (``alone``) that side from its features alone."""
        result, features, inverse, per_example, _ = self._rows(side, ids, alone)
        if not per_example:
            result = Side(*(t.index_select(0, inverse) for t in result))
        if features is not None:
            features = Side(features.vector.index_select(0, inverse), features.bias.index_select(0, inverse), 0.0)
        return result, features

    def training_scores(self, users: torch.Tensor, items: torch.Tensor, times: torch.Tensor | None = None):
        """With ``feature_alone``: the same pairs are also fitted, each view with that weight, as serving
        scores them when the item is new (the user's whole vector against the item's feature part), when
        the user is new, and when both are. So the towers learn to stand alone where they must, and not
        only the residual the ids leave. A side without a tower has no new-entity view. The towers run
        once for every view. The day bias (``times``) belongs to the user id: it is in the views that
        keep the user's whole vector, and left out where id dropout drops the user."""
        alone = self.training and self.feature_alone > 0 and (self.user_tower is not None or self.item_tower is not None)
        u, fu, inv_u, drawn_u, k_u = self._rows("user", users, alone)
        i, fi, inv_i, drawn_i, _ = self._rows("item", items, alone)
        # a dropped user is scored as a new one: no day bias either
        day = self._day_term(users, times, (k_u > 0).to(k_u.dtype) if drawn_u else None)
        # an id weight per example, or a GPU (where the sparse path is untested and elementwise products
        # are cheap): the pairs' vectors are built per example
        if drawn_u or drawn_i or users.device.type != "cpu":
            u, i = (Side(*(t.index_select(0, inv) for t in side)) if not drawn else side
                    for side, inv, drawn in ((u, inv_u, drawn_u), (i, inv_i, drawn_i)))
            if alone:
                fu, fi = (Side(f.vector.index_select(0, inv), f.bias.index_select(0, inv), 0.0)
                          for f, inv in ((fu, inv_u), (fi, inv_i)))
            penalty, pair = u.penalty + i.penalty, self._pair

            def item_bias(side: Side) -> torch.Tensor:
                return side.bias
        else:  # row tables: each dot product over the pairs is one sampled sparse product
            penalty = u.penalty.index_select(0, inv_u) + i.penalty.index_select(0, inv_i)
            pairs = Pairs(inv_u, inv_i, len(u.bias), len(i.bias))

            def pair(a: Side, b: Side) -> torch.Tensor:
                return (self.global_bias + a.bias.index_select(0, inv_u) + b.bias.index_select(0, inv_i)
                        + pairs.dots(a.vector, b.vector))

            def item_bias(side: Side) -> torch.Tensor:
                return side.bias.index_select(0, inv_i)
        scores = self._with_day(pair(u, i), day, item_bias(i) if self.day_scale else None)
        if day is not None:
            penalty = penalty + day[2]
        if not alone:
            return scores, penalty, []
        views = [pair(fu, fi)]
        if self.item_tower is not None:  # the user's whole vector, and its day terms
            views.append(self._with_day(pair(u, fi), day, item_bias(fi) if self.day_scale else None))
        if self.user_tower is not None:
            views.append(pair(fu, i))
        return scores, penalty, [(self.feature_alone, view) for view in views]

    def _pair(self, u: Side, i: Side) -> torch.Tensor:
        return self.global_bias + u.bias + i.bias + (u.vector * i.vector).sum(-1)

    def score_with_penalty(self, users: torch.Tensor, items: torch.Tensor, times: torch.Tensor | None = None):
        """As the base model, plus each pair's day bias where ``times`` are given, and the new-user
        item bias where the user is unknown."""
        day = self._day_term(users, times)
        if day is None:
            scores, penalty = super().score_with_penalty(users, items)
        else:
            u, i = self.user_side(users), self.item_side(items)
            scores = self._with_day(self._pair(u, i), day, i.bias)
            penalty = u.penalty + i.penalty + day[2]
        if self.new_user_bias:
            new = (~self.known_users.index_select(0, users)).to(scores.dtype)
            scores = scores + new * self.new_user_offset.index_select(0, items)
        return scores, penalty

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, items: Side | None = None) -> torch.Tensor:
        scores = super().score_all(users, items)
        if self.new_user_bias:
            new = ~self.known_users.index_select(0, users)
            if bool(new.any()):
                scores[new] += self.new_user_offset
        return scores

    def new_user_item_offset(self) -> torch.Tensor | None:
        return self.new_user_offset if self.new_user_bias and bool(self.new_user_offset.any()) else None

    @torch.no_grad()
    def finish(self, train: Interactions, task=None) -> None:
        """Set the new-user item bias (``new_user_bias``) from the trained weights and ``train``: each
        item's damped mean residual under the new-user score, ``sum(r - score_new) / (n_i + id_prior)``.
        Ranking tasks (``task.implicit``) keep zero: their rows are positives, not ratings, and an item
        offset for new users would only rank the popular items of the training users higher."""
        if not self.new_user_bias:
            return
        self.new_user_offset.zero_()
        if (task is not None and task.implicit) or len(train) == 0:
            return
        was_training = self.training
        self.eval()
        try:
            device = self.global_bias.device
            items = self.item_table()
            # every user's side as a new user's: the features alone (zeros without a user tower)
            _, new, _, _, _ = self._rows("user", torch.arange(self.n_users, device=device), alone=True)
            total = torch.zeros(self.n_items, dtype=torch.float64, device=device)
            for start in range(0, len(train), 1 << 18):
                u, i, r = (t[start:start + (1 << 18)].to(device) for t in (train.users, train.items, train.ratings))
                score = (self.global_bias + new.bias.index_select(0, u) + items.bias.index_select(0, i)
                         + (new.vector.index_select(0, u) * items.vector.index_select(0, i)).sum(-1))
                total.index_add_(0, i, (r.to(score.dtype) - score).double())
            n = train.item_counts().to(device).double()
            offset = torch.where(n > 0, total / (n + self.id_prior).clamp(min=1e-12), torch.zeros_like(total))
            self.new_user_offset.copy_(offset.float())
        finally:
            self.train(was_training)

    def user_side(self, users: torch.Tensor) -> Side:
        return self._batch_side("user", users)[0]

    def item_side(self, items: torch.Tensor) -> Side:
        return self._batch_side("item", items)[0]
