"""The compiled fast path computes the same steps as the pure PyTorch path."""

import copy

import pytest
import torch

from recsys_torch.data import Interactions
from recsys_torch.models import MFModel
from recsys_torch.tasks import RatingTask
from recsys_torch.optim import build_optimizer

fused = pytest.importorskip("recsys_torch.fused")

pytestmark = pytest.mark.skipif(fused.load_extension() is None, reason="no C++ toolchain for the fused kernel")


def _data(n=3000, n_users=60, n_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (n,), generator=g)
    items = torch.randint(0, n_items, (n,), generator=g)
    ratings = torch.randint(1, 6, (n,), generator=g).float()
    return Interactions(users, items, ratings, n_users, n_items)


def _pair(inter, **kw):
    torch.manual_seed(0)
    model = MFModel(inter.n_users, inter.n_items, embedding_dim=8, reg=0.3, reg_bias=0.2, reg_exponent=0.5, **kw)
    model.prepare(inter)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("sgd", 2.0)])
def test_minibatch_step_matches_autograd(optimizer, lr):
    inter = _data()
    pure, fast = _pair(inter)
    opt_pure = build_optimizer(pure, optimizer, lr)
    opt_fast = fused.FusedMF(fast, optimizer, lr)
    task = RatingTask()
    for start in range(0, len(inter), 256):
        sl = slice(start, start + 256)
        loss = task.loss(pure, inter.users[sl], inter.items[sl], inter.ratings[sl])
        opt_pure.zero_grad()
        loss.backward()
        opt_pure.step()
        fast_loss = float(opt_fast.fused_step(inter.users[sl], inter.items[sl], inter.ratings[sl]))
        assert fast_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for a, b in zip(pure.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and they really trained
    assert not torch.equal(pure.user_factors.weight, _pair(inter)[0].user_factors.weight)


def test_online_sgd_matches_batch_of_one():
    inter = _data(n=400)
    pure, fast = _pair(inter)
    opt = build_optimizer(pure, "sgd", 0.01)
    task = RatingTask()
    for k in range(len(inter)):
        loss = task.loss(pure, inter.users[k:k + 1], inter.items[k:k + 1], inter.ratings[k:k + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses = torch.empty(len(inter))
    fused.load_extension().mf_sgd_online(
        fast.user_factors.weight.data, fast.item_factors.weight.data, fast.user_bias.weight.data,
        fast.item_bias.weight.data, fast.user_reg_scale, fast.item_reg_scale,
        inter.users, inter.items, inter.ratings, losses, float(fast.global_bias), fast.reg, fast.reg_bias, 0.01, 1)
    for a, b in zip(pure.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_supports_only_exact_combinations():
    from recsys_torch.models import BaselineModel
    from recsys_torch.tasks import RankingTask

    inter = _data(n=50)
    model, _ = _pair(inter)
    cpu = torch.device("cpu")
    assert fused.supports(model, RatingTask(), "adam", cpu)
    assert not fused.supports(model, RatingTask(), "adagrad", cpu)
    assert not fused.supports(model, RankingTask(), "adam", cpu)
    assert not fused.supports(BaselineModel(5, 5), RatingTask(), "adam", cpu)


@pytest.mark.parametrize("optimizer,batch_size,lr", [("adam", 128, 0.01), ("sgd", 1, 0.01)])
def test_trainer_fused_and_pure_paths_agree(optimizer, batch_size, lr):
    from recsys_torch.trainer import Trainer

    inter = _data(n=1500)
    train, val = inter.subset(torch.arange(1200)), inter.subset(torch.arange(1200, 1500))
    results = []
    for flag in (False, True):
        model, _ = _pair(inter)
        trainer = Trainer(epochs=3, batch_size=batch_size, lr=lr, optimizer=optimizer, patience=0,
                          progress=False, fused=flag, num_threads=1)
        fit = trainer.fit(model, train, val)
        results.append((model, fit))
    (pure, fit_pure), (fast, fit_fast) = results
    for a, b in zip(pure.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert [h["train/loss"] for h in fit_fast.history] == pytest.approx(
        [h["train/loss"] for h in fit_pure.history], rel=1e-4)


def test_fused_true_refuses_unsupported_combination():
    from recsys_torch.errors import ConfigError
    from recsys_torch.trainer import Trainer

    inter = _data(n=200)
    model, _ = _pair(inter)
    with pytest.raises(ConfigError, match="fused"):
        Trainer(epochs=1, optimizer="adagrad", fused=True, progress=False).fit(model, inter)



def test_gram_apply_is_the_sparse_tensor_product_over_the_positives():
    """ALS's conjugate-gradient product, one pass per positive: sum_j w_j <v[r], other[col_j]> other[col_j]
    per row, rows without positives included, at any thread count."""
    from recsys_torch.sparse import csr, csr_dots

    g = torch.Generator().manual_seed(0)
    n_rows, n_cols, d = 50, 70, 12
    cells = torch.unique(torch.randint(0, n_rows * n_cols, (600,), generator=g))
    cells = cells[cells // n_cols % 7 != 3]  # rows 3, 10, 17, ... without a cell
    rows, col = cells // n_cols, cells % n_cols  # sorted: row-major
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)])
    assert (crow[1:] == crow[:-1]).any()  # some rows have no cell
    weight = torch.rand(len(col), generator=g) + 0.5
    v, other = torch.randn(n_rows, d, generator=g), torch.randn(n_cols, d, generator=g)
    want = csr(crow, col, csr_dots(v, other, crow, col) * weight, (n_rows, n_cols)) @ other
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(fused.load_extension().gram_apply(crow, col, weight, v, other), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("negatives", [False, True])
def test_als_with_and_without_the_kernel_agree(negatives):
    """Also with explicit negatives: their pairs go through the kernel's product with their own weight."""
    from recsys_torch.tasks import RankingTask
    from recsys_torch.trainer import Trainer

    inter = _data(n=1500, n_users=60, n_items=40)
    if negatives:
        low = inter.subset(inter.ratings < 4)
        inter = inter.subset(inter.ratings >= 4)
        inter.negatives = low
    fits = []
    for use in (True, False):
        torch.manual_seed(0)
        model = MFModel(inter.n_users, inter.n_items, embedding_dim=8)
        task = RankingTask(threshold=None, loss="gramian")
        fit = Trainer(epochs=3, optimizer="als", fused=use, progress=False, device="cpu").fit(model, inter, None, task)
        fits.append((model, [h["train/loss"] for h in fit.history]))
    (fast, fast_loss), (pure, pure_loss) = fits
    for a, b in zip(fast.parameters(), pure.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert fast_loss == pytest.approx(pure_loss, rel=1e-5)
