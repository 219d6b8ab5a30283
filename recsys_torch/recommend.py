"""Recommend from a trained run: top-N for a user of the run (with a reason per item), items similar
to an item, and fold-in of a new user from a few ratings and/or user features.

Every model shares ``score = mu + b_u + b_i + <user_vector, item_vector>``, so one routine serves
them all: the user and item sides are computed once, frozen into numpy tables, and a user (known, or
folded in) is scored against them. What this module asks of a model is the serving part of
:class:`~recsys_torch.models.base.FactorizationModel` (``user_table``, ``item_table``,
``scores_unknown_users`` / ``_items``, ``regularization``, ``new_user``, ``new_user_item_offset``);
of a task, ``implicit``, ``threshold``, ``config()`` and ``fold_in_loss``. A user training never saw
(scored from features, or folded in) is scored with the model's new-user item biases where it has them.

Training writes those tables next to the checkpoint (``recommend.npz``: numpy only, no pickles), so a
query for a user or an item of the run starts without importing torch, which takes longer than the
query itself. The model and task are rebuilt from ``checkpoint.pt`` only when a query needs them:
fold-in of a ranking run (L-BFGS on the task's loss), user features, or the SVD++ term. A run without
a current ``recommend.npz`` (an older run, or one whose checkpoint was replaced) is served from the
checkpoint, with the same results.

:meth:`Recommender.recommend_all` gives every user's top-N a block of users at a time, the same
items, order and scores as one query per user. An optional search index (:class:`ItemIndex`, e.g.
:class:`recsys_torch.ann.FaissIndex`) can propose the candidates of a user or item query instead of
scoring the whole catalog; they are scored exactly all the same.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from recsys_torch.errors import CheckpointError, ConfigError, UnknownIdError

CHECKPOINT_NAME = "checkpoint.pt"
INDEX_NAME = "recommend.npz"
INDEX_FORMAT = 2
N_REASONS = 2  # liked items named per recommendation
NO_TRAINING_ROWS = ("this run saved no training interactions, so it cannot tell what a user rated: pass "
                    "exclude_rated=false")


@dataclass
class Recommendation:
    item: str  # raw id
    title: str
    score: float
    reason: str | None = None

    def as_dict(self) -> dict:
        out = {"item": self.item, "title": self.title, "score": self.score}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class UserVector:
    """A user scored against the frozen item side: a vector (``None`` for bias-only models) and a
    bias, plus the item codes the user gave and which of those the user liked."""

    vector: np.ndarray | None
    bias: float
    rated: np.ndarray  # item codes to exclude
    liked: np.ndarray  # item codes to explain recommendations with


@dataclass
class TopN:
    """The top items of a block of users (:meth:`Recommender.recommend_all`), one row per (user,
    rank): best first within each user, equal scores in item-code order, rated items left out."""

    users: np.ndarray  # int64 user code of each row
    ranks: np.ndarray  # int32, 1 = best
    items: np.ndarray  # int64 item code
    scores: np.ndarray  # float32, the model's score (the same number recommend() gives)
    n_users: int  # users of the block, scored or skipped (for progress)
    skipped: int  # users of the block that cannot be scored (no training data, no user features)
    short: int  # users with fewer than k items left to recommend (they get all of them)


class ItemIndex(Protocol):
    """A search index over the recommendable items (see :mod:`recsys_torch.ann`): it proposes
    candidates, which are then scored exactly, so only recall depends on it."""

    def user_hits(self, vectors: np.ndarray, n: int, new: np.ndarray | None = None) -> np.ndarray:
        """``[m, n]`` item codes with (about) the highest ``<vector, q_i> + b_i`` per row of
        ``vectors`` (``b'_i``, the new-user item bias, for the rows where ``new`` is true); -1 where it
        found fewer."""

    def similar_hits(self, codes: np.ndarray, n: int) -> np.ndarray:
        """``[m, n]`` item codes with (about) the highest cosine to each item of ``codes``; -1 pads."""


def _pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array and offsets (exact for any text, unlike numpy's str arrays)."""
    data = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return np.frombuffer(b"".join(data), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw, ends = blob.tobytes(), offsets.tolist()
    return [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(ends[:-1], ends[1:])]


def _by_user(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int):
    """Training rows grouped by user: ``(indptr [n_users + 1], item codes, ratings)``."""
    order = np.argsort(users, kind="stable")
    indptr = np.searchsorted(users[order], np.arange(n_users + 1)).astype(np.int64)
    kind = np.int32 if len(items) == 0 or int(items.max()) < 2 ** 31 else np.int64
    return indptr, items[order].astype(kind), ratings[order].astype(np.float32)


def _normalize(rows: np.ndarray) -> np.ndarray:
    """Unit rows (as torch's F.normalize: a zero row stays zero)."""
    rows = rows.astype(np.float32, copy=False)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _dot_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_j a[j] * b[j]`` in float32, ``j`` in order (``a``: ``[d, n]``; ``b``: ``[d]`` or ``[d, n]``).

    Every score of a user vector against an item vector goes through this one sum: a single-user
    query, the batch for every user and re-scored index hits then give the very same float32 number
    for a (user, item) pair, so rankings and their ties agree exactly. A BLAS product does not: its
    summation order (and so the last bit) depends on the shape of the call."""
    if a.shape[0] == 0:
        return np.zeros(a.shape[1:], dtype=np.float32)
    acc = a[0] * b[0]
    tmp = np.empty_like(acc)
    for j in range(1, a.shape[0]):
        np.multiply(a[j], b[j], out=tmp)
        acc += tmp
    return acc


def _rows_of(indptr: np.ndarray, values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of CSR rows ``codes``: ``(position in codes, value)`` per entry."""
    starts, ends = indptr[codes], indptr[codes + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(codes), dtype=np.int64), lengths)
    offsets = np.cumsum(lengths) - lengths
    index = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)
    return rows, values[index].astype(np.int64)


