#!/usr/bin/env python
"""Recommend from a trained run (the output folder of scripts/train.py).

    python scripts/recommend.py run_dir=DIR user=196 k=10                # top-10 for a user of the run
    python scripts/recommend.py run_dir=DIR item=50 k=10                 # items similar to item 50
    python scripts/recommend.py run_dir=DIR ratings=50:5,181:4,1:2 k=10  # a new user, folded in
    python scripts/recommend.py run_dir=DIR features=gender:F,occupation:writer   # new user (hybrid/content)

Options: k=10, format=text|json, exclude_rated=true|false. In ratings=, an item without ':R' counts as
liked (the top of the rating scale); in features=, repeat a column for several values. format=json
prints a JSON list of {"item", "title", "score", "reason"} objects. Errors print one line on stderr
and exit with status 2.

Deliberately free of Hydra, argparse and TensorBoard, so that it starts fast; a query for a user or an
item of the run does not even import torch (it reads the run's recommend.npz with numpy).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys_torch import cli  # noqa: E402
from recsys_torch.errors import ConfigError  # noqa: E402

KEYS = {"run_dir": None, "user": None, "item": None, "ratings": None, "features": None, "k": "10", "format": "text",
        "exclude_rated": "true"}


def parse_args(argv: list[str]) -> dict:
    args = cli.parse_key_values(argv, KEYS, required=("run_dir",))
    modes = [m for m in ("user", "item") if args[m] is not None]
    if args["ratings"] is not None or args["features"] is not None:
        modes.append("ratings/features")
    if len(modes) != 1:
        raise ConfigError("give exactly one of user=ID, item=ID, or ratings=ITEM:R,... and/or features=COL:VALUE,...")
    args["k"] = cli.parse_int("k", args["k"])
    if args["format"] not in ("text", "json"):
        raise ConfigError(f"format must be text or json, got {args['format']!r}")
    args["exclude_rated"] = cli.parse_bool("exclude_rated", args["exclude_rated"])
    return {key: value for key, value in args.items() if value is not None}


def parse_ratings(text: str, top: float) -> list[tuple[str, float]]:
    """``ITEM:R,ITEM:R,ITEM`` (a bare item is liked: rating ``top``)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        item, sep, value = part.rpartition(":")
        if not sep:
            out.append((part, top))
            continue
        try:
            out.append((item, float(value)))
        except ValueError:
            raise ConfigError(f"ratings: {part!r} is not ITEM:RATING") from None
    if not out:
        raise ConfigError("ratings= is empty: give ITEM:RATING pairs separated by commas")
    return out


def parse_features(text: str) -> dict:
    """``COL:VALUE,COL:VALUE`` -> ``{col: value or [values]}``."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        column, sep, value = part.partition(":")
        if not sep or not column or not value:
            raise ConfigError(f"features: {part!r} is not COLUMN:VALUE")
        out.setdefault(column, []).append(value)
    return {c: v[0] if len(v) == 1 else v for c, v in out.items()}


def recommendations(args: dict):
    from recsys_torch.recommend import Recommender

    rec = Recommender.load(args["run_dir"])
    if "item" in args:
        return f"items similar to {rec.title(rec.item_code(args['item']))}", rec.similar_items(args["item"], args["k"])
    if "user" in args:
        return f"top {args['k']} for user {args['user']}", rec.recommend(args["user"], args["k"], args["exclude_rated"])
    top = rec.rating_scale[1] if rec.rating_scale else 1.0
    ratings = parse_ratings(args["ratings"], top) if "ratings" in args else []
    features = parse_features(args["features"]) if "features" in args else None
    user = rec.fold_in(ratings, features)
    return f"top {args['k']} for a new user", rec.recommend_for(user, args["k"], args["exclude_rated"])


def render(heading: str, recs, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([r.as_dict() for r in recs], ensure_ascii=False, allow_nan=False)
    width = max(len(r.title) for r in recs)
    lines = [heading]
    for rank, r in enumerate(recs, 1):
        line = f"{rank:>3}. {r.title:<{width}}  {r.score:8.4f}"
        lines.append(line + (f"  ({r.reason})" if r.reason else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    heading, recs = recommendations(args)
    print(render(heading, recs, args["format"]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
