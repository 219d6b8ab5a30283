"""The factorization form every model shares.

    score(u, i) = global_bias + user_bias(u) + item_bias(i) + <user_vector(u), item_vector(i)>

A model only says how it builds each side (:meth:`user_side`, :meth:`item_side`). Scoring pairs,
full ranking against every item, the L2 penalty on the rows a batch touches and the masking of ids
unseen in training are written once, here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from recsys_torch.checks import number
from recsys_torch.data.interactions import Interactions


class Side(NamedTuple):
    """One side of the factorization for a batch of entities."""

    vector: torch.Tensor | None  # [B, d] or None for bias-only models
    bias: torch.Tensor  # [B]
    penalty: torch.Tensor | float  # [B] squared norms of the parameters used, already weighted


class FactorizationModel(nn.Module):
    """Base class. Subclasses implement :meth:`user_side` and :meth:`item_side`.

    ``known_users`` / ``known_items`` are buffers set by :meth:`prepare` from the training data; an id
    outside them has no trained id vector, so subclasses multiply their id parts by
    :meth:`_known` and fall back to features or to zero.
    """

    def __init__(self, n_users: int, n_items: int, reg_exponent: float = 0.0) -> None:
        super().__init__()
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.reg_exponent = number("model.reg_exponent", reg_exponent, float)
        self.register_buffer("global_bias", torch.zeros(()))
        self.register_buffer("known_users", torch.ones(self.n_users, dtype=torch.bool))
        self.register_buffer("known_items", torch.ones(self.n_items, dtype=torch.bool))
        self.register_buffer("user_reg_scale", torch.ones(self.n_users))
        self.register_buffer("item_reg_scale", torch.ones(self.n_items))

    # ---- to implement -------------------------------------------------------------------------
    def user_side(self, users: torch.Tensor) -> Side:
        raise NotImplementedError

    def item_side(self, items: torch.Tensor) -> Side:
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def prepare(self, train: Interactions) -> None:
        """Set data statistics before training: the global mean and which ids training knows."""
        device = self.global_bias.device
        self.global_bias.fill_(float(train.ratings.double().mean()) if len(train) else 0.0)
        self.known_users.copy_(train.known_users().to(device))
        self.known_items.copy_(train.known_items().to(device))
        # Per-example penalty weight count^-reg_exponent: 0 regularizes per rating (Funk SGD), 1 per
        # entity (a fixed Gaussian prior on each row, which shrinks rarely seen ids much harder).
        for scale, counts in ((self.user_reg_scale, train.user_counts()), (self.item_reg_scale, train.item_counts())):
            scale.copy_(counts.to(device).clamp(min=1).double().pow(-self.reg_exponent).float())

    def _reg_scale(self, side: str, ids: torch.Tensor) -> torch.Tensor:
        return (self.user_reg_scale if side == "user" else self.item_reg_scale).index_select(0, ids)

    def _known(self, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return mask.index_select(0, ids).to(self.global_bias.dtype)

    # whether scores depend on when a rating was given: then the rating task hands each row's timestamp
    # to training_scores and evaluation to forward (``times``); serving scores without it
    uses_time = False

    def forward(self, users: torch.Tensor, items: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        # without times, the two-argument call that subclasses written before ``times`` override
        return (self.score_with_penalty(users, items) if times is None else
                self.score_with_penalty(users, items, times))[0]

    def training_scores(self, users: torch.Tensor, items: torch.Tensor, times: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, torch.Tensor]]]:
        """What a rating loss fits: the pairs' scores, their per-example L2 penalty, and other views of
        the same pairs that training should also fit, with their weights (the hybrid's feature towers
        alone); here none. ``times``: each pair's timestamp (seconds), given when :attr:`uses_time`."""
        scores, penalty = self.score_with_penalty(users, items) if times is None else \
            self.score_with_penalty(users, items, times)
        return scores, penalty, []

    def score_with_penalty(self, users: torch.Tensor, items: torch.Tensor, times: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of (user, item) pairs and the per-example L2 penalty of the rows they touch (here
        ``times`` plays no part)."""
        u, i = self.user_side(users), self.item_side(items)
        score = self.global_bias + u.bias + i.bias
        if u.vector is not None and i.vector is not None:
            score = score + (u.vector * i.vector).sum(-1)
        return score, u.penalty + i.penalty

    @torch.no_grad()
    def item_table(self, chunk: int = 65536) -> Side:
        """Vectors and biases of every item (for full ranking)."""
        parts = [self.item_side(ids) for ids in torch.arange(self.n_items, device=self.global_bias.device).split(chunk)]
        vec = None if parts[0].vector is None else torch.cat([p.vector for p in parts])
        return Side(vec, torch.cat([p.bias for p in parts]), 0.0)

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, items: Side | None = None) -> torch.Tensor:
        """Scores of ``users`` against every item: ``[len(users), n_items]``."""
        items = self.item_table() if items is None else items
        u = self.user_side(users)
        if u.vector is None or items.vector is None:
            return (self.global_bias + u.bias).unsqueeze(1) + items.bias.unsqueeze(0)
        products = u.vector @ items.vector.T
        if products.dtype == self.global_bias.dtype and not (bool(u.bias.any()) or bool(items.bias.any())):
            # biases held at zero (a Gramian-loss run): the same sums, without a users x items matrix of them
            return products.add_(self.global_bias)
        return (self.global_bias + u.bias).unsqueeze(1) + items.bias.unsqueeze(0) + products

    # ---- what serving needs (recsys_torch.recommend calls these, and nothing else) ---------------
    wants_features = False  # built to use item / user features (content, hybrid)
    scores_unknown_items = False  # an item unseen in training still gets a vector (from its features)
    scores_unknown_users = False  # a user unseen in training still gets a vector (from user features)
    reg = 0.0  # L2 on the user vector (fold-in uses the training weights)
    reg_bias = 0.0  # L2 on the user bias

    @torch.no_grad()
    def user_table(self, chunk: int = 65536) -> Side:
        """Vectors and biases of every user, in chunks (a user side may gather each user's items)."""
        parts = [self.user_side(ids) for ids in torch.arange(self.n_users, device=self.global_bias.device).split(chunk)]
        vec = None if parts[0].vector is None else torch.cat([p.vector for p in parts])
        return Side(vec, torch.cat([p.bias for p in parts]), 0.0)

    def regularization(self) -> tuple[float, float, float]:
        """``(reg, reg_bias, reg_exponent)``: the L2 weights that fold-in gives a new user's vector and
        bias, scaled by their count as in training."""
        return float(self.reg), float(self.reg_bias), float(self.reg_exponent)

    def new_user_item_offset(self) -> torch.Tensor | None:
        """What a user that training never saw adds to each item's bias (``[n_items]``), in models
        that score unknown users so (the hybrid's ``new_user_bias``); None: nothing."""
        return None

    @torch.no_grad()
    def finish(self, train: Interactions, task=None) -> None:
        """Called by the trainer once the chosen weights are in place, with the data they were trained
        on: statistics a model takes from its trained weights and that data. Here none."""

    @property
    def new_user_needs_model(self) -> bool:
        """Whether :meth:`new_user` gives more than zeros (then serving a new user needs the model)."""
        return self.scores_unknown_users

    @torch.no_grad()
    def new_user(self, items: torch.Tensor, bag: tuple[torch.Tensor, torch.Tensor] | None = None) -> Side:
        """Where a user that training never saw starts, before fold-in fits it to the user's ratings:
        the user feature tower's output for ``bag`` (one user's ``(index, weight)``, ``[1, L]``) and the
        SVD++ term of the rated ``items``, in models that have them. Here: zero (``vector`` None)."""
        return Side(None, torch.zeros(()), 0.0)


def id_embedding(n: int, dim: int, std: float) -> nn.Embedding:
    """A sparse-gradient embedding table: an optimizer step touches only the rows in the batch."""
    emb = nn.Embedding(n, dim, sparse=True)
    nn.init.normal_(emb.weight, 0.0, std)
    return emb


def bias_embedding(n: int) -> nn.Embedding:
    emb = nn.Embedding(n, 1, sparse=True)
    nn.init.zeros_(emb.weight)
    return emb