def _best_per_row(rows: np.ndarray, items: np.ndarray, scores: np.ndarray, k: int):
    """The ``k`` best (row, item, score) entries per row: highest score first, equal scores to the
    lower item code (as :meth:`Recommender.recommend`). Returns rows, 1-based ranks, items, scores."""
    order = np.lexsort((items, -scores.astype(np.float64), rows))
    rows, items, scores = rows[order], items[order], scores[order]
    rank = np.arange(len(rows), dtype=np.int64) - np.searchsorted(rows, rows, side="left")
    keep = rank < k
    return rows[keep], (rank[keep] + 1).astype(np.int32), items[keep], scores[keep]


def _checkpoint_stamp(path: str) -> np.ndarray:
    """A hash of a checkpoint's content: an index is served only beside the very file it was made
    from (a copy that kept no modification times still matches; a forged or replaced file does not)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return np.frombuffer(digest.digest(), dtype=np.uint8).copy()


def _check_run_complete(folder: str) -> str | None:
    """The ``run_id`` of the complete run in ``folder`` (None for a folder from before run.json); a
    CheckpointError when the folder's last run did not finish, so its files may be an older run's."""
    try:
        with open(os.path.join(folder, "run.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        manifest = {}
    status = manifest.get("status") if isinstance(manifest, dict) else None
    if status != "complete":
        why = f"run.json says {status!r}" if status else "its run.json is unreadable"
        raise CheckpointError(f"the last run in {folder} did not finish ({why}): its outputs do not form one "
                              "complete run; train it again (or serve another run folder)")
    return manifest.get("run_id")


def _numpy(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


class Recommender:
    """A trained model's frozen tables with its id maps, titles and training interactions.

    ``Recommender.load(run_dir)`` reads ``run_dir/recommend.npz`` (or ``checkpoint.pt``); the
    constructor takes a model, its task and the parts directly (``train_*``: the training rows, to
    exclude already rated items and to explain).
    """

    def __init__(self, model, user_ids, item_ids, item_titles=None, train_users=None, train_items=None,
                 train_ratings=None, task=None, rating_scale=None, user_vocab: list[str] | None = None,
                 user_dense: list[str] | None = None, seen_users=None, seen_items=None) -> None:
        if task is None:  # a run of ratings
            from recsys_torch.checkpoint import task_from_config

            task = task_from_config(None)
        model = model.eval()
        items, users = model.item_table(), model.user_table()
        offset = model.new_user_item_offset()
        self._setup(
            user_ids=[str(u) for u in user_ids], item_ids=[str(i) for i in item_ids],
            titles=[str(t) for t in item_titles] if item_titles else None,
            global_bias=float(model.global_bias), item_vectors=_numpy(items.vector), item_bias=_numpy(items.bias),
            user_vectors=_numpy(users.vector), user_bias=_numpy(users.bias),
            # a user without training rows has no trained id vector; a user feature tower still scores it
            user_scorable=model.known_users.cpu().numpy() | model.scores_unknown_users,
            candidates=(np.ones(model.n_items, dtype=bool) if model.scores_unknown_items
                        else model.known_items.cpu().numpy().copy()),
            train=None if train_users is None else _by_user(np.asarray(train_users), np.asarray(train_items),
                                                            np.asarray(train_ratings), model.n_users),
            seen=None if seen_users is None else _by_user(np.asarray(seen_users), np.asarray(seen_items),
                                                          np.zeros(len(seen_items)), model.n_users)[:2],
            task=(task.implicit, task.threshold, task.loss_name), task_config=task.config(),
            rating_scale=rating_scale, regs=model.regularization(), needs_model=model.new_user_needs_model,
            scores_unknown_users=model.scores_unknown_users, user_vocab=user_vocab, user_dense=user_dense,
            model_name=type(model).__name__,
            new_user_item_bias=None if offset is None else _numpy(items.bias + offset),
            user_trained=model.known_users.cpu().numpy().copy(),
        )
        self._model, self._task = model, task

    def _setup(self, *, user_ids, item_ids, titles, global_bias, item_vectors, item_bias, user_vectors,
               user_bias, user_scorable, candidates, train, task, task_config, rating_scale, regs, needs_model,
               scores_unknown_users, user_vocab, user_dense, model_name, seen=None, checkpoint: str | None = None,
               new_user_item_bias=None, user_trained=None) -> None:
        self.user_ids, self.item_ids = user_ids, item_ids
        self.has_titles = bool(titles)  # else the titles are the item ids
        self.titles = titles if titles else list(item_ids)
        self._item_columns: np.ndarray | None = None  # item_vectors.T, float32, contiguous
        self._user_columns: np.ndarray | None = None  # user_vectors.T, likewise
        self.global_bias = float(global_bias)
        self.item_vectors, self.item_bias = item_vectors, item_bias
        self.user_vectors, self.user_bias, self.user_scorable = user_vectors, user_bias, user_scorable
        # the item biases of a user training never saw (a scored-by-features user of the run, or one
        # folded in), where the model gives them their own (the hybrid's new_user_bias); None: item_bias
        self.new_user_item_bias = new_user_item_bias
        self.user_trained = (np.asarray(user_trained, dtype=bool) if user_trained is not None
                             else np.asarray(user_scorable, dtype=bool))  # which users training saw
        self.candidates = candidates
        self.implicit, self.threshold, self.loss = task
        self.task_config = dict(task_config)
        self.rating_scale = tuple(float(x) for x in rating_scale) if rating_scale is not None and len(rating_scale) else None
        self.reg, self.reg_bias, self.reg_exponent = regs
        self.needs_model, self.scores_unknown_users = bool(needs_model), bool(scores_unknown_users)
        self.user_vocab = list(user_vocab) if user_vocab is not None else None
        self.user_dense = list(user_dense or [])
        self.model_name = model_name
        self._checkpoint = checkpoint
        self._model = self._task = None
        self._user_index: dict[str, int] | None = None
        self._item_index: dict[str, int] | None = None
        self._train = train  # (indptr over users, item codes, ratings): rows grouped by user
        self._seen = seen  # (indptr, item codes): rated, yet not training rows (below a ranking threshold)
        self.run_id: str | None = None

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def load(cls, run: str) -> "Recommender":
        """A run folder (holding ``checkpoint.pt``) or a checkpoint file."""
        path = os.path.join(run, CHECKPOINT_NAME) if os.path.isdir(run) else run
        if not os.path.exists(path):
            where = f"no {CHECKPOINT_NAME} in {run}" if os.path.isdir(run) else f"{run} does not exist"
            raise CheckpointError(f"{where}: give run_dir= the output folder of a finished scripts/train.py run")
        folder = os.path.dirname(os.path.abspath(path))
        run_id = _check_run_complete(folder)
        index = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(path) and os.path.exists(index):
            rec = cls._from_index(index, path)
            if rec is not None and (run_id is None or rec.run_id == run_id):
                return rec
        rec = cls._from_checkpoint(path)
        if run_id is not None and rec.run_id not in (None, run_id):
            raise CheckpointError(f"{path} belongs to another run than {folder}/run.json: train the run again")
        return rec

    @classmethod
    def from_state(cls, state: dict, model=None, task=None) -> "Recommender":
        """From what :func:`recsys_torch.checkpoint.save_checkpoint` wrote (the model and task are
        rebuilt from it unless given)."""
        from recsys_torch.checkpoint import model_from_checkpoint, task_from_checkpoint

        model = model if model is not None else model_from_checkpoint(state)
        task = task if task is not None else task_from_checkpoint(state)
        train, seen = state.get("train") or {}, state.get("seen") or {}
        uf = state.get("user_features") or {}
        return cls(model, state["user_ids"], state["item_ids"], state.get("item_titles"), train.get("users"),
                   train.get("items"), train.get("ratings"), task, state.get("rating_scale"), uf.get("vocab"),
                   uf.get("dense_names"), seen.get("users"), seen.get("items"))

    @classmethod
    def _from_checkpoint(cls, path: str) -> "Recommender":
        from recsys_torch.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        rec = cls.from_state(state)
        rec._checkpoint = path
        rec.run_id = (state.get("metrics") or {}).get("run_id")
        return rec

    @classmethod
    def _from_index(cls, index: str, checkpoint: str) -> "Recommender | None":
        """The tables saved beside ``checkpoint``; None when they are not of that very file (then the
        checkpoint is read instead)."""
        try:
            with np.load(index, allow_pickle=False) as z:
                a = {key: z[key] for key in z.files}
            if int(a["format"]) != INDEX_FORMAT or not np.array_equal(a["checkpoint"], _checkpoint_stamp(checkpoint)):
                return None
            rec = cls.__new__(cls)
            threshold = float(a["threshold"])
            rec._setup(
                user_ids=_unpack(a["user_ids"], a["user_ids_offsets"]), item_ids=_unpack(a["item_ids"], a["item_ids_offsets"]),
                titles=_unpack(a["titles"], a["titles_offsets"]) if "titles" in a else None,
                global_bias=float(a["global_bias"]),
                item_vectors=a.get("item_vectors"), item_bias=a["item_bias"],
                user_vectors=a.get("user_vectors"), user_bias=a["user_bias"], user_scorable=a["user_scorable"],
                candidates=a["candidates"],
                train=(a["train_indptr"], a["train_items"], a["train_ratings"]) if "train_indptr" in a else None,
                seen=(a["seen_indptr"], a["seen_items"]) if "seen_indptr" in a else None,
                task=(bool(a["implicit"]), None if math.isnan(threshold) else threshold, str(a["loss"])),
                task_config=json.loads(str(a["task_config"])),
                rating_scale=a.get("rating_scale"), regs=tuple(a["regs"].tolist()), needs_model=bool(a["needs_model"]),
                scores_unknown_users=bool(a["scores_unknown_users"]),
                user_vocab=_unpack(a["user_vocab"], a["user_vocab_offsets"]) if "user_vocab" in a else None,
                user_dense=_unpack(a["user_dense"], a["user_dense_offsets"]), model_name=str(a["model_name"]),
                checkpoint=checkpoint, new_user_item_bias=a.get("new_user_item_bias"),
                user_trained=a.get("user_trained"),
            )
            rec.run_id = str(a["run_id"]) or None
            return rec
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # unreadable, truncated or foreign: the checkpoint serves instead

    def save_index(self, path: str, checkpoint: str) -> None:
        """Write the tables to ``path`` (atomically), tied to the ``checkpoint`` file they came from."""
        from recsys_torch.io import atomic_npz

        a: dict[str, np.ndarray] = {
            "format": np.array(INDEX_FORMAT), "checkpoint": _checkpoint_stamp(checkpoint),
            "global_bias": np.array(self.global_bias), "item_bias": self.item_bias, "user_bias": self.user_bias,
            "user_scorable": self.user_scorable, "candidates": self.candidates,
            "implicit": np.array(self.implicit), "threshold": np.array(math.nan if self.threshold is None else self.threshold),
            "loss": np.array(self.loss), "task_config": np.array(json.dumps(self.task_config)),
            "regs": np.array([self.reg, self.reg_bias, self.reg_exponent]),
            "needs_model": np.array(self.needs_model), "scores_unknown_users": np.array(self.scores_unknown_users),
            "model_name": np.array(self.model_name), "run_id": np.array(self.run_id or ""),
        }
        for name, strings in (("user_ids", self.user_ids), ("item_ids", self.item_ids), ("titles", self.titles),
                              ("user_vocab", self.user_vocab), ("user_dense", self.user_dense)):
            if strings is not None:
                a[name], a[f"{name}_offsets"] = _pack(strings)
        for name, table in (("item_vectors", self.item_vectors), ("user_vectors", self.user_vectors)):
            if table is not None:
                a[name] = table
        if self.rating_scale is not None:
            a["rating_scale"] = np.array(self.rating_scale)
        if self.new_user_item_bias is not None:
            a["new_user_item_bias"], a["user_trained"] = self.new_user_item_bias, self.user_trained
        if self._train is not None:
            a["train_indptr"], a["train_items"], a["train_ratings"] = self._train
        if self._seen is not None:
            a["seen_indptr"], a["seen_items"] = self._seen
        atomic_npz(path, a)

    @property
    def model(self):
        """The trained model, rebuilt from the checkpoint on first use (torch is imported then)."""
        if self._model is None:
            if self._checkpoint is None:
                raise CheckpointError("this recommender has no checkpoint to rebuild its model from")
            self._model = type(self)._from_checkpoint(self._checkpoint)._model
        return self._model

    @property
    def task(self):
        """The run's task (its fold-in loss), rebuilt from its config on first use."""
        if self._task is None:
            from recsys_torch.checkpoint import task_from_config

            self._task = task_from_config(self.task_config)
        return self._task


    # ---- ids ----------------------------------------------------------------------------------
    def user_code(self, user) -> int:
        if self._user_index is None:
            self._user_index = {u: c for c, u in enumerate(self.user_ids)}
        code = self._user_index.get(str(user).strip())
        if code is None:
            raise UnknownIdError(f"unknown user {str(user)!r}: not among the {len(self.user_ids)} users of this run "
                                 "(give ratings=ITEM:R,... to recommend for a new user)")
        return code

    def item_code(self, item) -> int:
        if self._item_index is None:
            self._item_index = {i: c for c, i in enumerate(self.item_ids)}
        code = self._item_index.get(str(item).strip())
        if code is None:
            raise UnknownIdError(f"unknown item {str(item)!r}: not among the {len(self.item_ids)} items of this run")
        return code

    def title(self, code: int) -> str:
        return self.titles[code]

    # ---- the user's history ---------------------------------------------------------------------
    def history(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """Item codes and ratings of a user's training rows."""
        if self._train is None:
            raise CheckpointError(NO_TRAINING_ROWS)
        indptr, items, ratings = self._train
        return items[indptr[code]:indptr[code + 1]], ratings[indptr[code]:indptr[code + 1]]

    def rated(self, code: int) -> np.ndarray:
        """Every item the run knows the user rated: the training rows and, for ranking runs, the
        ratings below the positive threshold (no training row, but the user has seen the item)."""
        items = self.history(code)[0]
        if self._seen is None:
            return items
        indptr, seen = self._seen
        return np.concatenate([items, seen[indptr[code]:indptr[code + 1]]])

    def rated_lists(self) -> tuple[np.ndarray, np.ndarray] | None:
        """What :meth:`rated` gives every user of the run, as CSR: ``(indptr [n_users + 1] int64, item
        codes int32)``; None when the run saved no training rows."""
        if self._train is None:
            return None
        indptr, items, _ = self._train
        if self._seen is None:  # the training rows are already grouped by user
            return np.asarray(indptr, dtype=np.int64).copy(), np.asarray(items, dtype=np.int32)
        n_users = len(self.user_ids)
        rows, codes = self._rated_block(np.arange(n_users, dtype=np.int64))
        order = np.argsort(rows, kind="stable")  # each user's training rows, then their other rated items
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
        return indptr, codes[order].astype(np.int32)

    def _liked(self, items: np.ndarray, ratings: np.ndarray, trained: bool = False) -> np.ndarray:
        """The items a user rated highly. Ranking runs: the positives (a ranking run's training rows
        are all positives, stored with rating 1). Rating runs: the ratings at or above the user's own
        mean and above the middle of the rating scale."""
        if len(items) == 0:
            return items
        if self.implicit:
            return items if trained or self.threshold is None else items[ratings >= self.threshold]
        middle = sum(self.rating_scale) / 2 if self.rating_scale else float(ratings.min())
        return items[(ratings >= ratings.mean()) & (ratings > middle)]

    # ---- top-N --------------------------------------------------------------------------------
    def _columns(self) -> np.ndarray:
        if self._item_columns is None:
            self._item_columns = np.ascontiguousarray(self.item_vectors.astype(np.float32, copy=False).T)
        return self._item_columns

    def _item_biases(self, new: bool) -> np.ndarray:
        """The item biases a user is scored with: a user training never saw (``new``) gets the
        new-user ones where the model has them."""
        return self.new_user_item_bias if new and self.new_user_item_bias is not None else self.item_bias

    def is_new(self, code: int) -> bool:
        """Whether the run's user ``code`` is scored as a user training never saw (from features)."""
        return not bool(self.user_trained[code])

    def scores_for(self, vector: np.ndarray | None, bias: float, items: np.ndarray | None = None,
                   new: bool = False) -> np.ndarray:
        """Scores of a user (vector and bias) against every item (or the item codes ``items``);
        ``new``: a user training never saw (a folded-in one, or one of the run scored from features)."""
        item_bias = self._item_biases(new).astype(np.float32, copy=False)
        scores = np.float32(self.global_bias) + np.float32(bias) + (item_bias if items is None else item_bias[items])
        if vector is not None and self.item_vectors is not None:
            columns = self._columns() if items is None else self._columns()[:, items]
            scores = scores + _dot_rows(columns, np.asarray(vector, dtype=np.float32))
        return scores

    def score_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The scores of (user code, item code) pairs of the run: float32, bit for bit what
        :meth:`recommend` gives the same pair."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        item_bias = self.item_bias[items].astype(np.float32, copy=False)
        if self.new_user_item_bias is not None:
            item_bias = np.where(self.user_trained[users], item_bias,
                                 self.new_user_item_bias[items].astype(np.float32, copy=False))
        scores = ((np.float32(self.global_bias) + self.user_bias[users].astype(np.float32, copy=False))
                  + item_bias)
        if self.user_vectors is not None and self.item_vectors is not None:
            if self._user_columns is None:
                self._user_columns = np.ascontiguousarray(self.user_vectors.astype(np.float32, copy=False).T)
            scores = scores + _dot_rows(np.take(self._columns(), items, axis=1),
                                        np.take(self._user_columns, users, axis=1))
        return scores

    def _scorable(self, user) -> int:
        code = self.user_code(user)
        if not bool(self.user_scorable[code]):
            raise UnknownIdError(f"user {str(user)!r} has no training data in this run, so no trained vector "
                                 "(give their ratings=ITEM:R,... to fold them in)")
        return code

    def recommend(self, user, k: int = 10, exclude_rated: bool = True,
                  index: ItemIndex | None = None) -> list[Recommendation]:
        """The top ``k`` items for a user of the run, best first, each with a reason. ``index``: take
        the candidates from a search index (:mod:`recsys_torch.ann`) instead of scoring every item."""
        code = self._scorable(user)
        if self._train is not None or exclude_rated:
            items, ratings = self.history(code)  # raises when the run saved no training rows
        else:
            items, ratings = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        vector = None if self.user_vectors is None else self.user_vectors[code]
        bias = float(self.user_bias[code])
        exclude = self.rated(code) if exclude_rated else None
        liked = self._liked(items, ratings, trained=True)
        new = self.is_new(code)
        if index is None:
            return self._top(self.scores_for(vector, bias, new=new), k, exclude, liked, f"user {user}")
        n_exclude = 0 if exclude is None else len(exclude)
        query = np.zeros((1, 0), dtype=np.float32) if vector is None else np.asarray(vector, dtype=np.float32)[None]
        hits = index.user_hits(query, min(k + n_exclude, int(self.candidates.sum())), np.array([new]))[0]
        hits = np.unique(hits[hits >= 0])
        return self._top(self.scores_for(vector, bias, hits, new), k, exclude, liked, f"user {user}", pool=hits)

    def recommend_for(self, vec: UserVector, k: int = 10, exclude_rated: bool = True) -> list[Recommendation]:
        """The top ``k`` items for a folded-in user (see :meth:`fold_in`)."""
        return self._top(self.scores_for(vec.vector, vec.bias, new=True), k, vec.rated if exclude_rated else None,
                         vec.liked, "this user")

    def _check_k(self, k, available: int, who: str, n_excluded: int) -> int:
        k = self._check_catalog_k(k)
        if k > available:
            n_catalog = int(self.candidates.sum())
            raise ConfigError(f"k={k} but only {available} items are left for {who} "
                              f"({n_catalog} in the catalog, {n_excluded} excluded)")
        return k

    def _check_catalog_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        n_catalog = int(self.candidates.sum())
        if k > n_catalog:
            raise ConfigError(f"k={k} is more than the {n_catalog} items this run can recommend")
        return int(k)

    def _top(self, scores: np.ndarray, k: int, exclude: np.ndarray | None, liked: np.ndarray,
             who: str, pool: np.ndarray | None = None) -> list[Recommendation]:
        """The best ``k`` allowed items; ``scores`` of every item, or of the item codes ``pool`` only
        (sorted, unique: the candidates an index found)."""
        allowed = self.candidates.copy()
        n_excluded = 0
        if exclude is not None and len(exclude):
            n_excluded = int(allowed[exclude].sum())
            allowed[exclude] = False
        k = self._check_k(k, int(allowed.sum()), who, n_excluded)
        codes = np.arange(len(allowed)) if pool is None else pool
        ok = allowed[codes]
        bad = ok & ~np.isfinite(scores)
        if bad.any():
            raise CheckpointError(f"this run's model gives {int(bad.sum())} item(s) a score that is not a finite "
                                  f"number for {who}: it diverged; train it again (e.g. with a lower trainer.lr)")
        masked = np.where(ok, scores.astype(np.float64), -math.inf)
        # a stable sort: equal scores go to the lower item code, whatever the platform
        order = np.argsort(-masked, kind="stable")[:k]
        order = order[ok[order]]  # an index may have found fewer than k allowed items
        top = codes[order]
        reasons = self._reasons(top, liked)
        return [Recommendation(self.item_ids[c], self.titles[c], float(scores[j]), r)
                for c, j, r in zip(top.tolist(), order.tolist(), reasons)]

    def _reasons(self, top: np.ndarray, liked: np.ndarray) -> list[str | None]:
        """Per recommended item, the user's liked items closest to it (cosine of item vectors)."""
        if self.item_vectors is None:
            return ["popular with everyone (this model is not personalized)"] * len(top)
        if len(liked) == 0:
            return [None] * len(top)
        sim = _normalize(self.item_vectors[top]) @ _normalize(self.item_vectors[liked]).T  # [k, n_liked]
        n = min(N_REASONS, len(liked))
        order = np.argsort(-sim, axis=1, kind="stable")[:, :n]
        out = []
        for row, idx in enumerate(order.tolist()):
            names = [self.titles[int(liked[j])] for j in idx if float(sim[row, j]) > 0]
            out.append("because you liked " + " and ".join(names) if names else None)
        return out

    # ---- top-N for every user -------------------------------------------------------------------
    def recommend_all(self, k: int = 10, chunk: int = 1024, exclude_rated: bool = True,
                      index: ItemIndex | None = None) -> Iterator[TopN]:
        """The top ``k`` items of every user of the run, a block of ``chunk`` users at a time (in user
        code order), as :class:`TopN` rows: for each user exactly what :meth:`recommend` gives (items,
        order, ties and scores), without the reasons. Users that cannot be scored are skipped and
        counted; memory stays at a few ``chunk x n_items`` score blocks whatever the number of users.

        Exact search scores each block with one matrix product, keeps per user every item within the
        product's rounding error of the k-th best score (a partition, then a comparison), and scores
        those few again with :meth:`score_pairs` to rank them, so the result does not depend on BLAS.
        ``index``: take each user's candidates from a search index instead (``k`` plus the user's
        rated count of them), then score and rank them the same way."""
        k = self._check_catalog_k(k)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
        if exclude_rated and self._train is None:
            raise CheckpointError(NO_TRAINING_ROWS)
        cand = np.flatnonzero(self.candidates)
        position = np.full(len(self.item_ids), -1, dtype=np.int64)
        position[cand] = np.arange(len(cand))
        exact = None if index is not None else self._exact_setup(cand)
        rows_per_block = max(1, min(int(chunk), (1 << 26) // max(len(cand), 1)))  # <= 256 MB of scores
        n_users = len(self.user_ids)
        for start in range(0, n_users, rows_per_block):
            codes = np.arange(start, min(start + rows_per_block, n_users), dtype=np.int64)
            users = codes[self.user_scorable[codes].astype(bool)]
            rated = self._rated_block(users) if exclude_rated else None
            if len(users) == 0:
                pairs = (np.zeros(0, np.int64),) * 2
            elif index is None:
                pairs = self._exact_candidates(users, k, rated, position, cand, exact)
            else:
                pairs = self._index_candidates(users, k, rated, index, len(cand))
            rows, items = pairs
            rows, ranks, items, scores = _best_per_row(rows, items, self.score_pairs(users[rows], items), k)
            short = int((np.bincount(rows, minlength=len(users)) < k).sum())
            yield TopN(users[rows], ranks, items, scores, len(codes), len(codes) - len(users), short)

    def _rated_block(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`rated` gives each of ``users``: ``(position in users, item code)`` per entry."""
        indptr, items, _ = self._train
        rows, codes = _rows_of(indptr, items, users)
        if self._seen is not None:
            more_rows, more = _rows_of(self._seen[0], self._seen[1], users)
            rows, codes = np.concatenate([rows, more_rows]), np.concatenate([codes, more])
        return rows, codes

    def _exact_setup(self, cand: np.ndarray) -> dict:
        """The candidate items' tables and the bound on how far a BLAS score may be from
        :meth:`score_pairs` (summation order and rounding: a few float32 ulps of the magnitudes)."""
        bias = self.item_bias[cand].astype(np.float32)
        new_bias = None if self.new_user_item_bias is None else self.new_user_item_bias[cand].astype(np.float32)
        vectors = None
        tables = [bias, self.user_bias, np.array([self.global_bias])] + ([] if new_bias is None else [new_bias])
        if self.item_vectors is not None and self.user_vectors is not None:
            vectors = np.ascontiguousarray(self.item_vectors[cand], dtype=np.float32)
            tables += [vectors, self.user_vectors]
            # [q_i, b_i, 1]: one product with [p_u, 1, mu + b_u] adds the biases too; with new-user
            # biases [q_i, b_i, b'_i, 1] and [p_u, trained, not trained, mu + b_u]
            biases = [bias[:, None]] + ([] if new_bias is None else [new_bias[:, None]])
            folded = np.hstack([vectors, *biases, np.ones((len(cand), 1), dtype=np.float32)])
        finite = all(bool(np.isfinite(t).all()) for t in tables)
        with np.errstate(over="ignore", invalid="ignore"):
            q_max = float(np.linalg.norm(vectors, axis=1).max()) if vectors is not None and len(cand) else 0.0
            u_norms = (np.linalg.norm(self.user_vectors.astype(np.float64), axis=1) if vectors is not None
                       else np.zeros(len(self.user_ids)))
            b_max = max((float(np.abs(b).max()) for b in (bias, new_bias) if b is not None and len(b)), default=0.0)
            largest = float(u_norms.max(initial=0.0)) * q_max + abs(self.global_bias) \
                + float(np.abs(self.user_bias).max(initial=0.0)) + b_max
        # every score is finite when the tables are and no sum can come near float32's overflow
        finite = finite and largest < 1e37
        d = 0 if vectors is None else folded.shape[1]
        return {"vectors": None if vectors is None else folded, "bias": bias, "new_bias": new_bias, "q_max": q_max,
                "u_norms": u_norms,
                "b_max": b_max,
                "ulp": 6.0 * (d + 4) * 2.0 ** -24, "finite": finite}

    def _exact_candidates(self, users, k, rated, position, cand, setup) -> tuple[np.ndarray, np.ndarray]:
        """``(position in users, item code)`` of every item that may be among a user's top ``k``."""
        n_c = len(cand)
        base = np.float32(self.global_bias) + self.user_bias[users].astype(np.float32)
        trained = self.user_trained[users]
        if setup["vectors"] is None:  # bias-only: these sums are exactly score_pairs'
            item_bias = setup["bias"][None, :] if setup["new_bias"] is None else \
                np.where(trained[:, None], setup["bias"][None, :], setup["new_bias"][None, :])
            scores = np.broadcast_to(base[:, None], (len(users), n_c)) + item_bias
            margin = np.zeros(len(users))
        else:
            ones = np.ones((len(users), 1), dtype=np.float32)
            which = [ones] if setup["new_bias"] is None else \
                [trained[:, None].astype(np.float32), (~trained)[:, None].astype(np.float32)]
            scores = np.hstack([self.user_vectors[users].astype(np.float32, copy=False), *which, base[:, None]]) \
                @ setup["vectors"].T
            margin = setup["ulp"] * (setup["u_norms"][users] * setup["q_max"] + np.abs(base) + setup["b_max"])
        if rated is not None:
            rows, items = rated
            cols = position[items]
            rows, cols = rows[cols >= 0], cols[cols >= 0]
        if not setup["finite"]:
            ok = np.isfinite(scores)
            if rated is not None:
                ok[rows, cols] = True
            if not ok.all():
                row = int(np.flatnonzero(~ok.all(axis=1))[0])
                raise CheckpointError(f"this run's model gives {int((~ok[row]).sum())} item(s) a score that is not a "
                                      f"finite number for user {self.user_ids[int(users[row])]}: it diverged; train it "
                                      "again (e.g. with a lower trainer.lr)")
        if rated is not None:
            scores[rows, cols] = -np.inf
        kth = np.partition(scores, n_c - k, axis=1)[:, n_c - k].astype(np.float64)
        # item i can be in the exact top k only if its BLAS score is within two errors of the k-th
        # best BLAS score (the k items above it score at least kth - error exactly)
        wanted = kth - 2.0 * margin
        threshold = wanted.astype(np.float32)
        threshold = np.where(threshold > wanted, np.nextafter(threshold, np.float32(-np.inf)), threshold)
        threshold = np.maximum(threshold, np.finfo(np.float32).min)  # never an excluded (-inf) item
        flat = np.flatnonzero(scores >= threshold[:, None].astype(np.float32))
        rows, cols = np.divmod(flat, n_c)
        return rows, cand[cols]

    def _index_candidates(self, users, k, rated, index: ItemIndex, n_c: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's ``k`` plus their rated count of index hits, without their rated items."""
        n_rated = np.zeros(len(users), dtype=np.int64) if rated is None else np.bincount(rated[0], minlength=len(users))
        need = np.minimum(k + n_rated, n_c)
        fetch = np.minimum(1 << np.ceil(np.log2(need)).astype(np.int64), n_c)  # few distinct search sizes
        all_rows, all_items = [], []
        for n in np.unique(fetch).tolist():
            rows = np.flatnonzero(fetch == n)
            vectors = (np.zeros((len(rows), 0), dtype=np.float32) if self.user_vectors is None
                       else self.user_vectors[users[rows]].astype(np.float32))
            new = ~self.user_trained[users[rows]].astype(bool) if self.new_user_item_bias is not None else None
            hits = np.asarray(index.user_hits(vectors, int(n), new), dtype=np.int64)
            all_rows.append(np.repeat(rows, hits.shape[1]))
            all_items.append(hits.reshape(-1))
        rows, items = np.concatenate(all_rows), np.concatenate(all_items)
        keep = items >= 0
        keep[keep] = self.candidates[items[keep]]
        rows, items = rows[keep], items[keep]
        n_items = len(self.item_ids)
        key = rows * n_items + items
        key, first = np.unique(key, return_index=True)  # an index may repeat a hit
        rows, items = rows[first], items[first]
        if rated is not None:
            drop = np.isin(key, rated[0] * n_items + rated[1])
            rows, items = rows[~drop], items[~drop]
        return rows, items

    # ---- similar items ------------------------------------------------------------------------
    def similar_items(self, item, k: int = 10, index: ItemIndex | None = None) -> list[Recommendation]:
        """The ``k`` items whose vectors have the highest cosine with the item's vector (``index``:
        among the candidates a search index finds)."""
        code = self.item_code(item)
        if self.item_vectors is None:
            raise CheckpointError(f"this run's model ({self.model_name}) has no item vectors, so it "
                                  "cannot find similar items: use a run of model=mf, content or hybrid")
        if not bool(self.candidates[code]):
            raise UnknownIdError(f"item {str(item)!r} ({self.titles[code]}) has no ratings in this run's training "
                                 "data, so it has no trained vector")
        if index is None:
            table = _normalize(self.item_vectors)
            return self._top(table @ table[code], k, np.array([code]), np.zeros(0, dtype=np.int64), f"item {item}")
        hits = index.similar_hits(np.array([code]), min(k + 1, int(self.candidates.sum())))[0]
        hits = np.unique(hits[hits >= 0])
        sim = _normalize(self.item_vectors[hits]) @ _normalize(self.item_vectors[code:code + 1])[0]
        return self._top(sim, k, np.array([code]), np.zeros(0, dtype=np.int64), f"item {item}", pool=hits)

    # ---- fold-in ------------------------------------------------------------------------------
    def parse_ratings(self, ratings) -> tuple[np.ndarray, np.ndarray]:
        """``[(raw item, rating), ...]`` (or a dict) -> item codes and ratings; a repeated item keeps
        its last rating."""
        pairs = list(ratings.items()) if isinstance(ratings, dict) else list(ratings)
        by_code: dict[int, float] = {}
        for item, value in pairs:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"the rating of item {item!r} is not a finite number: {value}")
            if self.rating_scale and not self.rating_scale[0] <= value <= self.rating_scale[1]:
                raise ConfigError(f"the rating {value:g} of item {item!r} is outside this run's rating scale "
                                  f"[{self.rating_scale[0]:g}, {self.rating_scale[1]:g}]")
            by_code[self.item_code(item)] = value
        return np.array(list(by_code), dtype=np.int64), np.array(list(by_code.values()), dtype=np.float32)

    def fold_in(self, ratings=(), user_features=None, steps: int = 100) -> UserVector:
        """Fit a new user's vector and bias against the frozen item side.

        ``ratings``: ``(raw item, rating)`` pairs. Runs trained on ratings solve the ridge regression
        of the training objective in closed form; ranking runs minimize their loss (Gramian, softmax or
        BPR) against every item with L-BFGS (``steps`` iterations at most); under the Gramian loss the
        ratings below the threshold count as explicit negatives, as in training. The L2 weight is the model's own
        (``reg`` times the user's count to the power ``1 - reg_exponent``, as in training).
        ``user_features``: ``{"column": value or [values]}`` for models with a user feature tower:
        they give the starting vector that the ratings then correct.
        """
        codes, values = self.parse_ratings(ratings)
        prior_vec, prior_bias = self._prior(codes, user_features)
        if len(codes) == 0:
            if user_features is None:
                raise ConfigError("give at least one rating (ratings=ITEM:R,...) or user features to fold in a new user")
            return UserVector(prior_vec, prior_bias, codes, codes)
        # an item training never saw has no trained vector: it tells nothing about the user, and is
        # only excluded from the recommendations
        known = self.candidates[codes]
        if not bool(known.any()):
            vec, bias = prior_vec, prior_bias
        elif self.implicit:
            vec, bias = self._fit_ranking(codes[known], values[known], prior_vec, prior_bias, steps)
        else:
            vec, bias = self._fit_ratings(codes[known], values[known], prior_vec, prior_bias)
        return UserVector(vec, bias, codes, self._liked(codes[known], values[known]))

    def _reg(self, n: int) -> tuple[float, float]:
        scale = max(n, 1) ** (1.0 - self.reg_exponent)
        return self.reg * scale + 1e-6, self.reg_bias * scale + 1e-6  # jitter: solvable with reg=0 and few ratings

    def _fit_ratings(self, codes, values, prior_vec, prior_bias) -> tuple[np.ndarray | None, float]:
        """Ridge regression of ``r - mu - b_i`` on ``[q_i, 1]``, shrunk towards the prior."""
        item_bias = self._item_biases(True)[codes].astype(np.float64)  # a folded-in user is a new one
        resid = values.astype(np.float64) - self.global_bias - item_bias - prior_bias
        lam_vec, lam_bias = self._reg(len(codes))
        if self.item_vectors is None:
            return None, prior_bias + float(resid.sum() / (len(codes) + lam_bias))
        q = self.item_vectors[codes].astype(np.float64)
        resid = resid - q @ prior_vec.astype(np.float64)
        x = np.concatenate([q, np.ones((len(codes), 1))], axis=1)
        penalty = np.full(x.shape[1], lam_vec)
        penalty[-1] = lam_bias
        w = np.linalg.solve(x.T @ x + np.diag(penalty), x.T @ resid)
        return (prior_vec.astype(np.float64) + w[:-1]).astype(np.float32), prior_bias + float(w[-1])

    def _fit_ranking(self, codes, values, prior_vec, prior_bias, steps) -> tuple[np.ndarray | None, float]:
        """Minimize the run's ranking loss of the user's positives against every candidate item."""
        positives = codes if self.threshold is None else codes[values >= self.threshold]
        if self.item_vectors is None or len(positives) == 0:
            return prior_vec, prior_bias  # a bias does not change one user's ranking
        import torch

        cand = np.flatnonzero(self.candidates)
        q = torch.from_numpy(self.item_vectors[cand].astype(np.float64))
        b = torch.from_numpy(self._item_biases(True)[cand].astype(np.float64))
        position = np.full(len(self.item_ids), -1, dtype=np.int64)
        position[cand] = np.arange(len(cand))
        pos = torch.from_numpy(position[positives])
        # ratings below the threshold: explicit negatives, as training had them (the Gramian loss)
        neg = None if self.threshold is None else torch.from_numpy(position[codes[values < self.threshold]])
        task = self.task
        lam = task.fold_in_penalty(len(pos), len(cand), self.reg, self.reg_exponent)
        start = torch.from_numpy(prior_vec.astype(np.float64))
        delta = torch.zeros_like(start, requires_grad=True)
        opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = task.fold_in_loss(b + q @ (start + delta), pos, neg) + lam * delta.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return (start + delta.detach()).float().numpy(), prior_bias

    def _prior(self, codes: np.ndarray, user_features) -> tuple[np.ndarray, float]:
        """Where a new user starts: the model's :meth:`new_user` (the user feature tower's output for
        the given features, the SVD++ term of the rated items, in models with them); zero otherwise."""
        d = self.item_vectors.shape[1] if self.item_vectors is not None else 0
        if user_features is not None and (not self.scores_unknown_users or self.user_vocab is None):
            off = (" (this run's data has user features, but its hybrid was trained with "
                   "model.use_user_features=false, as task=ranking's preset does)"
                   if self.model_name == "HybridModel" and self.user_vocab is not None else "")
            raise CheckpointError(f"this run's model ({self.model_name}) has no user feature tower: "
                                  "recommending from user features needs model=content or hybrid trained on data "
                                  f"with user features{off}")
        if not self.needs_model or (user_features is None and not (len(codes) and d)):
            return np.zeros(d, dtype=np.float32), 0.0
        import torch

        bag = None if user_features is None else tuple(map(torch.from_numpy, self._feature_bag(user_features)))
        side = self.model.new_user(torch.from_numpy(codes), bag)
        vec = np.zeros(d, dtype=np.float32) if side.vector is None else side.vector.float().cpu().numpy()
        return vec.astype(np.float32), float(side.bias)

    def _feature_bag(self, user_features: dict) -> tuple[np.ndarray, np.ndarray]:
        vocab = {name: i for i, name in enumerate(self.user_vocab)}
        columns = sorted({name.split("=", 1)[0] for name in self.user_vocab[1:]})
        ids, weights = [], []
        for column, value in user_features.items():
            if column in self.user_dense:
                raise ConfigError(f"user feature {column!r} is numeric, and the run does not keep its scaling: "
                                  "give only categorical user features")
            if column not in columns:
                raise UnknownIdError(f"unknown user feature {column!r} (this run knows: {', '.join(columns)})")
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                fid = vocab.get(f"{column}={v}")
                if fid is None:
                    known = [n.split("=", 1)[1] for n in self.user_vocab if n.startswith(column + "=")]
                    raise UnknownIdError(f"unknown value {v!r} for user feature {column!r} "
                                         f"(known: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''})")
                ids.append(fid)
                weights.append(1.0 / len(values))  # a column sums to one, as when the run was built
        if not ids:
            ids, weights = [0], [0.0]
        return np.array([ids], dtype=np.int64), np.array([weights], dtype=np.float32)


def write_index(checkpoint: str, state: dict, model, task) -> None:
    """``recommend.npz`` beside ``checkpoint``, from the model and task of the run and the checkpoint
    ``state`` that :func:`recsys_torch.checkpoint.save_checkpoint` wrote."""
    rec = Recommender.from_state(state, model, task)
    rec.run_id = (state.get("metrics") or {}).get("run_id")
    rec.save_index(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), INDEX_NAME), checkpoint)
