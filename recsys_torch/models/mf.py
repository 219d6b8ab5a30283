"""Biased matrix factorization (Funk / Koren "SVD") and the bias-only baseline."""

from __future__ import annotations

import torch

from recsys_torch.checks import number
from recsys_torch.models.base import FactorizationModel, Side, bias_embedding, id_embedding


class BaselineModel(FactorizationModel):
    """Global mean plus regularized user and item biases (Surprise's BaselineOnly)."""

    def __init__(self, n_users: int, n_items: int, reg_bias: float = 0.02, reg_exponent: float = 0.0,
                 item_features=None, user_features=None) -> None:  # features: accepted, not used
        super().__init__(n_users, n_items, reg_exponent)
        self.reg_bias = number("model.reg_bias", reg_bias, float, 0)
        self.user_bias = bias_embedding(n_users)
        self.item_bias = bias_embedding(n_items)

    def _bias_side(self, side, table, known, ids) -> Side:
        b = table(ids).squeeze(-1)
        return Side(None, b * self._known(known, ids), self.reg_bias * self._reg_scale(side, ids) * b * b)

    def user_side(self, users):
        return self._bias_side("user", self.user_bias, self.known_users, users)

    def item_side(self, items):
        return self._bias_side("item", self.item_bias, self.known_items, items)


class MFModel(FactorizationModel):
    """score = mu + b_u + b_i + <p_u, q_i>. L2 acts on the rows a batch touches (``reg`` on factors,
    ``reg_bias`` on biases), per rating, as Funk/Surprise SGD does; an id unseen in training falls
    back to the global mean plus the biases that are known."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        embedding_dim: int = 64,
        reg: float = 0.05,
        reg_bias: float = 0.01,
        init_std: float = 0.1,
        reg_exponent: float = 0.0,
        item_features=None,  # accepted like every model's, not used
        user_features=None,
    ) -> None:
        super().__init__(n_users, n_items, reg_exponent)
        self.embedding_dim = number("model.embedding_dim", embedding_dim, int, 1)
        self.reg = number("model.reg", reg, float, 0)
        self.reg_bias = number("model.reg_bias", reg_bias, float, 0)
        init_std = number("model.init_std", init_std, float, 0)
        self.user_factors = id_embedding(n_users, self.embedding_dim, init_std)
        self.item_factors = id_embedding(n_items, self.embedding_dim, init_std)
        self.user_bias = bias_embedding(n_users)
        self.item_bias = bias_embedding(n_items)

    def _side(self, side, factors, biases, known, ids) -> Side:
        k = self._known(known, ids)
        v = factors(ids)
        b = biases(ids).squeeze(-1)
        penalty = self._reg_scale(side, ids) * (self.reg * (v * v).sum(-1) + self.reg_bias * b * b)
        return Side(v * k.unsqueeze(-1), b * k, penalty)

    def user_side(self, users):
        return self._side("user", self.user_factors, self.user_bias, self.known_users, users)

    def item_side(self, items):
        return self._side("item", self.item_factors, self.item_bias, self.known_items, items)
