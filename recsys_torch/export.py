"""Files out of a trained run, from its :class:`~recsys_torch.recommend.Recommender` tables (numpy and
pyarrow only: no torch).

- :func:`export_embeddings`: the user and item vectors and biases with their raw ids, and the global
  bias (``meta.json``), as parquet tables or ``.npy`` arrays.
- :func:`write_top_n`: the rows of :meth:`Recommender.recommend_all` as one parquet or csv file,
  written a block at a time into a temporary file of the same folder and renamed at the end, so an
  error or an interrupt never leaves a half-written file under the asked name.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable

import numpy as np

from recsys_torch.errors import ConfigError
from recsys_torch.io import atomic_write, atomic_json
from recsys_torch.recommend import Recommender, TopN

FORMATS = ("parquet", "npy")
META_NAME = "meta.json"
EXPORT_FORMAT = 1


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs pyarrow: pip install -e '.[parquet]'") from None
    return pyarrow


# pyarrow arrays straight from numpy buffers: pa.array() would import pandas (about a second) to check
# whether it was given a pandas object
def _numbers(pa, values: np.ndarray, kind):
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _booleans(pa, values: np.ndarray):
    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def _strings(pa, values: list[str]):
    data = [v.encode("utf-8", "surrogatepass") for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    kind = pa.string()
    if offsets[-1] < 2 ** 31 - 1:
        offsets = offsets.astype(np.int32)
    else:
        kind = pa.large_string()
    return pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


# ---- embeddings --------------------------------------------------------------------------------------
def export_embeddings(rec: Recommender, out: str, fmt: str = "parquet") -> list[str]:
    """Write the run's tables into the folder ``out``; the paths written.

    ``parquet``: ``users.parquet`` (id, known, bias, vector) and ``items.parquet`` (id, title, known,
    bias, vector); ``vector`` is a fixed-size list of float32. ``npy``: ``user_ids.npy`` (str),
    ``user_known.npy``, ``user_bias.npy``, ``user_vectors.npy`` ([n_users, dim] float32), the same for
    items plus ``item_titles.npy``. Both: ``meta.json`` with ``global_bias`` and ``dim``. ``known``:
    the run can score the user / recommend the item (it was in training, or a feature tower serves
    it); the other rows hold untrained values. Models without vectors (popularity, baseline) write no
    vectors. ``score(u, i) = global_bias + user bias + item bias + <user vector, item vector>``.
    Users also get ``rated``: the positions (rows of the item table) of the items the run knows they
    rated, which ``recommend.py`` leaves out of their recommendations (parquet: a list column; npy:
    ``user_rated_indptr.npy`` and ``user_rated_items.npy``, user u's in ``items[indptr[u]:indptr[u +
    1]]``); not written for a run that saved no training rows.
    Runs whose model scores users that training never saw with their own item biases (the hybrid's
    ``new_user_bias``) also write the items' ``new_user_bias`` and the users' ``trained``: a user that
    is not ``trained`` (or a new one) is scored with ``new_user_bias`` in place of the item bias."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out={out} is a file: give a folder to write the embeddings into")
    sides = {
        "user": {"id": rec.user_ids, "known": np.asarray(rec.user_scorable, dtype=bool),
                 "bias": np.asarray(rec.user_bias, dtype=np.float32), "vector": rec.user_vectors,
                 "trained": None if rec.new_user_item_bias is None else np.asarray(rec.user_trained, dtype=bool)},
        "item": {"id": rec.item_ids, "title": rec.titles, "known": np.asarray(rec.candidates, dtype=bool),
                 "bias": np.asarray(rec.item_bias, dtype=np.float32), "vector": rec.item_vectors,
                 "new_user_bias": None if rec.new_user_item_bias is None
                 else np.asarray(rec.new_user_item_bias, dtype=np.float32)},
    }
    dim = 0 if rec.item_vectors is None else int(rec.item_vectors.shape[1])
    rated = rec.rated_lists()
    written = []
    if fmt == "parquet":
        pa = _pyarrow("format=parquet")
        import pyarrow.parquet as pq

        for side, columns in sides.items():
            arrays, names = [], []
            for name, values in columns.items():
                if values is None:
                    continue
                if name == "vector":
                    flat = _numbers(pa, np.asarray(values, dtype=np.float32).reshape(-1), pa.float32())
                    arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
                elif name in ("id", "title"):
                    arrays.append(_strings(pa, list(values)))
                elif name in ("known", "trained"):
                    arrays.append(_booleans(pa, values))
                else:
                    arrays.append(_numbers(pa, values, pa.float32()))
                names.append(name)
            if side == "user" and rated is not None:
                indptr, items = rated
                large = indptr[-1] >= 2 ** 31  # list<> offsets are int32
                offsets = (_numbers(pa, indptr, pa.int64()) if large
                           else _numbers(pa, indptr.astype(np.int32), pa.int32()))
                lists = pa.LargeListArray if large else pa.ListArray
                arrays.append(lists.from_arrays(offsets, _numbers(pa, items, pa.int32())))
                names.append("rated")
            table = pa.Table.from_arrays(arrays, names=names)
            path = os.path.join(out, f"{side}s.parquet")
            atomic_write(path, lambda fh, table=table: pq.write_table(table, fh))
            written.append(path)
    else:
        for side, columns in sides.items():
            for name, values in columns.items():
                if values is None:
                    continue
                if name in ("id", "title"):
                    array = np.array(list(values), dtype=str)
                    name = f"{name}s"
                elif name == "vector":
                    array = np.ascontiguousarray(values, dtype=np.float32)
                    name = "vectors"
                else:
                    array = values
                path = os.path.join(out, f"{side}_{name}.npy")
                atomic_write(path, lambda fh, array=array: np.save(fh, array, allow_pickle=False))
                written.append(path)
        for name, array in zip(("rated_indptr", "rated_items"), rated or ()):
            path = os.path.join(out, f"user_{name}.npy")
            atomic_write(path, lambda fh, array=array: np.save(fh, array, allow_pickle=False))
            written.append(path)
    meta = {"format": EXPORT_FORMAT, "global_bias": float(rec.global_bias), "dim": dim,
            "n_users": len(rec.user_ids), "n_items": len(rec.item_ids), "model": rec.model_name,
            "run_id": rec.run_id, "files": fmt,
            "score": "global_bias + user bias + item bias + <user vector, item vector>"}
    if rec.new_user_item_bias is not None:
        meta["new_user_score"] = ("for a user that is not trained (or a new one): the item's new_user_bias in place "
                                  "of its bias")
    path = os.path.join(out, META_NAME)
    atomic_json(path, meta)
    return [*written, path]


