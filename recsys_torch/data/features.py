"""`Features`: per-entity feature bags, ready for ``nn.EmbeddingBag``.

Each entity (user or item code) owns a padded row of feature ids and weights: ``index[e, :]`` and
``weight[e, :]`` (padding id 0, weight 0). A 2-D ``index`` batch goes straight into
``nn.EmbeddingBag(mode="sum", padding_idx=0)`` with ``per_sample_weights``; gathering a batch is one
``index_select``, with no ragged offsets to rebuild per batch. Numeric columns live in ``dense``
(standardized; missing values are 0, i.e. the mean).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np
import torch

from recsys_torch.errors import DataError

log = logging.getLogger(__name__)

PAD = "<pad>"
FLOAT32_MAX = float(np.finfo(np.float32).max)  # dense features are float32


@dataclass
class Features:
    index: torch.Tensor  # int64 [n_entities, max_len], 0 = padding
    weight: torch.Tensor  # float32 [n_entities, max_len]
    dense: torch.Tensor  # float32 [n_entities, n_dense]
    vocab: list[str]  # feature id -> "column=value"; vocab[0] is the padding entry
    dense_names: list[str]
    present: torch.Tensor  # bool [n_entities]: the entity had a feature row

    @property
    def n_entities(self) -> int:
        return self.index.shape[0]

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    @property
    def n_dense(self) -> int:
        return self.dense.shape[1]

    def to(self, device) -> "Features":
        return Features(
            self.index.to(device), self.weight.to(device), self.dense.to(device),
            self.vocab, self.dense_names, self.present.to(device),
        )

    def names_of(self, entity: int) -> list[str]:
        """Readable feature names of one entity (for explanations)."""
        ids = self.index[entity]
        return [self.vocab[i] for i in ids.tolist() if i != 0]

    def state(self) -> dict:
        """A ``torch.load(weights_only=True)``-safe dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "Features":
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def parse_spec(kind: str, column: str) -> tuple[str, str | None]:
    kind = str(kind)
    if kind in ("categorical", "numeric"):
        return kind, None
    if kind.startswith("multi:") and len(kind) > len("multi:"):
        return "multi", kind[len("multi:"):]
    raise DataError(
        f"feature column {column!r}: unknown kind {kind!r} "
        "(use 'categorical', 'numeric' or 'multi:SEP', e.g. 'multi:|')"
    )


