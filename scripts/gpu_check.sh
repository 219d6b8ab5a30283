#!/usr/bin/env bash
# The GPU checks, in a few minutes, for a machine with CUDA: the GPU tests, the DDP test, and a short
# training benchmark on CPU and GPU side by side.
#   bash scripts/gpu_check.sh            (uses .venv if present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "CUDA is not available to this torch build: " + torch.__version__
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PYEOF
$PY -m pytest -q tests/test_gpu.py tests/test_metrics_rating.py tests/test_optim.py
for device in cpu cuda; do
  echo "== synthetic 1M ratings, mf, 3 epochs, device=$device"
  $PY scripts/train.py data=synthetic data.n_users=50000 data.n_items=20000 data.n_ratings=1000000 \
    model.embedding_dim=100 trainer.epochs=3 trainer.patience=0 trainer.batch_size=8192 trainer.lr=0.01 \
    trainer.device=$device logger=none trainer.progress=false hydra.run.dir=/tmp/gpu_check_$device \
    | grep -E "test/rmse |fit time"
done
