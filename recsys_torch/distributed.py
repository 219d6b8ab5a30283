"""Data-parallel training on torch.distributed (gloo on CPU, nccl on GPU), started by torchrun.

Every rank holds the whole model. Each epoch every rank draws the same permutation (same seeded
generator) and trains on its own slice of every global batch; after ``backward`` the gradients are
combined so that every rank applies the identical update:

- sparse embedding gradients (row ids + rows) are all-gathered and concatenated: the row-wise
  optimizers of :mod:`recsys_torch.optim` then sum duplicates exactly as for one big batch;
- dense gradients are all-reduced.

Both are divided by the world size, so a step equals a single-process step on the global batch
(``world_size x batch_size`` ratings) with the mean loss. Because the weights stay identical, each
rank can evaluate the full validation and test data itself: metrics equal a single-process
evaluation of the same weights, and early-stopping decisions agree on every rank.

Embedding tables larger than one device would need sharding (TorchRec's
``EmbeddingBagCollection`` with a row-wise sharding plan); see docs/architecture.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world_size)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _gather_rows(grad: torch.Tensor, world: int) -> torch.Tensor:
    """All ranks' sparse rows, concatenated, as one uncoalesced sparse gradient (divided by world)."""
    idx, vals = grad._indices()[0], grad._values()
    n = torch.tensor([idx.numel()], device=idx.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    pad_idx = torch.zeros(longest, dtype=idx.dtype, device=idx.device)
    pad_vals = torch.zeros((longest, *vals.shape[1:]), dtype=vals.dtype, device=vals.device)
    pad_idx[: idx.numel()] = idx
    pad_vals[: idx.numel()] = vals
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_vals = [torch.empty_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_vals, pad_vals)
    keep = [slice(0, int(s)) for s in sizes]
    cat_idx = torch.cat([t[k] for t, k in zip(all_idx, keep)])
    cat_vals = torch.cat([t[k] for t, k in zip(all_vals, keep)]) / world
    return torch.sparse_coo_tensor(cat_idx.unsqueeze(0), cat_vals, grad.shape, check_invariants=False)


def sync_gradients(model: torch.nn.Module, world: int) -> None:
    """Make every rank's gradients the mean over ranks (see the module docstring)."""
    for p in model.parameters():
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = _gather_rows(p.grad, world)
        else:
            dist.all_reduce(p.grad)
            p.grad /= world


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
