"""recsys_torch: matrix-factorization recommenders in PyTorch, from popularity to hybrids.

The Python API (:mod:`recsys_torch.api`): ``load``, ``fit``, ``open_run``, imported on first use so
that ``import recsys_torch`` stays light (``scripts/recommend.py`` never imports torch for a query).
"""

__version__ = "0.1.0"

_API = ("load", "fit", "open_run", "Run")


def __getattr__(name):
    if name in _API:
        from recsys_torch import api

        return getattr(api, name)
    raise AttributeError(f"module 'recsys_torch' has no attribute {name!r}")
