"""Data: loaders return a RawDataset; `encode` turns it into Interactions and Features.

Names are imported on first use, so code that only needs `Interactions` or `Features` (e.g. loading a
checkpoint to recommend) does not pay for pandas.
"""

import importlib

_WHERE = {
    "Dataset": "recsys_torch.data.dataset",
    "encode": "recsys_torch.data.dataset",
    "Features": "recsys_torch.data.features",
    "Interactions": "recsys_torch.data.interactions",
    "RawDataset": "recsys_torch.data.raw",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'recsys_torch.data' has no attribute {name!r}")
