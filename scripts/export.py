#!/usr/bin/env python
"""Write a trained run's user and item vectors and biases, with raw ids, for use outside recsys_torch.

    python scripts/export.py run_dir=DIR out=DIR2                # users.parquet, items.parquet, meta.json
    python scripts/export.py run_dir=DIR out=DIR2 format=npy     # user_vectors.npy, user_bias.npy, user_ids.npy, ...

score(u, i) = meta.json's global_bias + user bias + item bias + <user vector, item vector>. Parquet
tables: users (id, known, bias, vector, rated), items (id, title, known, bias, vector), the vector a
fixed-size list of float32. ``known``: the run can score that user / recommend that item; ``rated``:
the rows of the item table that recommend.py leaves out for that user (npy: user_rated_indptr.npy
and user_rated_items.npy). Reads the run's recommend.npz (no torch needed). Errors print one line on
stderr and exit with status 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch import cli  # noqa: E402

KEYS = {"run_dir": None, "out": None, "format": "parquet"}


def main(argv: list[str]) -> int:
    args = cli.parse_key_values(argv, KEYS, required=("run_dir", "out"))
    from recsys_torch.export import FORMATS, export_embeddings
    from recsys_torch.recommend import Recommender

    if args["format"] not in FORMATS:
        from recsys_torch.errors import ConfigError

        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {args['format']!r}")
    rec = Recommender.load(args["run_dir"])
    paths = export_embeddings(rec, args["out"], args["format"])
    dim = 0 if rec.item_vectors is None else rec.item_vectors.shape[1]
    print(f"wrote {len(rec.user_ids):,} users and {len(rec.item_ids):,} items ({dim} dims) to {args['out']}: "
          + ", ".join(os.path.basename(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
