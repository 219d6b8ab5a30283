"""Alternating least squares for the Gramian (iALS) loss: ``trainer.optimizer=als`` with
``task.loss=gramian`` and ``model=mf``.

The trainer's loop stays the same: each step takes a batch of users and solves their vectors (a few
conjugate-gradient steps, warm-started from the current ones, as implicit does) against the item
side; at the end of the epoch every item vector is solved against the users. An epoch is one ALS
sweep, whatever the batch size. The objective is exactly :meth:`recsys_torch.tasks.RankingTask._gramian`'s, so the
gradient path (``optimizer=adam``) and this one minimize the same thing; ALS needs far fewer passes.

For a user u the normal equations are
``(gramian_weight * G + sum_i c_ui q_i q_i^T + reg_u I) p_u = sum_i c_ui y_ui q_i``
with ``G = Q^T Q``, over the user's observed pairs i: the positives (target ``y`` 1, weight ``c``
``confidence`` times the row's weight) and the explicit negatives (``y`` 0, ``c`` ``negative_weight``,
on top of the ``gramian_weight`` every pair has through ``G``).
The sum is applied on the CSR pattern of those pairs (the compiled kernel's ``gram_apply``, or sparse
tensor products), never as a dense matrix.
"""

from __future__ import annotations

import torch

from recsys_torch.errors import ConfigError
from recsys_torch.sparse import csr, csr_dots, transposed

CG_STEPS = 3


class _NoOptimizer:
    """What the trainer expects of an optimizer group, for a method that has no learning rate."""

    optimizers: list = []
    lr = 0.0

    def state_dict(self) -> list:
        return []

    def load_state_dict(self, states) -> None:
        pass


