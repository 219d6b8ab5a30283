"""`Interactions`: ratings as parallel tensors in one encoded id space."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class Interactions:
    """Parallel tensors ``users``, ``items`` (int64 codes), ``ratings`` (float32) and optional
    ``timestamps`` (int64), plus the sizes of the id space.

    Every split of a data set keeps the same ``n_users`` / ``n_items`` and the same raw-id maps, so
    a model built for one part can score any other part.
    """

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    n_users: int
    n_items: int
    timestamps: torch.Tensor | None = None
    user_ids: np.ndarray | None = None  # code -> raw id
    item_ids: np.ndarray | None = None
    rating_scale: tuple[float, float] | None = None
    weights: torch.Tensor | None = None  # float32: how much each row counts in the losses (None: 1)
    # a ranking task's explicit negatives that belong with these rows (ratings below its threshold, in
    # the same part of the split): the Gramian loss pushes their scores toward 0. Not rows of this set:
    # len(), subset and the metrics never see them; concat joins them and to() moves them.
    negatives: "Interactions | None" = None

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.ratings) != n:
            raise ValueError("users, items and ratings must have the same length")
        for name in ("timestamps", "weights"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(f"{name} must have the same length as ratings")

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, index: torch.Tensor | np.ndarray) -> "Interactions":
        """The rows at ``index`` (positions or a boolean mask), in the same id space."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        index = index.to(self.users.device, torch.long)
        return replace(
            self,
            users=self.users.index_select(0, index),
            items=self.items.index_select(0, index),
            ratings=self.ratings.index_select(0, index),
            timestamps=None if self.timestamps is None else self.timestamps.index_select(0, index),
            weights=None if self.weights is None else self.weights.index_select(0, index),
            negatives=None,  # which of them belong with a subset is the split's business
        )

    def concat(self, other: "Interactions") -> "Interactions":
        """Rows of both parts (same id space)."""
        ts = weights = None
        if self.timestamps is not None and other.timestamps is not None:
            ts = torch.cat([self.timestamps, other.timestamps])
        if self.weights is not None or other.weights is not None:
            weights = torch.cat([self.row_weights(), other.row_weights()])
        negatives = self.negatives if other.negatives is None else other.negatives
        if self.negatives is not None and other.negatives is not None:
            negatives = self.negatives.concat(other.negatives)
        return replace(
            self,
            users=torch.cat([self.users, other.users]),
            items=torch.cat([self.items, other.items]),
            ratings=torch.cat([self.ratings, other.ratings]),
            timestamps=ts,
            weights=weights,
            negatives=negatives,
        )

    def row_weights(self) -> torch.Tensor:
        """Each row's weight (1 where the data has none)."""
        return self.weights if self.weights is not None else torch.ones(len(self), device=self.ratings.device)

    def to(self, device: torch.device | str) -> "Interactions":
        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            users=move(self.users),
            items=move(self.items),
            ratings=move(self.ratings),
            timestamps=move(self.timestamps),
            weights=move(self.weights),
            negatives=None if self.negatives is None else self.negatives.to(device),
        )

    def pin_memory(self) -> "Interactions":
        """On the CPU in page-locked memory, for asynchronous copies to a GPU batch by batch."""
        data = self.to("cpu")
        return replace(data, users=data.users.pin_memory(), items=data.items.pin_memory(),
                       ratings=data.ratings.pin_memory(),
                       weights=None if data.weights is None else data.weights.pin_memory(),
                       negatives=None if data.negatives is None else data.negatives.pin_memory())

    def fingerprint(self) -> str:
        """A hash of the rows (users, items, ratings, timestamps, weights) and of the negatives: equal for the
        same data only."""
        import hashlib

        digest = hashlib.blake2b(digest_size=12)
        for t in (self.users, self.items, self.ratings, self.timestamps, self.weights):
            if t is not None:
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        digest.update(f"{self.n_users},{self.n_items}".encode())
        if self.negatives is not None:
            digest.update(b"negatives" + self.negatives.fingerprint().encode())
        return digest.hexdigest()

    def user_counts(self) -> torch.Tensor:
        return torch.bincount(self.users, minlength=self.n_users)

    def item_counts(self) -> torch.Tensor:
        return torch.bincount(self.items, minlength=self.n_items)

    def known_users(self) -> torch.Tensor:
        """Boolean mask over user codes: which users have at least one row here."""
        return self.user_counts() > 0

    def known_items(self) -> torch.Tensor:
        return self.item_counts() > 0

    def describe(self) -> str:
        return (
            f"{len(self):,} ratings, {int(self.known_users().sum()):,} users, "
            f"{int(self.known_items().sum()):,} items"
        )
