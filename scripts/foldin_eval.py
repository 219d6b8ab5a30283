#!/usr/bin/env python
"""How well fold-in serves users that training never saw.

    python scripts/train.py experiment=ranking_ml100k_mf split=cold_user hydra.run.dir=DIR
    python scripts/foldin_eval.py run_dir=DIR [n_given=10] [k=10] [seed=0] [format=text|json]

The run's split must hold users out of training (``split=cold_user``); see
``recsys_torch/tools/foldin.py`` for what is measured. Errors print one line on stderr and exit 2.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch import cli  # noqa: E402
from recsys_torch.errors import ConfigError  # noqa: E402

KEYS = {"run_dir": None, "n_given": 10, "k": 10, "seed": 0, "format": "text"}


def main(argv: list[str]) -> int:
    import torch

    from recsys_torch.tools import foldin

    torch.set_num_threads(1)
    args = cli.parse_key_values(argv, KEYS, required=("run_dir",))
    for key in ("n_given", "k", "seed"):
        args[key] = cli.parse_int(key, args[key])
    if args["format"] not in ("text", "json"):
        raise ConfigError(f"format must be text or json, got {args['format']!r}")
    result = foldin.evaluate(args)
    print(json.dumps(result, indent=2) if args["format"] == "json" else foldin.render(result, args["k"]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
