"""Row-wise optimizers: the same updates as torch's sparse-aware optimizers, touching only batch rows."""

import copy

import pytest
import torch
from torch import nn

from recsys_torch import optim


def _run(make_opt, steps=6, scratch=False, monkeypatch=None):
    torch.manual_seed(0)
    table = nn.Embedding(30, 4, sparse=True)
    g = torch.Generator().manual_seed(1)
    opt = make_opt(table.parameters())
    for _ in range(steps):
        ids = torch.randint(0, 10, (16,), generator=g)  # rows 10.. are never touched; duplicates common
        target = torch.randn(16, 4, generator=g)
        loss = ((table(ids) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.weight.detach()


PAIRS = [
    (lambda p: optim.RowAdam(p, lr=0.05), lambda p: torch.optim.SparseAdam(list(p), lr=0.05)),
    (lambda p: optim.RowSGD(p, lr=0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
    (lambda p: optim.RowAdagrad(p, lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
]


@pytest.mark.parametrize("ours,reference", PAIRS, ids=["adam", "sgd", "adagrad"])
def test_row_optimizers_match_torch(ours, reference):
    torch.testing.assert_close(_run(ours), _run(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours,reference", PAIRS, ids=["adam", "sgd", "adagrad"])
def test_scratch_buffer_path_matches(ours, reference, monkeypatch):
    expected = _run(ours)
    monkeypatch.setattr(optim, "SCRATCH_ON_CPU", True)
    torch.testing.assert_close(_run(ours), expected, rtol=1e-6, atol=1e-7)


def test_untouched_rows_and_their_moments_do_not_change():
    torch.manual_seed(0)
    table = nn.Embedding(30, 4, sparse=True)
    before = table.weight.detach().clone()
    opt = optim.RowAdam(table.parameters(), lr=0.1)
    loss = table(torch.tensor([1, 2, 2])).sum()
    loss.backward()
    opt.step()
    changed = (table.weight.detach() != before).any(1)
    assert changed.nonzero().flatten().tolist() == [1, 2]
    assert opt.state[table.weight]["exp_avg"][3:].abs().sum() == 0
    assert "_scratch" not in opt.state_dict()["state"].get(0, {})
