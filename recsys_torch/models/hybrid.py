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

    wants_features = True

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
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def prepare(self, train: Interactions) -> None:
        super().prepare(train)
        device = self.user_count.device
        self.user_count.copy_(train.user_counts().to(device).float())
        self.item_count.copy_(train.item_counts().to(device).float())
        if self.implicit is not None:
            self.implicit.set_items(train.users, train.items)
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

    def _side(self, side: str, ids, k, factors, biases, tower, fusion) -> Side:
        v = factors(ids)
        b = biases(ids).squeeze(-1)
        # only the id rows a prediction used are pulled towards zero
        penalty = k * self._reg_scale(side, ids) * (self.reg * (v * v).sum(-1) + self.reg_bias * b * b)
        if tower is None:
            return Side(v * k.unsqueeze(-1), b * k, penalty)
        f, fb, fp = tower(ids)
        vector, bias = fusion(v, b, f, fb, k)
        return Side(vector, bias, penalty + fp)

    def auxiliary_scores(self, users: torch.Tensor, items: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        """With ``feature_alone``: the pairs scored by the feature towers alone (as for a new user and a
        new item), fitted too with that weight, so the towers learn to stand alone and not only the
        residual the ids leave."""
        if not (self.training and self.feature_alone > 0) or (self.user_tower is None and self.item_tower is None):
            return []
        zero_u, zero_i = users.new_zeros(users.shape, dtype=self.global_bias.dtype), items.new_zeros(
            items.shape, dtype=self.global_bias.dtype)
        u = self._side("user", users, zero_u, self.user_factors, self.user_bias, self.user_tower, self.user_fusion)
        i = self._side("item", items, zero_i, self.item_factors, self.item_bias, self.item_tower, self.item_fusion)
        return [(self.feature_alone, self.global_bias + u.bias + i.bias + (u.vector * i.vector).sum(-1))]

    def user_side(self, users: torch.Tensor) -> Side:
        k = self._id_weight(self.known_users, self.user_count, users, self.user_id_dropout)
        s = self._side("user", users, k, self.user_factors, self.user_bias, self.user_tower, self.user_fusion)
        if self.implicit is None:
            return s
        y, yp = self.implicit(users)
        return Side(s.vector + y * k.unsqueeze(-1), s.bias, s.penalty + yp * k)

    def item_side(self, items: torch.Tensor) -> Side:
        k = self._id_weight(self.known_items, self.item_count, items, self.item_id_dropout)
        return self._side("item", items, k, self.item_factors, self.item_bias, self.item_tower, self.item_fusion)
