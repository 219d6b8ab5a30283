"""Layers shared by the content and hybrid models: the feature tower, id/feature fusion and the
SVD++ implicit-feedback term.

Each returns, per entity of a batch, a vector, a bias (where it has one) and the per-example L2
penalty of the parameters it used, so models can hand them straight to :class:`~.base.Side`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys_torch.data.features import Features
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError
from recsys_torch.sparse import SparseMatrix

FUSIONS = ("sum", "gated", "concat")


def as_features(obj) -> Features | None:
    """``obj`` as :class:`Features`. Hydra's ``instantiate`` turns a dataclass passed as a keyword
    into a config node with the same fields; rebuild the dataclass from them."""
    if obj is None or isinstance(obj, Features):
        return obj
    return Features(index=obj.index, weight=obj.weight, dense=obj.dense, vocab=list(obj.vocab),
                    dense_names=list(obj.dense_names), present=obj.present)


@torch.no_grad()
def damped_biases(train: Interactions, mu: torch.Tensor, n_users: int, n_items: int,
                  damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Koren's baseline estimates: ``b_i = sum(r - mu) / (n_i + damping)``, then
    ``b_u = sum(r - mu - b_i) / (n_u + damping)``. Starting the id biases here rather than at zero
    means an early-stopped model keeps item effects as good as a damped item mean (which is what
    the popularity model predicts), instead of whatever a few epochs of gradient steps reached."""
    device = mu.device
    users, items = train.users.to(device), train.items.to(device)
    resid = train.ratings.to(device).to(mu.dtype) - mu
    item_n = torch.bincount(items, minlength=n_items).to(mu.dtype)
    b_i = torch.zeros(n_items, dtype=mu.dtype, device=device).index_add_(0, items, resid) / (item_n + damping)
    resid = resid - b_i.index_select(0, items)
    user_n = torch.bincount(users, minlength=n_users).to(mu.dtype)
    b_u = torch.zeros(n_users, dtype=mu.dtype, device=device).index_add_(0, users, resid) / (user_n + damping)
    return b_u, b_i


