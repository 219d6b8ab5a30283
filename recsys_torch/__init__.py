"""recsys_torch: matrix-factorization recommenders in PyTorch, from popularity to hybrids.

The Python API (:mod:`recsys_torch.api`): ``load``, ``fit``, ``open_run``, imported on first use so
that ``import recsys_torch`` stays light (``scripts/recommend.py`` never imports torch for a query).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning. With the default (spinning) wait, torch's threads
# burn the cores another busy process needs, and a 2-thread ranking fit on a 2-core machine beside one
# busy process ran 20-30 times slower than at 1 thread (docs/benchmarks.md, "Threads"); with passive
# waits it stays near the 1-thread time. Set before torch loads its OpenMP runtime (it reads the
# variable once); a value already in the environment wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_API = ("load", "fit", "open_run", "Run")


def __getattr__(name):
    if name in _API:
        from recsys_torch import api

        return getattr(api, name)
    raise AttributeError(f"module 'recsys_torch' has no attribute {name!r}")
