#!/usr/bin/env python
"""How well the faiss index of ``recommend.py ann=true`` finds the exact top-k: recall@k and the speed-up
over exact search, for user queries (biases folded in) on a synthetic catalog.

    python scripts/ann_check.py                                   # 200,000 items x 64 dims, HNSW M=32
    python scripts/ann_check.py items=200000 dim=64 queries=1000 k=10 catalog=gaussian ef_search=32,64,128,256

Keys: items, dim, queries, k, catalog (clustered: tastes around centres, like a trained model;
gaussian: no structure), kind (hnsw, flat), m, ef_construction, ef_search (a list tries each on the one
built index), threads (faiss and BLAS threads; default 1), seed. Needs faiss (pip install -e '.[ann]').
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch import cli  # noqa: E402

KEYS = {"items": "200000", "dim": "64", "queries": "1000", "k": "10", "catalog": "clustered", "kind": "hnsw",
        "m": "32", "ef_construction": "200", "ef_search": "32,64,128,256", "threads": "1", "seed": "0"}


def main(argv: list[str]) -> int:
    args = cli.parse_key_values(argv, KEYS)
    threads = cli.parse_int("threads", args["threads"])
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))  # numpy's exact search, before numpy loads
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from recsys_torch.ann import AnnSettings, benchmark, import_faiss, render

    import_faiss().omp_set_num_threads(threads)
    efs = [cli.parse_int("ef_search", v) for v in args["ef_search"].split(",") if v.strip()]
    settings = AnnSettings(args["kind"], cli.parse_int("m", args["m"]),
                           cli.parse_int("ef_construction", args["ef_construction"]), efs[0] if efs else 64)
    result = benchmark(cli.parse_int("items", args["items"]), cli.parse_int("dim", args["dim"]),
                       cli.parse_int("queries", args["queries"]), cli.parse_int("k", args["k"]), settings,
                       args["catalog"], efs, cli.parse_int("seed", args["seed"]))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