class FeatureTower(nn.Module):
    """Feature bag of an entity -> ``(vector [B, d], bias [B], penalty [B])``.

    Categorical and multi-valued features go through ``nn.EmbeddingBag(mode="sum")`` with the bag's
    weights (a multi-valued column sums to one per entity), numeric columns through a linear layer; an
    optional MLP (``hidden`` sizes, ReLU) maps the sum to the output. A second, one-dimensional bag
    (plus a linear term on the numeric columns) gives the entity a bias from its features, so an
    entity never seen in training still gets its own predicted offset.

    The feature tables are dense parameters (a feature vocabulary is small next to the id tables, and
    most features occur in most batches); the penalty is ``reg`` times the bag-weighted squared norms
    of the feature rows used, plus ``reg`` times the squared weights of the dense layers (every
    example uses them), ``reg_bias`` likewise for the bias terms.
    """

    def __init__(self, features: Features, dim: int, hidden: Sequence[int] = (), reg: float = 0.0,
                 reg_bias: float = 0.0, init_std: float = 0.1) -> None:
        super().__init__()
        # Not saved: a checkpoint rebuilds the model from the Features it stores beside the weights.
        self.register_buffer("index", features.index.long(), persistent=False)
        self.register_buffer("weight", features.weight.float(), persistent=False)
        self.register_buffer("dense", features.dense.float(), persistent=False)
        self.dim = int(dim)
        self.reg = float(reg)
        self.reg_bias = float(reg_bias)
        n_vocab, n_dense = features.n_vocab, features.n_dense
        self.bag = nn.EmbeddingBag(n_vocab, self.dim, mode="sum", padding_idx=0)
        self.bias_bag = nn.EmbeddingBag(n_vocab, 1, mode="sum", padding_idx=0)
        with torch.no_grad():
            nn.init.normal_(self.bag.weight, 0.0, init_std)
            self.bag.weight[0].zero_()
            self.bias_bag.weight.zero_()
        self.numeric = nn.Linear(n_dense, self.dim, bias=False) if n_dense else None
        self.numeric_bias = nn.Linear(n_dense, 1, bias=False) if n_dense else None
        if self.numeric is not None:
            nn.init.normal_(self.numeric.weight, 0.0, init_std)
            nn.init.zeros_(self.numeric_bias.weight)
        layers: list[nn.Module] = []
        width = self.dim
        for h in hidden or ():
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        if layers:
            layers.append(nn.Linear(width, self.dim))
        self.mlp = nn.Sequential(*layers) if layers else None

    def _dense_penalty(self) -> torch.Tensor:
        """Squared weights of the layers every example goes through (a scalar)."""
        total = self.bag.weight.new_zeros(())
        if self.numeric is not None:
            total = total + self.reg * self.numeric.weight.pow(2).sum()
            total = total + self.reg_bias * self.numeric_bias.weight.pow(2).sum()
        if self.mlp is not None:
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    total = total + self.reg * layer.weight.pow(2).sum()
        return total

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entities ``ids`` of the data the tower was built on, each distinct entity encoded once
        (a batch of ratings names the same item many times; the gradient of the copies adds up the same)."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        vector, bias, penalty = self.rows(uniq)
        return vector.index_select(0, inverse), bias.index_select(0, inverse), penalty.index_select(0, inverse)

    def rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entities ``ids`` encoded as given (one row each; for distinct ids)."""
        dense = self.dense.index_select(0, ids) if self.numeric is not None else None
        return self.encode(self.index.index_select(0, ids), self.weight.index_select(0, ids), dense)

    def encode(self, index: torch.Tensor, weight: torch.Tensor, dense: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any feature bags: ``index`` and ``weight`` ``[B, L]`` (padding id 0), ``dense`` ``[B, D]``
        (None: every numeric column at its mean, 0)."""
        vector = self.bag(index, per_sample_weights=weight)
        bias = self.bias_bag(index, per_sample_weights=weight).squeeze(-1)
        if self.numeric is not None:
            if dense is None:
                dense = vector.new_zeros(len(index), self.numeric.in_features)
            vector = vector + self.numeric(dense)
            bias = bias + self.numeric_bias(dense).squeeze(-1)
        if self.mlp is not None:
            vector = self.mlp(vector)
        row_sq = self.bag.weight.pow(2).sum(1)
        penalty = self.reg * (row_sq[index] * weight).sum(1)
        penalty = penalty + self.reg_bias * (self.bias_bag.weight.squeeze(1).pow(2)[index] * weight).sum(1)
        return vector, bias, penalty + self._dense_penalty()


