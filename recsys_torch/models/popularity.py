"""Non-personalized popularity."""

from __future__ import annotations

import torch

from recsys_torch.data.interactions import Interactions
from recsys_torch.checks import number
from recsys_torch.models.base import FactorizationModel, Side


class PopularityModel(FactorizationModel):
    """Scores an item by its popularity, the same for every user.

    For ratings it predicts the damped (Bayesian-average) item mean
    ``(sum of ratings + damping * global mean) / (count + damping)``; for ranking (``implicit``
    training data, where every rating is the same) the item order is by training count. Nothing is
    learned by gradient descent: :meth:`prepare` computes it from the training data.
    """

    def __init__(self, n_users: int, n_items: int, damping: float = 5.0, item_features=None,
                 user_features=None) -> None:  # features: accepted like every model's, not used
        super().__init__(n_users, n_items)
        self.damping = number("model.damping", damping, float, 0)
        self.register_buffer("item_score", torch.zeros(self.n_items))

    @torch.no_grad()
    def prepare(self, train: Interactions) -> None:
        super().prepare(train)
        device = self.item_score.device
        items = train.items.to(device)
        counts = torch.bincount(items, minlength=self.n_items).double()
        sums = torch.zeros(self.n_items, dtype=torch.float64, device=device).index_add_(
            0, items, train.ratings.to(device).double()
        )
        mu = self.global_bias.double()
        if len(train) and bool((train.ratings == train.ratings[0]).all()):
            # implicit feedback: every rating equal, so rank by count (a tiny count term, so the
            # predicted value stays the constant rating)
            score = counts / (counts.max().clamp(min=1) * 1e3)
        else:
            score = (sums + self.damping * mu) / (counts + self.damping) - mu
        self.item_score.copy_(score.float())

    def user_side(self, users):
        return Side(None, torch.zeros(users.shape[0], device=users.device), 0.0)

    def item_side(self, items):
        return Side(None, self.item_score.index_select(0, items), 0.0)