# ---- top-N for every user ----------------------------------------------------------------------------
def output_format(path: str) -> str:
    """``parquet`` or ``csv``, from the file name."""
    lower = path.lower()
    for fmt, ends in (("parquet", (".parquet", ".pq")), ("csv", (".csv",))):
        if lower.endswith(ends):
            return fmt
    raise ConfigError(f"out={path}: the file name must end in .parquet or .csv")


def write_top_n(rec: Recommender, blocks: Iterable[TopN], path: str) -> dict:
    """Write the rows of ``blocks`` to ``path`` (.parquet or .csv): columns user, rank, item, score
    (and title when the run has titles), raw ids as strings. Returns the counts: rows, users,
    skipped (users that cannot be scored), short (users with fewer than k items left)."""
    fmt = output_format(path)
    if os.path.isdir(path):
        raise ConfigError(f"out={path} is a folder: give a file name ending in .{fmt}")
    counts = {"rows": 0, "users": 0, "skipped": 0, "short": 0}

    def tally(block: TopN) -> None:
        counts["rows"] += len(block.users)
        counts["users"] += block.n_users - block.skipped
        counts["skipped"] += block.skipped
        counts["short"] += block.short

    try:
        pa = _pyarrow(f"out=*.{fmt}")
    except ConfigError:
        if fmt == "parquet":
            raise
        pa = None
    if pa is None:  # csv without pyarrow: the csv module
        def write(fh) -> None:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            writer = csv.writer(text)
            writer.writerow(["user", "rank", "item", "score", *(["title"] if rec.has_titles else [])])
            for block in blocks:
                tally(block)
                for u, r, i, s in zip(block.users.tolist(), block.ranks.tolist(), block.items.tolist(), block.scores):
                    writer.writerow([rec.user_ids[u], r, rec.item_ids[i], str(s),
                                     *([rec.titles[i]] if rec.has_titles else [])])
            text.flush()
            text.detach()

        atomic_write(path, write)
        return counts

    user_ids, item_ids = _strings(pa, rec.user_ids), _strings(pa, rec.item_ids)
    titles = _strings(pa, rec.titles) if rec.has_titles else None
    fields = [("user", user_ids.type), ("rank", pa.int32()), ("item", item_ids.type), ("score", pa.float32())]
    schema = pa.schema(fields + ([("title", titles.type)] if titles is not None else []))

    def table(block: TopN):
        items = _numbers(pa, block.items.astype(np.int64), pa.int64())
        columns = [user_ids.take(_numbers(pa, block.users.astype(np.int64), pa.int64())),
                   _numbers(pa, block.ranks.astype(np.int32), pa.int32()), item_ids.take(items),
                   _numbers(pa, block.scores.astype(np.float32), pa.float32())]
        if titles is not None:
            columns.append(titles.take(items))
        return pa.Table.from_arrays(columns, schema=schema)

    def write(fh) -> None:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            writer = pq.ParquetWriter(fh, schema)
        else:
            import pyarrow.csv as pacsv

            writer = pacsv.CSVWriter(fh, schema)
        try:
            for block in blocks:
                tally(block)
                if len(block.users):
                    writer.write_table(table(block))
        finally:
            writer.close()

    atomic_write(path, write)
    return counts


def summary(counts: dict, k: int, path: str, approximate: bool = False) -> list[str]:
    """The lines a script prints after :func:`write_top_n`: what was written, then notes (for stderr).
    ``approximate``: the candidates came from a search index, which may also find too few."""
    notes = []
    if counts["skipped"]:
        notes.append(f"skipped {counts['skipped']:,} user(s) that cannot be scored (no training data and no user "
                     "features)")
    if counts["short"]:
        why = ("they have rated nearly every item, or the index found too few they have not" if approximate
               else "they have rated nearly every item: they got all that is left")
        notes.append(f"{counts['short']:,} user(s) got fewer than {k} items ({why})")
    done = f"wrote {counts['rows']:,} rows (top {k} for {counts['users']:,} users) to {path}"
    return [done, *notes]
