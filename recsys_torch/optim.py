"""Row-wise optimizers for sparse embedding gradients.

``nn.Embedding(sparse=True)`` yields an uncoalesced sparse gradient: the batch's row ids and one
gradient row per occurrence. torch's ``SparseAdam`` coalesces it through generic sparse-tensor
machinery, which costs far more than the arithmetic for the small batches of rating data. These
optimizers sum duplicate rows with one ``unique`` + ``index_add_`` and update only the touched rows,
so a step costs O(batch x embedding_dim), never O(table). Their results match ``SparseAdam`` /
``SGD`` / ``Adagrad`` (tested).
"""

from __future__ import annotations

import math

import torch

from recsys_torch.errors import ConfigError

SCRATCH_ON_CPU = False  # tests set it to check the GPU (sync-free) path on the CPU


def _rows(grad: torch.Tensor, scratch: dict, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids and their summed gradient rows.

    On the CPU: unique ids (``torch.unique``, O(batch)). On a GPU ``unique`` would stall the stream
    on a host sync (its output size is data-dependent), so the rows are summed into a table-sized
    scratch buffer instead (zeroing it is cheap at GPU bandwidth) and read back once per occurrence:
    duplicate ids then carry identical rows, and the ``index_copy_`` writes below store identical
    values, so the result is the same.
    """
    idx, vals = grad._indices()[0], grad._values()
    if idx.is_cuda or SCRATCH_ON_CPU:
        buf = scratch.get(key)
        if buf is None:  # kept outside the optimizer state, so checkpoints do not carry it
            buf = scratch[key] = torch.zeros(grad.shape, dtype=vals.dtype, device=vals.device)
        buf.zero_().index_add_(0, idx, vals)
        return idx, buf.index_select(0, idx)
    uniq, inverse = torch.unique(idx, return_inverse=True)
    summed = torch.zeros((len(uniq), *vals.shape[1:]), dtype=vals.dtype, device=vals.device)
    return uniq, summed.index_add_(0, inverse, vals)


class RowSGD(torch.optim.Optimizer):
    """Plain SGD on the touched rows (duplicates add up, as in per-rating SGD)."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    p.index_add_(0, g._indices()[0], g._values(), alpha=-group["lr"])
                else:
                    p.add_(g, alpha=-group["lr"])


def advance_adam_state(state: dict, like: torch.Tensor) -> None:
    """Count one more Adam step in ``state``, creating its zero moments (shaped like ``like``) on the
    first; the layout of torch's Adam, shared by :class:`RowAdam` and the fused kernel's optimizer."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(like)
        state["exp_avg_sq"] = torch.zeros_like(like)
    state["step"] += 1


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam (as ``torch.optim.SparseAdam``): moments and parameters change only on touched rows;
    bias correction uses the global step count."""

    def __init__(self, params, lr: float = 0.001, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                advance_adam_state(state, p)
                bc1 = 1 - beta1 ** state["step"]
                bc2 = 1 - beta2 ** state["step"]
                if p.grad.is_sparse:
                    rows, g = _rows(p.grad, self.__dict__.setdefault("_scratch", {}), id(p))
                else:
                    rows, g = None, p.grad
                m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
                m = m_all.index_select(0, rows) if rows is not None else m_all
                v = v_all.index_select(0, rows) if rows is not None else v_all
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # SparseAdam's form: eps is added before the bias correction of the second moment
                update = (m / v.sqrt().add_(group["eps"])).mul_(math.sqrt(bc2) / bc1)
                if rows is None:
                    p.add_(update, alpha=-group["lr"])
                else:
                    m_all.index_copy_(0, rows, m)
                    v_all.index_copy_(0, rows, v)
                    p.index_copy_(0, rows, p.index_select(0, rows).sub_(update, alpha=group["lr"]))


class RowAdagrad(torch.optim.Optimizer):
    """Adagrad on the touched rows (as ``torch.optim.Adagrad`` with sparse gradients)."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-10) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros_like(p)
                if p.grad.is_sparse:
                    rows, g = _rows(p.grad, self.__dict__.setdefault("_scratch", {}), id(p))
                    s = state["sum"].index_select(0, rows).addcmul_(g, g)
                    state["sum"].index_copy_(0, rows, s)
                    p.index_copy_(0, rows, p.index_select(0, rows).sub_(g / s.sqrt().add_(group["eps"]), alpha=group["lr"]))
                else:
                    state["sum"].addcmul_(p.grad, p.grad)
                    p.addcdiv_(p.grad, state["sum"].sqrt().add_(group["eps"]), value=-group["lr"])


# ---- building them ---------------------------------------------------------------------------------
# als: recsys_torch.als (the Gramian loss of MF); auto: als there, adam elsewhere (recsys_torch.steps)
OPTIMIZERS = ("sgd", "adam", "sparse_adam", "adagrad", "als", "auto")
SCHEDULES = ("none", "cosine", "exponential", "step")


class OptimizerGroup:
    """Steps a group of optimizers (sparse embedding tables and dense layers) as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


def _sparse_params(model: torch.nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and m.sparse}


def build_optimizer(model: torch.nn.Module, name: str, lr: float) -> OptimizerGroup:
    """Sparse embedding tables get a row-wise optimizer (a step touches only the rows in the batch);
    dense layers get torch's own. ``sgd``, ``adam`` and ``adagrad`` name the update rule;
    ``sparse_adam`` uses torch's ``SparseAdam`` for the tables (the reference implementation of the
    same rule as ``adam``, slower)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    sparse_ids = _sparse_params(model)
    sparse = [p for p in params if id(p) in sparse_ids]
    dense = [p for p in params if id(p) not in sparse_ids]
    row_rule = {"sgd": RowSGD, "adam": RowAdam, "adagrad": RowAdagrad, "sparse_adam": torch.optim.SparseAdam}[name]
    dense_rule = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}.get(name, torch.optim.Adam)
    opts = []
    if sparse:
        opts.append(row_rule(sparse, lr=lr))
    if dense:
        opts.append(dense_rule(dense, lr=lr))
    return OptimizerGroup(opts)


def build_schedulers(optimizers: OptimizerGroup, schedule: str, epochs: int, gamma: float, step_size: int) -> list:
    """One learning-rate scheduler per optimizer of the group, stepped once per epoch."""
    if schedule in (None, "none"):
        return []
    if schedule not in SCHEDULES:
        raise ConfigError(f"trainer.lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    out = []
    for opt in optimizers.optimizers:
        if schedule == "cosine":
            out.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)))
        elif schedule == "exponential":
            out.append(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma))
        else:
            out.append(torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma))
    return out