def conjugate_gradient(x: torch.Tensor, rhs: torch.Tensor, apply, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` conjugate-gradient steps on ``apply(x) = rhs`` for every row at once, from ``x``; returns
    the solution and its residual ``rhs - apply(x)`` as the recurrence tracks it."""
    r = rhs - apply(x)
    p = r.clone()
    rs = (r * r).sum(1)
    for _ in range(steps):
        ap = apply(p)
        alpha = rs / (p * ap).sum(1).clamp_min(1e-30)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        p = r + (rs_new / rs.clamp_min(1e-30))[:, None] * p
        rs = rs_new
    return x, r


def gramian(other: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """``G = Q^T Q`` over the rows of ``other`` that ``known`` (0/1 per row) marks, or all of them."""
    masked = other if known is None else other * known[:, None]
    return masked.T @ masked


def solve_rows(x, pattern, other, gramian_weight, reg, known=None, steps=CG_STEPS, gram=None,
               kernel=None, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``x`` that minimize the Gramian loss with ``other`` fixed; ``pattern`` is the CSR of
    the rows' observed pairs (values: their weights ``c``) over the rows of ``other``, ``target`` their
    targets ``y`` (None: every one 1), ``reg`` the L2 per row; ``known`` (0/1 per row of ``other``): the
    rows the all-pairs term covers (those seen in training).

    Also returns each row's loss at the solution, ``sum_i c_i (y_i - s_i)^2 + gramian_weight x^T G x +
    reg |x|^2``, without another product: with ``A x = rhs - r`` (``r`` the residual), it is
    ``sum_i c_i y_i^2 - x . rhs - x . r`` (in float64). ``gram``: :func:`gramian` of ``other``
    and ``known`` when the caller holds it already; ``kernel``: the compiled module
    (:func:`recsys_torch.fused.load_extension`), whose ``gram_apply`` does the positives' product in one
    pass over them (float32 on the CPU; the sparse-tensor path otherwise)."""
    gram = gramian(other, known) if gram is None else gram
    crow, col = pattern.crow_indices(), pattern.col_indices()
    weighted = pattern.values()
    wanted = weighted if target is None else weighted * target  # c y: the right-hand side's weights
    rhs = (pattern if target is None else csr(crow, col, wanted, pattern.shape)) @ other

    if kernel is not None and other.device.type == "cpu" and other.dtype == torch.float32:
        crow, col, weighted, other = crow.contiguous(), col.contiguous(), weighted.contiguous(), other.contiguous()

        def positives(v):
            return kernel.gram_apply(crow, col, weighted, v.contiguous(), other)
    else:
        def positives(v):
            return csr(crow, col, csr_dots(v, other, crow, col) * weighted, pattern.shape) @ other

    def apply(v):
        return gramian_weight * (v @ gram) + reg[:, None] * v + positives(v)

    x, residual = conjugate_gradient(x, rhs, apply, steps)
    constant = wanted if target is None else wanted * target  # c y^2
    weight_sums = torch.cat([weighted.new_zeros(1, dtype=torch.float64), torch.cumsum(constant.double(), 0)])
    loss = (weight_sums[crow[1:]] - weight_sums[crow[:-1]]) - (x.double() * (rhs + residual).double()).sum(1)
    return x, loss


class ALSStep:
    """The trainer's step for ``optimizer=als``: a batch of users solved, then every item."""

    def __init__(self, model, task, batch_size: int, kernel=None) -> None:
        from recsys_torch.models.mf import MFModel
        from recsys_torch.tasks import RankingTask

        if type(model) is not MFModel or not isinstance(task, RankingTask) or task.loss_name != "gramian":
            raise ConfigError("trainer.optimizer=als solves the Gramian loss of biased MF: use model=mf, "
                              "task=ranking and task.loss=gramian (or another optimizer)")
        self.model, self.task, self.kernel = model, task, kernel
        self.rows_per_step = batch_size
        self.optimizers = _NoOptimizer()
        n_users, n_items = model.n_users, model.n_items
        self.user_reg = (task.reg * task.user_reg_weight).float()
        self.item_reg = (task.reg * task.item_reg_weight).float()
        # every observed pair (positives and explicit negatives), item-major, for the item solve
        crow, users, order = transposed(task.obs_indptr, task.obs_items, n_items)
        self.by_item = csr(crow, users, task.obs_weight[order], (n_items, n_users))
        self.by_item_target = None if task.obs_target is None else task.obs_target[order]
        self._items = None  # the item side's Gramian and L2, fixed while an epoch's users are solved

    def _item_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(known, G, L2)`` of the current item vectors, computed once for all the user steps between
        two item solves (any in-place change of the vectors or of ``known_items`` recomputes them)."""
        q, known = self.model.item_factors.weight, self.model.known_items
        key = (q.data_ptr(), q._version, known.data_ptr(), known._version)
        if self._items is None or self._items[0] != key:
            mask = known.float()
            l2 = self.task.reg * (self.task.item_reg_weight.double() * (q * mask[:, None]).double().pow(2).sum(1)).sum()
            self._items = (key, mask, gramian(q, mask), l2)
        return self._items[1:]

    @torch.no_grad()
    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        """Solve these users against the current items; their loss afterwards (the task's Gramian loss
        of the batch, from the solve's own by-products)."""
        task, p_table, q_table = self.task, self.model.user_factors.weight, self.model.item_factors.weight
        _, items, weight, target, crow = task._observed_of(users)
        batch = csr(crow, items, weight, (len(users), self.model.n_items))
        known, gram, item_l2 = self._item_terms()
        p_table[users], loss = solve_rows(p_table[users], batch, q_table, task.gramian_weight,
                                          self.user_reg.index_select(0, users), known, gram=gram, kernel=self.kernel,
                                          target=target)
        # the item L2 counts once per epoch: this batch's share of it, as the task's loss has it
        share = len(users) / task.n_active_users
        return ((loss.sum() + share * item_l2) / (share * task.nnz)).float()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Every user was solved this epoch: now every item, against them."""
        task, p_table, q_table = self.task, self.model.user_factors.weight, self.model.item_factors.weight
        q_table.copy_(solve_rows(q_table, self.by_item, p_table, task.gramian_weight, self.item_reg,
                                 self.model.known_users.float(), kernel=self.kernel, target=self.by_item_target)[0])
