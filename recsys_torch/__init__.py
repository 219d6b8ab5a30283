"""recsys_torch: matrix-factorization recommenders in PyTorch, from popularity to hybrids.

The Python API (:mod:`recsys_torch.api`): ``load``, ``fit``, ``open_run``, imported on first use so
that ``import recsys_torch`` stays light (``scripts/recommend.py`` never imports torch for a query).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning. With OpenMP's default wait, torch's threads burn
# the cores another busy process needs: a 2-thread fit on a 2-core machine ran 2-3 times slower than on
# 1 thread beside one busy process, 32 times beside two; with passive waits it matches 1 thread, at no
# cost when the machine is idle (docs/benchmarks.md, "Threads"). Set before torch loads its OpenMP
# runtime (it reads the variable once); a value already in the environment wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_API = ("load", "fit", "open_run", "Run")


def __getattr__(name):
    if name in _API:
        from recsys_torch import api

        return getattr(api, name)
    raise AttributeError(f"module 'recsys_torch' has no attribute {name!r}")
