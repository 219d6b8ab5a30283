#!/usr/bin/env python
"""Train and evaluate one experiment (or a sweep with -m). See README.md for the config groups.

    python scripts/train.py model=hybrid split=kfold
    python scripts/train.py -m hparams_search=mf_optuna
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch.cli import precheck  # noqa: E402
from recsys_torch.train import main  # noqa: E402

if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
