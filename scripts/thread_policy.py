#!/usr/bin/env python
"""Measure training time at 1 and 2 threads, on an idle machine and beside a busy process, with
OpenMP's default (spinning) and passive wait policies: the measurement behind the default of
``trainer.num_threads`` (see recsys_torch/tools/threads.py and docs/benchmarks.md).

    python scripts/thread_policy.py [--repeats 3] [--epochs 3] [--models content,hybrid,mf-ranking] [--out FILE]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch import cli  # noqa: E402

# name -> overrides (plus trainer.epochs); rating models, then the whole-catalog ranking losses
MODELS = {"content": ["model=content"], "hybrid": ["model=hybrid"], "baseline": ["model=baseline"],
          "mf": ["model=mf"], "mf-ranking": ["task=ranking", "split=user"],
          "hybrid-ranking": ["experiment=ranking_ml100k_hybrid", "trainer.refit=false"]}


def main(argv: list[str]) -> int:
    from recsys_torch.tools import threads

    parser = cli.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="content,hybrid,baseline,mf,mf-ranking,hybrid-ranking",
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated values of trainer.num_threads")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m and m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    models = {m: [*MODELS[m], f"trainer.epochs={args.epochs}"] for m in args.models.split(",") if m}
    # "openmp": OpenMP's own default (spin a while, then sleep; an empty value keeps the package from
    # setting its own); "passive": what the package sets
    policies = {"openmp": {"OMP_WAIT_POLICY": ""}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
    rows = threads.measure(models, threads=args.threads.split(","), policies=policies, repeats=args.repeats)
    text = threads.markdown(rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