def id_strings(values: pd.Series) -> pd.Series:
    """Raw ids as the strings ``encode`` keys entities by. A csv column of integer ids with an empty
    cell is read as floats, and "10.0" must still find the ratings' "10"."""
    import pandas as pd  # here, not at the top: loading a checkpoint should not import pandas

    if pd.api.types.is_float_dtype(values):
        whole = values.dropna()
        if (whole == whole.round()).all():
            values = values.astype("Int64")
    return values.astype(str)


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def numeric_column(values: pd.Series, column: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A numeric feature column as float64 with NaN where a cell is missing (empty, or a missing
    value such as pandas' NA), and that mask. Any other cell must be a number that is finite as a
    float32 (dense features are float32): text, ``inf`` or ``1e39`` is a DataError naming ``where``,
    the column, the row and the value."""
    import pandas as pd

    text = values.astype(object).where(values.notna())
    text = text.map(lambda v: v.strip() if isinstance(v, str) else v)
    missing = (text.isna() | text.eq("")).to_numpy()
    try:
        x = pd.to_numeric(text.mask(missing), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):  # cells that are neither text nor numbers (lists from a parquet file)
        x = np.array([_float_or_nan(v) for v in text.mask(missing)], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~missing & ~(np.abs(x) <= FLOAT32_MAX)  # NaN (not a number), inf, beyond float32
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = values.iloc[first]
        shown = repr(value) if isinstance(value, str) else str(value)
        raise DataError(
            f"{where}: numeric feature column {column!r} has {int(bad.sum())} cell(s) that are not finite numbers "
            f"(first at row {values.index[first]}: {shown})"
        )
    return x, missing


def build_features(
    table: pd.DataFrame,
    id_column: str,
    spec: dict[str, str],
    codes: dict[str, int],
    n_entities: int,
    what: str = "item",
    where: str | None = None,
) -> tuple[Features, int]:
    """Encode a feature table into :class:`Features` over ``n_entities`` codes.

    ``codes`` maps a raw id (as a string) to its code. Rows whose id is not in ``codes`` are dropped
    and counted (the second return value). Entities without a row get an empty bag. ``where`` names
    the table in messages (default ``"<what> feature table"``).
    """
    import pandas as pd

    where = where or f"{what} feature table"
    if id_column not in table.columns:
        raise DataError(f"{where} has no id column {id_column!r} (columns: {list(table.columns)})")
    missing = [c for c in spec if c not in table.columns]
    if missing:
        raise DataError(f"{where} has no column(s) {missing} (columns: {list(table.columns)})")
    kinds = {column: parse_spec(kind, column) for column, kind in spec.items()}
    numbers = {column: numeric_column(table[column], column, where)  # every row, before any is dropped
               for column, (kind, _) in kinds.items() if kind == "numeric"}
    code = id_strings(table[id_column]).map(codes)
    known = code.notna().to_numpy()
    n_dropped = int((~known).sum())
    code = code[known].to_numpy(dtype=np.int64)
    last = ~pd.Series(code).duplicated(keep="last").to_numpy()  # a repeated row: the last one wins
    table, code = table.loc[known].loc[last], code[last]

    vocab = [PAD]
    ent_parts, fid_parts, w_parts = [], [], []
    dense_cols, dense_names = [], []
    kept = np.flatnonzero(known)[last]
    for column, (kind, sep) in kinds.items():
        values = table[column]
        if kind == "numeric":
            x, empty = (a[kept] for a in numbers[column])
            if empty.any():
                log.info("%s: numeric column %r: %d of %d cell(s) are empty; they count as the column's mean",
                         where, column, int(empty.sum()), len(empty))
            mu = np.nanmean(x) if np.isfinite(x).any() else 0.0
            sd = np.nanstd(x) if np.isfinite(x).any() else 1.0
            col = np.zeros(n_entities, dtype=np.float32)
            col[code] = np.nan_to_num((x - mu) / (sd if sd > 0 else 1.0), nan=0.0)
            dense_cols.append(col)
            dense_names.append(column)
            continue
        if kind == "multi":
            exploded = values.fillna("").astype(str).str.split(sep, regex=False)
            lengths = exploded.str.len().to_numpy()
            tokens = pd.Series(np.concatenate(exploded.to_numpy()) if len(exploded) else [], dtype=object)
            owner = np.repeat(code, lengths)
            keep = tokens.str.strip().ne("").to_numpy()
            tokens, owner = tokens[keep].str.strip(), owner[keep]
            counts = np.bincount(owner, minlength=n_entities)
            weights = 1.0 / counts[owner]  # a column sums to one per entity
        else:
            valid = values.notna().to_numpy()
            tokens = values[valid].astype(str)
            owner = code[valid]
            weights = np.ones(len(owner))
        uniq, inverse = np.unique(tokens.to_numpy().astype(str), return_inverse=True)
        offset = len(vocab)
        vocab.extend(f"{column}={u}" for u in uniq)
        ent_parts.append(owner)
        fid_parts.append(inverse.reshape(-1) + offset)
        w_parts.append(weights)

    if ent_parts:
        ent = np.concatenate(ent_parts)
        fid = np.concatenate(fid_parts)
        w = np.concatenate(w_parts)
        order = np.argsort(ent, kind="stable")
        ent, fid, w = ent[order], fid[order], w[order]
        counts = np.bincount(ent, minlength=n_entities)
        max_len = max(int(counts.max()) if len(counts) else 0, 1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(ent)) - starts[ent]
        index = np.zeros((n_entities, max_len), dtype=np.int64)
        weight = np.zeros((n_entities, max_len), dtype=np.float32)
        index[ent, pos] = fid
        weight[ent, pos] = w
    else:
        index = np.zeros((n_entities, 1), dtype=np.int64)
        weight = np.zeros((n_entities, 1), dtype=np.float32)
    dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n_entities, 0), dtype=np.float32)
    present = np.zeros(n_entities, dtype=bool)
    present[code] = True
    features = Features(
        index=torch.from_numpy(index),
        weight=torch.from_numpy(weight),
        dense=torch.from_numpy(dense),
        vocab=vocab,
        dense_names=dense_names,
        present=torch.from_numpy(present),
    )
    return features, n_dropped
