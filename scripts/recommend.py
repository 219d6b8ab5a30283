#!/usr/bin/env python
"""Recommend from a trained run (the output folder of scripts/train.py).

    python scripts/recommend.py run_dir=DIR user=196 k=10                # top-10 for a user of the run
    python scripts/recommend.py run_dir=DIR item=50 k=10                 # items similar to item 50
    python scripts/recommend.py run_dir=DIR ratings=50:5,181:4,1:2 k=10  # a new user, folded in
    python scripts/recommend.py run_dir=DIR features=gender:F,occupation:writer   # new user (hybrid/content)
    python scripts/recommend.py run_dir=DIR all_users=true k=100 out=recs.parquet # every user (or out=recs.csv)

Options: k=10, format=text|json, exclude_rated=true|false. In ratings=, an item without ':R' counts as
liked (the top of the rating scale); in features=, repeat a column for several values. format=json
prints a JSON list of {"item", "title", "score", "reason"} objects. Errors print one line on stderr
and exit with status 2.

all_users=true writes one row per (user, rank): user, rank, item, score (and title when the run has
titles), the same items, order and scores as a user= query, a block of chunk=1024 users at a time,
with a progress bar on stderr (progress=false: none). The file appears only when complete. Users that
cannot be scored (no training data, no user features) are skipped and counted on stderr.

ann=true takes the candidates of user=, item= and all_users=true queries from a faiss index (pip
install -e '.[ann]'): HNSW, inner product with the biases folded in (ann_m=32, ann_ef_construction=200,
ann_ef_search=64; ann_kind=flat: faiss's exact search), saved in the run folder for later queries
(ann_cache=false: not saved). The candidates are then scored exactly and rated items dropped.

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
        "exclude_rated": "true", "all_users": "false", "out": None, "chunk": "1024", "progress": "true",
        "ann": "false", "ann_kind": "hnsw", "ann_m": "32", "ann_ef_construction": "200", "ann_ef_search": "64",
        "ann_cache": "true"}


def parse_args(argv: list[str]) -> dict:
    args = cli.parse_key_values(argv, KEYS, required=("run_dir",))
    for key in ("exclude_rated", "all_users", "progress", "ann", "ann_cache"):
        args[key] = cli.parse_bool(key, args[key])
    modes = [m for m in ("user", "item") if args[m] is not None]
    if args["ratings"] is not None or args["features"] is not None:
        modes.append("ratings/features")
    if args["all_users"]:
        modes.append("all_users")
    if len(modes) != 1:
        raise ConfigError("give exactly one of user=ID, item=ID, all_users=true, or ratings=ITEM:R,... and/or "
                          "features=COL:VALUE,...")
    if args["all_users"] and not args["out"]:
        raise ConfigError("all_users=true needs out=FILE.parquet or out=FILE.csv")
    if args["out"] is not None and not args["all_users"]:
        raise ConfigError("out= is for all_users=true (a single query prints its answer)")
    if args["ann"] and modes == ["ratings/features"]:
        raise ConfigError("ann=true serves user=, item= and all_users=true queries, not a folded-in new user")
    for key in ("k", "chunk", "ann_m", "ann_ef_construction", "ann_ef_search"):
        args[key] = cli.parse_int(key, args[key])
    if args["format"] not in ("text", "json"):
        raise ConfigError(f"format must be text or json, got {args['format']!r}")
    return {key: value for key, value in args.items() if value is not None}


def item_index(rec, args: dict):
    """The faiss index of ann=true, or None."""
    if not args["ann"]:
        return None
    from recsys_torch.ann import AnnSettings, FaissIndex

    settings = AnnSettings(args["ann_kind"], args["ann_m"], args["ann_ef_construction"], args["ann_ef_search"])
    return FaissIndex(rec, settings, cache=args["run_dir"] if args["ann_cache"] and os.path.isdir(args["run_dir"])
                      else None)


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
    index = item_index(rec, args)
    if "item" in args:
        return (f"items similar to {rec.title(rec.item_code(args['item']))}",
                rec.similar_items(args["item"], args["k"], index=index))
    if "user" in args:
        return (f"top {args['k']} for user {args['user']}",
                rec.recommend(args["user"], args["k"], args["exclude_rated"], index=index))
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


def all_users(args: dict) -> int:
    """Top-k for every user of the run into args["out"]."""
    from tqdm import tqdm

    from recsys_torch.errors import TrainingInterrupted
    from recsys_torch.export import output_format, summary, write_top_n
    from recsys_torch.recommend import Recommender
    from recsys_torch.signals import SignalGuard, signal_name

    output_format(args["out"])  # a bad name fails before any work
    rec = Recommender.load(args["run_dir"])
    blocks = rec.recommend_all(args["k"], chunk=args["chunk"], exclude_rated=args["exclude_rated"],
                               index=item_index(rec, args))
    # SIGINT / SIGTERM stop between two blocks: the temporary file goes, args["out"] is left as it was
    with SignalGuard() as guard, tqdm(total=len(rec.user_ids), unit="user", file=sys.stderr,
                                      disable=not args["progress"], dynamic_ncols=True) as bar:
        def tracked():
            for block in blocks:
                if guard.signum is not None:
                    raise TrainingInterrupted(f"stopped by {signal_name(guard.signum)}: {args['out']} was not "
                                              "written", guard.signum)
                yield block
                bar.update(block.n_users)

        counts = write_top_n(rec, tracked(), args["out"])
    done, *notes = summary(counts, args["k"], args["out"], approximate=args["ann"])
    for note in notes:
        print(note, file=sys.stderr)
    print(done)
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args["all_users"]:
        return all_users(args)
    heading, recs = recommendations(args)
    print(render(heading, recs, args["format"]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
