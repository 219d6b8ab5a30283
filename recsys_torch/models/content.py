"""Content-based factorization: the item vector comes from the item's features only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys_torch.data.features import Features
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError
from recsys_torch.checks import number
from recsys_torch.models.base import FactorizationModel, Side, bias_embedding, id_embedding
from recsys_torch.models.layers import FeatureTower, as_features, damped_biases

USER_TOWERS = ("id", "features", "both")


class ContentModel(FactorizationModel):
    """``score = mu + b_u + b_i + <user_vector(u), f(features(i))>``.

    The item vector is the item feature tower's output, so an item nobody rated is scored like any
    other. The item bias is the feature tower's bias plus, when ``item_id_bias``, an id bias that
    training items learn and unknown items lack (masked to zero). The user vector is a user id
    embedding (``user_tower=id``), the user feature tower (``features``) or their sum (``both``); a
    user unseen in training keeps only the feature part. ``reg`` weighs the squared norms of the id
    rows and feature rows used, ``reg_bias`` those of the biases; ``bias_init_damping`` starts the id
    biases at damped means (:func:`.layers.damped_biases`) rather than at zero.
    """

    scores_unknown_items = True
    wants_features = True

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_features: Features | None = None,
        user_features: Features | None = None,
        embedding_dim: int = 32,
        hidden: Sequence[int] = (),
        user_tower: str = "both",
        item_id_bias: bool = True,
        reg: float = 0.05,
        reg_bias: float = 0.01,
        reg_features: float | None = None,
        init_std: float = 0.1,
        bias_init_damping: float | None = None,
        reg_exponent: float = 0.0,
    ) -> None:
        super().__init__(n_users, n_items, reg_exponent)
        item_features, user_features = as_features(item_features), as_features(user_features)
        if item_features is None:
            raise ConfigError(
                "model=content builds item vectors from item features, and this data set has none: "
                "use data with an item table (data.items=..., data.item_features=...) or model=mf"
            )
        if user_tower not in USER_TOWERS:
            raise ConfigError(f"model.user_tower must be one of {USER_TOWERS}, got {user_tower!r}")
        if user_tower == "features" and user_features is None:
            raise ConfigError("model.user_tower=features needs user features, and this data set has none "
                              "(use user_tower=id or both, or add data.users=...)")
        self.bias_init_damping = number("model.bias_init_damping", bias_init_damping, float, 0, allow_none=True)
        self.embedding_dim = number("model.embedding_dim", embedding_dim, int, 1)
        self.reg = number("model.reg", reg, float, 0)
        self.reg_bias = number("model.reg_bias", reg_bias, float, 0)
        reg_features = number("model.reg_features", self.reg if reg_features is None else reg_features, float, 0)
        init_std = number("model.init_std", init_std, float, 0)
        hidden = [number("model.hidden", h, int, 1) for h in hidden or ()]
        self.item_tower = FeatureTower(item_features, self.embedding_dim, hidden, reg_features, reg_bias, init_std)
        self.item_bias = bias_embedding(n_items) if item_id_bias else None
        self.user_factors = None
        self.user_tower = None
        if user_tower in ("id", "both"):
            self.user_factors = id_embedding(n_users, self.embedding_dim, init_std)
        if user_tower in ("features", "both") and user_features is not None:
            self.user_tower = FeatureTower(user_features, self.embedding_dim, hidden, reg_features, reg_bias,
                                           init_std)
        self.user_bias = bias_embedding(n_users)

    @torch.no_grad()
    def prepare(self, train: Interactions) -> None:
        super().prepare(train)
        if self.bias_init_damping is not None:
            b_u, b_i = damped_biases(train, self.global_bias, self.n_users, self.n_items, self.bias_init_damping)
            self.user_bias.weight.copy_(b_u.unsqueeze(1))
            if self.item_bias is not None:
                self.item_bias.weight.copy_(b_i.unsqueeze(1))

    def user_side(self, users: torch.Tensor) -> Side:
        k = self._known(self.known_users, users)
        scale = self._reg_scale("user", users)
        b = self.user_bias(users).squeeze(-1)
        penalty = scale * self.reg_bias * b * b
        bias = b * k
        vector = None
        if self.user_factors is not None:
            v = self.user_factors(users)
            penalty = penalty + scale * self.reg * (v * v).sum(-1)
            vector = v * k.unsqueeze(-1)
        if self.user_tower is not None:
            f, fb, fp = self.user_tower(users)
            vector = f if vector is None else vector + f
            bias = bias + fb
            penalty = penalty + fp
        return Side(vector, bias, penalty)

    @property
    def scores_unknown_users(self) -> bool:
        return self.user_tower is not None

    @torch.no_grad()
    def new_user(self, items: torch.Tensor, bag=None) -> Side:
        if bag is None or self.user_tower is None:
            return super().new_user(items, bag)
        vector, bias, _ = self.user_tower.encode(*bag)
        return Side(vector[0], bias[0], 0.0)

    def item_side(self, items: torch.Tensor) -> Side:
        vector, bias, penalty = self.item_tower(items)
        if self.item_bias is not None:
            b = self.item_bias(items).squeeze(-1)
            penalty = penalty + self._reg_scale("item", items) * self.reg_bias * b * b
            bias = bias + b * self._known(self.known_items, items)
        return Side(vector, bias, penalty)