class Fusion(nn.Module):
    """Combines an entity's id part and feature part into one vector and one bias.

    ``known`` (0/1 per entity) masks the id part: an id unseen in training contributes nothing, and
    the result is the feature part alone.

    * ``sum``: ``id + feat`` (LightFM).
    * ``gated``: ``g * id + (1 - g) * feat`` with ``g = known * sigmoid(w . [id, feat] + c)``, one
      learned weight per entity, computed from its own two vectors, so an uninformative feature can
      be switched off for entities whose id vector is good; the biases are mixed by the same ``g``.
    * ``concat``: ``W [id, feat]`` (a linear projection of the concatenation); biases add.
    """

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {kind!r}")
        self.kind = kind
        self.gate = nn.Linear(2 * dim, 1) if kind == "gated" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)  # start halfway: both parts get gradient
        self.project = nn.Linear(2 * dim, dim, bias=False) if kind == "concat" else None
        if self.project is not None:
            with torch.no_grad():  # start as the sum, so concat begins where sum does
                self.project.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], 1))

    def gate_of(self, id_vec: torch.Tensor, feat_vec: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """The id part's weight per entity ``[B]`` (gated fusion only); zero where ``known`` is 0."""
        return torch.sigmoid(self.gate(torch.cat([id_vec, feat_vec], -1))).squeeze(-1) * known

    def forward(self, id_vec, id_bias, feat_vec, feat_bias, known):
        id_vec = id_vec * known.unsqueeze(-1)
        id_bias = id_bias * known
        if self.kind == "sum":
            return id_vec + feat_vec, id_bias + feat_bias
        if self.kind == "concat":
            return self.project(torch.cat([id_vec, feat_vec], -1)), id_bias + feat_bias
        g = self.gate_of(id_vec, feat_vec, known)
        vec = g.unsqueeze(-1) * id_vec + (1 - g).unsqueeze(-1) * feat_vec
        return vec, g * id_bias + (1 - g) * feat_bias


class ImplicitFeedback(nn.Module):
    """The SVD++ term ``|N(u)|^-1/2 * sum_{j in N(u)} y_j`` over the items each user rated in training.

    :meth:`set_items` stores the training items per user as CSR (``indptr``, ``indices``); a batch
    turns its distinct users' CSR segments into one ``EmbeddingBag(mode="sum")`` call. The penalty is
    ``reg`` times the mean squared norm of the user's ``y_j`` rows, a second bag over the rows' squared
    norms. ``y`` is a dense table: a batch touches every item its users rated, which on rating data is
    far more rows than the catalog has, so a dense gradient is the smaller one. The CSR buffers are
    saved with the weights and resized on load.

    A batch whose distinct users are more than an eighth of all users (most rating batches on catalogs
    of MovieLens's size) computes the terms of all users as one sparse matrix product, ``N @ y`` with
    ``N`` the normalized user x item matrix (and ``N^T @ grad`` backward), and keeps its users' rows;
    the same sums as the bags', several times cheaper than a bag's sorting backward.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, reg: float = 0.0, init_std: float = 0.01) -> None:
        super().__init__()
        self.n_users = int(n_users)
        self.reg = float(reg)
        self.y = nn.EmbeddingBag(n_items, dim, mode="sum")
        nn.init.normal_(self.y.weight, 0.0, init_std)
        self.register_buffer("indptr", torch.zeros(self.n_users + 1, dtype=torch.long))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long))

    @torch.no_grad()
    def set_items(self, users: torch.Tensor, items: torch.Tensor) -> None:
        device = self.indptr.device
        users, items = users.to(device).long(), items.to(device).long()
        order = torch.argsort(users, stable=True)
        counts = torch.bincount(users, minlength=self.n_users)
        self.indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.indices = items[order]
        self._matrices = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the CSR's length depends on the training data, not on the constructor's arguments
        key = prefix + "indices"
        if key in state_dict:
            self.indices = torch.empty_like(state_dict[key], device=self.indptr.device)
        self._matrices = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _all_users(self) -> tuple[SparseMatrix, SparseMatrix]:
        """``(N, M)``: the user x item matrices with weights ``|N(u)|^-1/2`` (the term) and ``|N(u)|^-1``
        (the penalty's mean), built once per set of training items and device."""
        key = (self.indptr.data_ptr(), self.indices.data_ptr(), self.indptr.device)
        if getattr(self, "_matrices", None) is None or self._matrices[0] != key:
            lengths = self.indptr[1:] - self.indptr[:-1]
            per_row = torch.repeat_interleave(lengths.clamp(min=1).to(self.y.weight.dtype), lengths)
            shape = (self.n_users, self.y.num_embeddings)
            self._matrices = (key, SparseMatrix(self.indptr, self.indices, per_row.rsqrt(), shape),
                              SparseMatrix(self.indptr, self.indices, per_row.reciprocal(), shape))
        return self._matrices[1], self._matrices[2]

    def forward(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, inverse = torch.unique(users, return_inverse=True)
        vector, penalty = self.rows(uniq)
        return vector.index_select(0, inverse), penalty.index_select(0, inverse)

    def rows(self, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(term [B, d], penalty [B])`` of the distinct users ``uniq``."""
        if len(uniq) * 8 >= self.n_users and self.indices.numel():  # most users: every user's term at once
            term, mean = self._all_users()
            row_sq = self.y.weight.pow(2).sum(1, keepdim=True)
            vector, penalty = term(self.y.weight), self.reg * mean(row_sq).squeeze(1)
            return vector.index_select(0, uniq), penalty.index_select(0, uniq)
        starts = self.indptr.index_select(0, uniq)
        lengths = self.indptr.index_select(0, uniq + 1) - starts
        owner = torch.repeat_interleave(torch.arange(len(uniq), device=uniq.device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(owner.numel(), device=uniq.device) - offsets.index_select(0, owner)
        flat = self.indices.index_select(0, starts.index_select(0, owner) + pos)
        norm = lengths.clamp(min=1).to(self.y.weight.dtype).rsqrt()
        vector = self.y(flat, offsets, per_sample_weights=norm.index_select(0, owner))
        row_sq = self.y.weight.pow(2).sum(1, keepdim=True)
        penalty = self.reg * F.embedding_bag(flat, row_sq, offsets, mode="mean").squeeze(1)
        return vector, penalty

