"""Losses as plain functions with uniform shapes: scores in, a scalar out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of predicted ratings."""
    return F.mse_loss(pred, target)


def bpr(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalized ranking: ``pos`` ``[B]``, ``neg`` ``[B, n_neg]``;
    mean of ``-log sigmoid(pos - neg)`` over every (positive, negative) pair."""
    return -F.logsigmoid(pos.unsqueeze(1) - neg).mean()


def sampled_softmax(pos: torch.Tensor, neg: torch.Tensor, log_q_pos: torch.Tensor | None = None,
                    log_q_neg: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each positive against its sampled negatives.

    With ``log_q_*`` (log sampling probability of each item) the logits get the log-Q correction
    (Bengio & Senecal; Yi et al. 2019), so popularity-sampled negatives give an unbiased softmax.
    """
    if log_q_pos is not None:
        pos = pos - log_q_pos
    if log_q_neg is not None:
        neg = neg - log_q_neg
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))


def full_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalog: ``logits`` ``[B, n_items]``, ``targets`` ``[B]``
    the positive item of each row."""
    return F.cross_entropy(logits, targets)


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


LOSSES = {"mse": mse, "bpr": bpr, "softmax": sampled_softmax, "full_softmax": full_softmax}
