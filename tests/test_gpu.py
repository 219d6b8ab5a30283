"""GPU path: skipped without CUDA (run scripts/gpu_check.sh on a machine with one)."""

import pytest
import torch

from recsys_torch.data import Interactions
from recsys_torch.metrics import ranking_metrics, rating_metrics
from recsys_torch.models import MFModel
from recsys_torch.tasks import RankingTask, RatingTask
from recsys_torch.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _data(n=20000, n_users=500, n_items=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, n_users, (n,), generator=g)
    i = torch.randint(0, n_items, (n,), generator=g)
    r = ((u % 5 + i % 3) / 1.5 + 1 + torch.rand(n, generator=g)).clamp(1, 5).round()
    inter = Interactions(u, i, r, n_users, n_items, rating_scale=(1.0, 5.0))
    return inter.subset(torch.arange(16000)), inter.subset(torch.arange(16000, 18000)), inter.subset(torch.arange(18000, n))


def _fit(device, **kw):
    train, val, test = _data()
    torch.manual_seed(0)
    model = MFModel(500, 300, 32, reg=0.5, reg_bias=0.5, reg_exponent=0.5)
    Trainer(epochs=5, batch_size=1024, lr=0.01, patience=0, progress=False, device=device, fused=False, **kw).fit(
        model, train, val)
    return model, rating_metrics(model, test, train)


def test_cuda_training_matches_cpu_quality():
    _, cpu = _fit("cpu")
    _, gpu = _fit("cuda")
    assert gpu["rmse"] == pytest.approx(cpu["rmse"], abs=0.02)


def test_bf16_and_pinned_host_data_train():
    _, base = _fit("cuda")
    _, bf16 = _fit("cuda", precision="bf16")
    _, pinned = _fit("cuda", data_on_device=False)
    assert bf16["rmse"] == pytest.approx(base["rmse"], abs=0.05)
    assert pinned["rmse"] == pytest.approx(base["rmse"], abs=1e-4)


def test_no_host_sync_in_the_batch_loop():
    train, _, _ = _data()
    model = MFModel(500, 300, 32).cuda()
    trainer = Trainer(epochs=1, batch_size=1024, progress=False, device="cuda", fused=False)
    trainer.fit(model, train)  # warm-up: optimizer state, scratch buffers
    from recsys_torch.optim import build_optimizer

    optimizer = build_optimizer(model, "adam", 0.01)
    data = train.to("cuda")
    task = RatingTask()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(0, len(data), 1024):
            sl = slice(start, start + 1024)
            trainer._step(optimizer, model, task, data.users[sl], data.items[sl], data.ratings[sl])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ranking_metrics_equal_on_cpu_and_gpu():
    train, val, test = _data()
    task = RankingTask(threshold=4.0)
    train, test = task.prepare_data(train), task.prepare_data(test)
    torch.manual_seed(0)
    model = MFModel(500, 300, 16)
    model.prepare(train)
    cpu = ranking_metrics(model, test, [train], train, ks=(5, 10), batch_size=64)
    gpu = ranking_metrics(model.cuda(), test, [train], train, ks=(5, 10), batch_size=256)
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-9), key
