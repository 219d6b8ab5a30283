"""Losses as plain functions with uniform shapes: scores in, a scalar out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_torch.sparse import csr_dots


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``values`` ``[B]``, each counted ``weight`` times (a weight of 2 is the row twice)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of predicted ratings (weighted by ``weight`` per row)."""
    if weight is None:
        return F.mse_loss(pred, target)
    return weighted_mean((pred - target).pow(2), weight)


def bpr(pos: torch.Tensor, neg: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bayesian personalized ranking: ``pos`` ``[B]``, ``neg`` ``[B, n_neg]``;
    mean of ``-log sigmoid(pos - neg)`` over every (positive, negative) pair (positives weighted)."""
    return weighted_mean(-F.logsigmoid(pos.unsqueeze(1) - neg).mean(1), weight)


def sampled_softmax(pos: torch.Tensor, neg: torch.Tensor, log_q_pos: torch.Tensor | None = None,
                    log_q_neg: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each positive against its sampled negatives.

    With ``log_q_*`` (log sampling probability of each item) the logits get the log-Q correction
    (Bengio & Senecal; Yi et al. 2019), so popularity-sampled negatives give an unbiased softmax.
    """
    if log_q_pos is not None:
        pos = pos - log_q_pos
    if log_q_neg is not None:
        neg = neg - log_q_neg
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    zeros = torch.zeros(len(pos), dtype=torch.long, device=pos.device)
    if weight is None:
        return F.cross_entropy(logits, zeros)
    return weighted_mean(F.cross_entropy(logits, zeros, reduction="none"), weight)


def full_softmax(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalog: ``logits`` ``[B, n_items]``, ``targets`` ``[B]``
    the positive item of each row."""
    if weight is None:
        return F.cross_entropy(logits, targets)
    return weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weight)


def user_softmax(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of positives against the whole catalog with each user's logits computed
    once: ``logits`` ``[U, n_items]`` (one row per user), positive ``p`` is item ``targets[p]`` of row
    ``rows[p]``. The (``weights``-weighted) mean over positives, so it equals :func:`full_softmax`
    of the same positives with their user's logits repeated per positive (Mult-VAE's multinomial
    likelihood, at the cost of one row of logits per user instead of per positive)."""
    log_norm = torch.logsumexp(logits, dim=1)
    nll = log_norm.index_select(0, rows) - logits[rows, targets]
    if weights is None:
        return nll.mean()
    return (nll * weights).sum() / weights.sum()


def sparse_squared_error(p: torch.Tensor, q: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                         weight: torch.Tensor, target: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``sum_k weight_k (target_k - <p[r_k], q[col_k]>)^2`` where row r of the CSR pattern (``crow``,
    ``col``) holds the columns of row r of ``p``: the observed part of the Gramian (iALS) loss (target 1
    for a positive, 0 for an explicit negative)."""
    if p.is_cuda or p.dtype != torch.float32:  # sampled_addmm's CPU path; elsewhere plain gathers
        rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=p.device), crow[1:] - crow[:-1])
        return (weight * (target - (p.index_select(0, rows) * q.index_select(0, col)).sum(1)).pow(2)).sum()
    # the scores as one sampled product, their gradients as two sparse products, never per-cell gathers
    # of whole rows (about 4 times faster on the CPU)
    return (weight * (target - csr_dots(p, q, crow, col)).pow(2)).sum()


LOSSES = {"mse": mse, "bpr": bpr, "softmax": sampled_softmax, "full_softmax": full_softmax}
