"""Approximate nearest-neighbour search over a run's items, with faiss (optional: ``pip install -e
'.[ann]'``; imported only when an index is built).

A score is ``mu + b_u + b_i + <p_u, q_i>``; for one user ``mu + b_u`` is a constant, so folding the
item bias into the vectors, user ``[p_u, 1]`` and item ``[q_i, b_i]``, makes an inner-product search
rank the items exactly as the model does. A run whose model has new-user item biases ``b'_i`` (the
hybrid's ``new_user_bias``, for users training never saw) folds both: item ``[q_i, b_i, b'_i]``, a
trained user ``[p_u, 1, 0]`` and a new one ``[p_u, 0, 1]``, so one index serves both kinds. Similar
items use the cosine (unit item vectors). The index only proposes candidates:
:class:`~recsys_torch.recommend.Recommender` scores them exactly, drops the user's rated items (it
asks for ``k`` plus their count) and ranks them, so what an approximate index changes is recall,
never a score.

``kind="hnsw"`` (the default) is ``faiss.IndexHNSWFlat`` with the inner-product metric (``m`` links
per node, ``ef_construction``, ``ef_search``); ``kind="flat"`` is the exact ``IndexFlatIP``.
:func:`benchmark` measures recall@k against exact search and the speed-up on a synthetic catalog
(``python scripts/ann_check.py``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np

from recsys_torch.errors import ConfigError, OutputError

NO_FAISS = "ann=true needs faiss: pip install -e '.[ann]'"
KINDS = ("hnsw", "flat")


def import_faiss():
    """faiss, or a ConfigError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(NO_FAISS) from None
    return faiss


@dataclass(frozen=True)
class AnnSettings:
    kind: str = "hnsw"
    m: int = 32  # HNSW links per node
    ef_construction: int = 200
    ef_search: int = 64  # raised to the number of hits asked for when that is larger

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ann kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"ann {name} must be a positive integer, got {value!r}")

    def tag(self) -> str:
        return "flat" if self.kind == "flat" else f"hnsw{self.m}-{self.ef_construction}"


def fold_items(vectors: np.ndarray | None, bias: np.ndarray, new_user_bias: np.ndarray | None = None) -> np.ndarray:
    """Items as ``[q_i, b_i]``, or ``[q_i, b_i, b'_i]`` with new-user biases."""
    columns = [np.asarray(b, dtype=np.float32)[:, None] for b in (bias, new_user_bias) if b is not None]
    if vectors is not None:
        columns.insert(0, np.asarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(np.hstack(columns))


def fold_users(vectors: np.ndarray, new: np.ndarray | None = None) -> np.ndarray:
    """Users as ``[p_u, 1]``: their inner product with a folded item is ``<p_u, q_i> + b_i``. With
    ``new`` (per user: training never saw them) ``[p_u, 1, 0]`` or ``[p_u, 0, 1]``, for items folded
    with their new-user biases."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    if new is None:
        return np.ascontiguousarray(np.hstack([vectors, np.ones((len(vectors), 1), dtype=np.float32)]))
    new = np.asarray(new, dtype=bool).reshape(len(vectors), 1)
    return np.ascontiguousarray(np.hstack([vectors, (~new).astype(np.float32), new.astype(np.float32)]))


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return np.ascontiguousarray(rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12))


def build_index(table: np.ndarray, settings: AnnSettings):
    """An inner-product faiss index over the rows of ``table``."""
    faiss = import_faiss()
    d = table.shape[1]
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, int(settings.m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(settings.ef_construction)
        index.hnsw.efSearch = int(settings.ef_search)
    index.add(np.ascontiguousarray(table, dtype=np.float32))
    return index


def search(index, queries: np.ndarray, n: int, settings: AnnSettings) -> np.ndarray:
    """Row positions of the ``n`` best rows per query (-1 where fewer were found)."""
    faiss = import_faiss()
    n = max(1, min(int(n), index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if settings.kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(int(settings.ef_search), n)
        _, found = index.search(queries, n, params=params)
    else:
        _, found = index.search(queries, n)
    return found


class FaissIndex:
    """The :class:`~recsys_torch.recommend.ItemIndex` of a Recommender: its recommendable items
    (``candidates``), folded for user queries and unit-length for similar items. Each of the two is
    built on first use; with ``cache`` (a folder, usually the run folder) it is saved there as
    ``ann-<side>-<settings>-<run_id>.faiss`` and read back by later queries of the same run."""

    def __init__(self, rec, settings: AnnSettings | None = None, cache: str | None = None) -> None:
        import_faiss()
        self.rec, self.settings = rec, settings or AnnSettings()
        self.codes = np.flatnonzero(rec.candidates)
        self.cache = cache if cache and rec.run_id else None
        self._indexes: dict[str, object] = {}
        self.build_seconds = 0.0

    def _table(self, side: str) -> np.ndarray:
        rec = self.rec
        if side == "user":
            vectors = None if rec.item_vectors is None else rec.item_vectors[self.codes]
            new_bias = None if rec.new_user_item_bias is None else rec.new_user_item_bias[self.codes]
            return fold_items(vectors, rec.item_bias[self.codes], new_bias)
        return unit_rows(rec.item_vectors[self.codes])

    def _width(self, side: str) -> int:
        """The number of columns of ``side``'s table."""
        rec = self.rec
        vectors = 0 if rec.item_vectors is None else rec.item_vectors.shape[1]
        if side == "item":
            return vectors
        return vectors + 1 + (rec.new_user_item_bias is not None)

    def _path(self, side: str) -> str:
        run = re.sub(r"[^\w.-]", "_", str(self.rec.run_id))
        return os.path.join(self.cache, f"ann-{side}-{self.settings.tag()}-{run}.faiss")

    def index(self, side: str):
        if side in self._indexes:
            return self._indexes[side]
        faiss = import_faiss()
        index = None
        path = self._path(side) if self.cache else None
        if path and os.path.exists(path):
            try:
                index = faiss.read_index(path)
                if index.ntotal != len(self.codes) or index.d != self._width(side):  # another version's
                    index = None
            except RuntimeError:  # unreadable: build it again
                index = None
        if index is None:
            start = time.perf_counter()
            index = build_index(self._table(side), self.settings)
            self.build_seconds += time.perf_counter() - start
            if path:
                self._save(index, path, side)
        self._indexes[side] = index
        return index

    def _save(self, index, path: str, side: str) -> None:
        """Keep the index for later queries; a folder that cannot be written only costs a rebuild."""
        from recsys_torch.io import atomic_write

        faiss = import_faiss()
        data = faiss.serialize_index(index).tobytes()
        try:
            atomic_write(path, lambda fh: fh.write(data))
        except OutputError:
            return
        prefix = f"ann-{side}-"
        for name in os.listdir(self.cache):  # the indexes of runs this folder held before
            if name.startswith(prefix) and name.endswith(".faiss") and os.path.join(self.cache, name) != path:
                try:
                    os.unlink(os.path.join(self.cache, name))
                except OSError:
                    pass

    def _codes(self, found: np.ndarray) -> np.ndarray:
        return np.where(found >= 0, self.codes[np.maximum(found, 0)], -1)

    def user_hits(self, vectors: np.ndarray, n: int, new: np.ndarray | None = None) -> np.ndarray:
        if len(vectors) == 0:
            return np.zeros((0, n), dtype=np.int64)
        if self.rec.new_user_item_bias is not None:
            new = np.zeros(len(vectors), dtype=bool) if new is None else new
        else:
            new = None  # one bias per item: every user is scored with it
        return self._codes(search(self.index("user"), fold_users(vectors, new), n, self.settings))

    def similar_hits(self, codes: np.ndarray, n: int) -> np.ndarray:
        queries = unit_rows(self.rec.item_vectors[np.asarray(codes)])
        return self._codes(search(self.index("item"), queries, n, self.settings))


# ---- how well it finds the exact top-k ----------------------------------------------------------
def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of the share of the exact top-k (rows of ``exact``) that ``found`` holds."""
    found, exact = np.asarray(found), np.asarray(exact)
    if len(exact) == 0:
        return float("nan")
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]
    return float(np.mean(hits))


def exact_top(queries: np.ndarray, table: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """The exact top-k rows of ``table`` by inner product, best first (equal scores: lower row first),
    the way :meth:`Recommender.recommend_all` searches: per block of queries a matrix product, the
    k-th best score by a partition, and a sort of the rows at or above it."""
    n = table.shape[0]
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ table.T
        kth = np.partition(scores, n - k, axis=1)[:, n - k]
        rows, cols = np.divmod(np.flatnonzero(scores >= kth[:, None]), n)
        order = np.lexsort((cols, -scores[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
        out[start:start + block] = cols[rank < k].reshape(-1, k)
    return out


def synthetic_catalog(n_items: int, dim: int, n_queries: int, catalog: str = "clustered", seed: int = 0):
    """Item vectors and biases and user vectors shaped like a trained factorization, where the
    vector part of a score varies about as much as the bias part (std 0.5 and 0.3): ``clustered``
    (tastes around 256 centres, item norms spread like popularity) or ``gaussian`` (no structure at
    all: the hardest case for an index)."""
    rng = np.random.default_rng(seed)
    scale = 0.5 ** 0.5 / dim ** 0.25  # <user, item> of two such vectors has std 0.5
    if catalog == "gaussian":
        items = rng.normal(size=(n_items, dim)) * scale
        users = rng.normal(size=(n_queries, dim)) * scale
    elif catalog == "clustered":
        centres = rng.normal(size=(256, dim))
        spread = scale / (1 + 0.7 ** 2) ** 0.5
        items = (centres[rng.integers(0, 256, n_items)] + 0.7 * rng.normal(size=(n_items, dim))) * spread
        items *= rng.lognormal(0.0, 0.3, size=(n_items, 1))
        users = (centres[rng.integers(0, 256, n_queries)] + 0.7 * rng.normal(size=(n_queries, dim))) * spread
    else:
        raise ConfigError(f"catalog must be clustered or gaussian, got {catalog!r}")
    bias = rng.normal(size=n_items) * 0.3
    return items.astype(np.float32), bias.astype(np.float32), users.astype(np.float32)


def benchmark(n_items: int = 200_000, dim: int = 64, n_queries: int = 1000, k: int = 10,
              settings: AnnSettings | None = None, catalog: str = "clustered", ef_search: list[int] | None = None,
              seed: int = 0) -> dict:
    """Recall@k of the index against exact search, and queries per second of both, for user queries
    (folded biases) on a synthetic catalog. ``ef_search``: several HNSW search depths to try on the
    one built index."""
    settings = settings or AnnSettings()
    faiss = import_faiss()
    items, bias, users = synthetic_catalog(n_items, dim, n_queries, catalog, seed)
    table, queries = fold_items(items, bias), fold_users(users)
    start = time.perf_counter()
    exact = exact_top(queries, table, k)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    index = build_index(table, settings)
    build_s = time.perf_counter() - start
    rows = []
    for ef in (ef_search or [settings.ef_search]):
        run = AnnSettings(settings.kind, settings.m, settings.ef_construction, int(ef))
        start = time.perf_counter()
        found = search(index, queries, k, run)
        seconds = time.perf_counter() - start
        rows.append({"ef_search": int(ef), "recall": recall_at_k(found, exact),
                     "ms_per_query": 1e3 * seconds / n_queries, "speedup": exact_s / seconds})
    return {"n_items": n_items, "dim": dim, "n_queries": n_queries, "k": k, "catalog": catalog,
            "index": settings.tag(), "build_s": build_s, "exact_ms_per_query": 1e3 * exact_s / n_queries,
            "threads": faiss.omp_get_max_threads(), "rows": rows}


def render(result: dict) -> str:
    lines = [f"{result['catalog']} catalog: {result['n_items']:,} items x {result['dim']} dims (+1 folded bias), "
             f"{result['n_queries']} user queries, top-{result['k']}, {result['threads']} thread(s)",
             f"exact (numpy: matmul + partition per block of 256 queries): {result['exact_ms_per_query']:.3f} ms/query",
             f"index {result['index']}: built in {result['build_s']:.1f} s",
             f"{'ef_search':>9}  {'recall@' + str(result['k']):>9}  {'ms/query':>9}  {'speed-up':>8}"]
    for row in result["rows"]:
        lines.append(f"{row['ef_search']:>9}  {row['recall']:>9.4f}  {row['ms_per_query']:>9.3f}  {row['speedup']:>7.1f}x")
    return "\n".join(lines)
