"""MovieLens: readers for the GroupLens file formats (the download and cache live in
:mod:`recsys_torch.data.fetch`).

Readers (each returns a :class:`RawDataset` with ratings columns ``user``, ``item`` (int64 ids as in
the files), ``rating`` (float64) and ``timestamp`` (int64)):

* :func:`read_ml100k` -- ``u.data`` / ``u.item`` / ``u.user`` (ml-100k),
* :func:`read_ml1m` / :func:`read_ml10m` -- ``ratings.dat`` / ``movies.dat`` / ``users.dat``,
* :func:`read_ml_csv` -- ``ratings.csv`` / ``movies.csv`` (ml-20m, ml-25m, ml-latest, ml-latest-small),
* :func:`read_recbole_ml100k` -- RecBole's atomic ``ml-100k.inter`` / ``.item`` / ``.user``.

Item features, where the source has them: ``genres`` (``"multi:|"``), ``year_bucket`` (decade of
release, ``"unknown"`` when absent) and ``title`` (display only). User features: ``age_bucket``,
``gender`` and ``occupation`` (all categorical). Every user-caused problem raises
:class:`DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_torch.data import fetch
from recsys_torch.data.fetch import one_line
from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)

#: ml-1m ``users.dat`` occupation codes (from the ml-1m README).
ML1M_OCCUPATIONS = {
    0: "other", 1: "academic/educator", 2: "artist", 3: "clerical/admin", 4: "college/grad student",
    5: "customer service", 6: "doctor/health care", 7: "executive/managerial", 8: "farmer",
    9: "homemaker", 10: "K-12 student", 11: "lawyer", 12: "programmer", 13: "retired",
    14: "sales/marketing", 15: "scientist", 16: "self-employed", 17: "technician/engineer",
    18: "tradesman/craftsman", 19: "unemployed", 20: "writer",
}

ITEM_SPEC = {"genres": "multi:|", "year_bucket": "categorical"}
USER_SPEC = {"age_bucket": "categorical", "gender": "categorical", "occupation": "categorical"}

_SEP_NAMES = {"\t": "tab", "|": "'|'", "::": "'::'", ",": "comma"}

# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _decode(data: bytes, path: Path, encoding: str | None) -> str:
    """Decode with ``encoding``; ``None`` tries UTF-8, then latin-1 (GroupLens' older files)."""
    if encoding is not None:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: cannot decode as {encoding}: {exc.reason} at byte {exc.start}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def year_bucket(year: int | None) -> str:
    """Decade label of a release year, e.g. 1995 -> ``"1990s"``; ``"unknown"`` for None."""
    if year is None:
        return "unknown"
    return f"{year // 10 * 10}s"


_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")


def _plausible(year: int) -> int | None:
    return year if 1870 <= year <= 2100 else None


def year_from_title(title: str) -> int | None:
    """The last ``(YYYY)`` (or ``(YYYY-YYYY)``) in a title, if any."""
    found = _TITLE_YEAR.findall(title or "")
    return _plausible(int(found[-1])) if found else None


def _year_from_text(text: str) -> int | None:
    """A year from a release date (``01-Jan-1995``) or a bare year (``1995``)."""
    match = _DATE_YEAR.search((text or "").strip())
    return _plausible(int(match.group(1))) if match else None


def age_bucket(age: int) -> str:
    """MovieLens age groups: ``<18``, ``18-24``, ``25-34``, ``35-44``, ``45-49``, ``50-55``, ``56+``.

    Works for raw ages (ml-100k) and for ml-1m's age codes (1, 18, 25, 35, 45, 50, 56).
    """
    if age < 18:
        return "<18"
    if age < 25:
        return "18-24"
    if age < 35:
        return "25-34"
    if age < 45:
        return "35-44"
    if age < 50:
        return "45-49"
    if age < 56:
        return "50-55"
    return "56+"


# ---------------------------------------------------------------------------------------------------
# Parsing: small side files line by line (exact line numbers), ratings through pandas' C parser
# ---------------------------------------------------------------------------------------------------


def _read_records(
    path: Path,
    sep: str,
    nfields: int | None,
    *,
    header: bool = False,
    encoding: str | None = None,
    quoted: bool = False,
    what: str = "",
) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """Split a small delimited file into ``(header, [(line_number, fields), ...])``.

    Blank lines are skipped. Every other line must have ``nfields`` fields (or as many as the header
    when ``nfields`` is None). ``quoted`` parses CSV quoting (``movies.csv`` titles with commas).
    """
    _check_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or one_line(exc)}") from None
    text = _decode(data, path, encoding)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if quoted:
        try:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
            rows = []
            start = 1
            for fields in reader:
                rows.append((start, fields))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}: malformed CSV near line {reader.line_num}: {one_line(exc)}") from None
        rows = [(n, f) for n, f in rows if f and any(x.strip() for x in f)]
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if line.strip():
                rows.append((n, line.split(sep)))
    head = None
    if header:
        head = [h.strip() for h in rows[0][1]]
        rows = rows[1:]
        if nfields is None:
            nfields = len(head)
    if not rows:
        raise DataError(f"{path}: has no {what or 'data'} rows" + (" (header only)" if header else ""))
    for n, fields in rows:
        if len(fields) != nfields:
            raise DataError(
                f"{path}: line {n}: expected {nfields} {_SEP_NAMES.get(sep, repr(sep))}-separated fields, "
                f"found {len(fields)}"
            )
    return head, rows


def _int_field(value: str, path: Path, line: int, what: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise DataError(f"{path}: line {line}: {what} is not an integer: {value!r}") from None
    if not -(2 ** 63) <= number < 2 ** 63:  # ids become int64 columns
        raise DataError(f"{path}: line {line}: {what} is out of the 64-bit integer range: {value!r}")
    return number


def _header_of(path: Path, sep: str) -> list[str]:
    """The first non-blank line of a file split on ``sep`` (CSV quoting honoured for commas)."""
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
                if line.strip():
                    fields = next(csv.reader([line], delimiter=sep)) if sep == "," else line.split(sep)
                    return [f.strip() for f in fields]
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or one_line(exc)}") from None
    except csv.Error as exc:  # e.g. a bare carriage return inside the header line
        raise DataError(f"{path}: malformed header line: {one_line(exc)}") from None
    raise DataError(f"{path}: file is empty")


def _diagnose_ratings(path: Path, sep: str, nfields: int, header: bool, kinds: dict[int, tuple[str, str]]) -> None:
    """Scan a ratings file line by line and raise a DataError for the first bad line, if any."""
    seen_header = not header
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line.strip():
                continue
            if not seen_header:
                seen_header = True
                continue
            fields = line.split(sep)
            if len(fields) != nfields:
                raise DataError(
                    f"{path}: line {n}: expected {nfields} {_SEP_NAMES.get(sep, repr(sep))}-separated fields, "
                    f"found {len(fields)}"
                )
            for pos, (kind, name) in kinds.items():
                value = fields[pos].strip()
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise DataError(f"{path}: line {n}: {name} is not a number: {fields[pos]!r}")
                if kind == "int" and number != int(number):
                    raise DataError(f"{path}: line {n}: {name} is not an integer: {fields[pos]!r}")


_RATING_KINDS = (("int", "user id"), ("int", "item id"), ("float", "rating"), ("int", "timestamp"))


def _read_ratings(
    path: Path, sep: str, *, positions: tuple[int, int, int, int] = (0, 1, 2, 3), nfields: int = 4,
    header: bool = False,
) -> pd.DataFrame:
    """Read a (possibly huge) all-numeric ratings file into the canonical four columns.

    ``positions`` gives the field index of user, item, rating and timestamp. The fast path is pandas'
    C parser; when anything looks off, a line-by-line scan finds the first bad line for the message.
    """
    _check_file(path)
    kinds = dict(zip(positions, _RATING_KINDS))

    def fail(detail: str) -> DataError:
        _diagnose_ratings(path, sep, nfields, header, kinds)  # raises with a line number when it can
        return DataError(f"{path}: cannot read ratings: {detail}")

    try:
        if len(sep) > 1:  # '::' -- the C parser wants a one-character separator
            source = io.BytesIO(path.read_bytes().replace(sep.encode(), b"\x1f"))
            csep = "\x1f"
        else:
            source, csep = path, sep
        frame = pd.read_csv(
            source, sep=csep, header=None, skiprows=1 if header else 0, keep_default_na=False,
            quoting=csv.QUOTE_NONE, encoding="latin-1", low_memory=False, skipinitialspace=True,
        )
    except pd.errors.EmptyDataError:
        if header:
            raise DataError(f"{path}: has no ratings (header only)") from None
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise fail(one_line(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or one_line(exc)}") from None
    if len(frame) == 0:
        raise DataError(f"{path}: has no ratings")
    if frame.shape[1] != nfields:
        raise fail(f"expected {nfields} fields, found {frame.shape[1]}")
    out = {}
    for name, pos in zip(("user", "item", "rating", "timestamp"), positions):
        column = frame[pos]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise fail(f"non-numeric {name} column")
        values = column.to_numpy(dtype="float64")
        if not np.isfinite(values).all():
            raise fail(f"non-finite {name}")
        if name == "rating":
            out[name] = values
        elif (np.abs(values) >= 2.0 ** 63).any():  # a cast would wrap around silently
            raise fail(f"{name} out of the 64-bit integer range")
        elif column.dtype.kind in "iu":
            out[name] = column.to_numpy(dtype="int64")
        else:
            if not (values == np.round(values)).all():
                raise fail(f"non-integer {name}")
            out[name] = values.astype("int64")
    return pd.DataFrame(out).reset_index(drop=True)


def _dataset(ratings, items, users, scale, name) -> RawDataset:
    return RawDataset(
        ratings=ratings,
        items=items,
        item_spec=dict(ITEM_SPEC) if items is not None else {},
        item_title="title" if items is not None else None,
        users=users,
        user_spec=dict(USER_SPEC) if users is not None else {},
        rating_scale=scale,
        name=name,
    )


def _items_frame(ids, titles, genres, years) -> pd.DataFrame:
    frame = pd.DataFrame({
        "item": pd.Series(ids, dtype="int64"),
        "title": pd.Series(titles, dtype=object),
        "genres": pd.Series(genres, dtype=object),
        "year_bucket": pd.Series([year_bucket(y) for y in years], dtype=object),
    })
    return frame


def _users_frame(ids, ages, genders, occupations) -> pd.DataFrame:
    return pd.DataFrame({
        "user": pd.Series(ids, dtype="int64"),
        "age_bucket": pd.Series([age_bucket(a) for a in ages], dtype=object),
        "gender": pd.Series(genders, dtype=object),
        "occupation": pd.Series(occupations, dtype=object),
    })


def _optional(path: Path) -> bool:
    """Whether an optional side file is present (absent -> the table is None)."""
    return path.exists()


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


def read_ml100k(folder: str | os.PathLike) -> RawDataset:
    """Read GroupLens ml-100k: ``u.data`` (required), ``u.item`` and ``u.user`` (optional)."""
    folder = Path(folder).expanduser()
    ratings = _read_ratings(folder / "u.data", "\t")

    items = None
    path = folder / "u.item"
    if _optional(path):
        _, rows = _read_records(path, "|", 5 + len(ML100K_GENRES), encoding=None, what="item")
        ids, titles, genres, years = [], [], [], []
        for n, f in rows:
            ids.append(_int_field(f[0], path, n, "movie id"))
            titles.append(f[1])
            flags = f[5:]
            bad = [x for x in flags if x.strip() not in ("0", "1")]
            if bad:
                raise DataError(f"{path}: line {n}: genre flags must be 0 or 1, found {bad[0]!r}")
            genres.append("|".join(g for g, x in zip(ML100K_GENRES, flags) if x.strip() == "1"))
            year = _year_from_text(f[2])
            years.append(year if year is not None else year_from_title(f[1]))
        items = _items_frame(ids, titles, genres, years)

    users = None
    path = folder / "u.user"
    if _optional(path):
        _, rows = _read_records(path, "|", 5, encoding=None, what="user")
        users = _users_frame(
            [_int_field(f[0], path, n, "user id") for n, f in rows],
            [_int_field(f[1], path, n, "age") for n, f in rows],
            [f[2].strip() for _, f in rows],
            [f[3].strip() for _, f in rows],
        )
    return _dataset(ratings, items, users, (1.0, 5.0), "ml-100k")


def _read_dat(folder: Path, scale: tuple[float, float], name: str) -> RawDataset:
    ratings = _read_ratings(folder / "ratings.dat", "::")

    items = None
    path = folder / "movies.dat"
    if _optional(path):
        _, rows = _read_records(path, "::", 3, encoding=None, what="movie")
        ids = [_int_field(f[0], path, n, "movie id") for n, f in rows]
        titles = [f[1] for _, f in rows]
        items = _items_frame(ids, titles, [f[2].strip() for _, f in rows], [year_from_title(t) for t in titles])

    users = None
    path = folder / "users.dat"
    if _optional(path):
        _, rows = _read_records(path, "::", 5, encoding=None, what="user")
        occupations = []
        for n, f in rows:
            code = _int_field(f[3], path, n, "occupation")
            occupations.append(ML1M_OCCUPATIONS.get(code, str(code)))
        users = _users_frame(
            [_int_field(f[0], path, n, "user id") for n, f in rows],
            [_int_field(f[2], path, n, "age") for n, f in rows],
            [f[1].strip() for _, f in rows],
            occupations,
        )
    return _dataset(ratings, items, users, scale, name)


def read_ml1m(
    folder: str | os.PathLike, name: str = "ml-1m", rating_scale: tuple[float, float] = (1.0, 5.0),
) -> RawDataset:
    """Read ml-1m style ``::`` files: ``ratings.dat`` (required), ``movies.dat``, ``users.dat``.

    Side files are optional (ml-10m has no ``users.dat``); text is UTF-8, else latin-1 (ml-1m).
    """
    return _read_dat(Path(folder).expanduser(), tuple(rating_scale), name)


def read_ml10m(folder: str | os.PathLike) -> RawDataset:
    """Read ml-10m (``ml-10M100K``): ``ratings.dat`` and ``movies.dat``; half-star ratings."""
    return read_ml1m(folder, name="ml-10m", rating_scale=(0.5, 5.0))


def read_ml_csv(
    folder: str | os.PathLike, name: str | None = None, rating_scale: tuple[float, float] = (0.5, 5.0),
) -> RawDataset:
    """Read ml-20m / ml-25m / ml-latest(-small): ``ratings.csv`` (required) and ``movies.csv``.

    ``name`` defaults to the folder's name when it looks like a MovieLens variant.
    """
    folder = Path(folder).expanduser()
    if name is None:
        name = folder.name if folder.name.lower().startswith("ml-") else "movielens"
    path = folder / "ratings.csv"
    head = _header_of(path, ",")
    positions = _positions(path, head, ("userId", "movieId", "rating", "timestamp"))
    ratings = _read_ratings(path, ",", positions=positions, nfields=len(head), header=True)

    items = None
    path = folder / "movies.csv"
    if _optional(path):
        head, rows = _read_records(path, ",", None, header=True, encoding="utf-8", quoted=True, what="movie")
        i_id, i_title, i_genres = _positions(path, head, ("movieId", "title", "genres"))
        ids = [_int_field(f[i_id], path, n, "movie id") for n, f in rows]
        titles = [f[i_title] for _, f in rows]
        items = _items_frame(ids, titles, [f[i_genres].strip() for _, f in rows], [year_from_title(t) for t in titles])
    return _dataset(ratings, items, None, tuple(rating_scale), name)


def _positions(path: Path, head: list[str], wanted: tuple[str, ...]) -> tuple[int, ...]:
    """Field positions of ``wanted`` columns in a header (RecBole's ``name:type`` allowed)."""
    names = [h.split(":", 1)[0].strip() for h in head]
    missing = [w for w in wanted if w not in names]
    if missing:
        hint = " (only one column was found: is the delimiter right?)" if len(names) == 1 else ""
        raise DataError(f"{path}: header has no column(s) {missing}; found {head}{hint}")
    return tuple(names.index(w) for w in wanted)


def read_recbole_ml100k(folder: str | os.PathLike) -> RawDataset:
    """Read RecBole's atomic ml-100k files: ``ml-100k.inter`` (required), ``ml-100k.item``, ``ml-100k.user``.

    Gives the same ratings frame as :func:`read_ml100k` on GroupLens' files. RecBole titles come
    without the trailing ``(year)`` and genres are space-separated; both are mapped to the common
    ``title`` / ``genres`` (``|``-joined) / ``year_bucket`` columns.
    """
    folder = Path(folder).expanduser()
    path = folder / "ml-100k.inter"
    head = _header_of(path, "\t")
    positions = _positions(path, head, ("user_id", "item_id", "rating", "timestamp"))
    ratings = _read_ratings(path, "\t", positions=positions, nfields=len(head), header=True)

    items = None
    path = folder / "ml-100k.item"
    if _optional(path):
        head, rows = _read_records(path, "\t", None, header=True, encoding="utf-8", what="item")
        i_id, i_title, i_year, i_class = _positions(path, head, ("item_id", "movie_title", "release_year", "class"))
        ids, titles, genres, years = [], [], [], []
        for n, f in rows:
            ids.append(_int_field(f[i_id], path, n, "item id"))
            titles.append(f[i_title])
            genres.append("|".join(f[i_class].split()))
            year = _year_from_text(f[i_year])
            years.append(year if year is not None else year_from_title(f[i_title]))
        items = _items_frame(ids, titles, genres, years)

    users = None
    path = folder / "ml-100k.user"
    if _optional(path):
        head, rows = _read_records(path, "\t", None, header=True, encoding="utf-8", what="user")
        u_id, u_age, u_gender, u_occ = _positions(path, head, ("user_id", "age", "gender", "occupation"))
        users = _users_frame(
            [_int_field(f[u_id], path, n, "user id") for n, f in rows],
            [_int_field(f[u_age], path, n, "age") for n, f in rows],
            [f[u_gender].strip() for _, f in rows],
            [f[u_occ].strip() for _, f in rows],
        )
    return _dataset(ratings, items, users, (1.0, 5.0), "ml-100k")


# ---------------------------------------------------------------------------------------------------
# Variants, the cache and the loaders
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    zip_name: str  # GroupLens zip, without ".zip"
    files: tuple[str, ...]  # wanted from the zip; the first is the ratings file (the "ready" marker)
    reader: Callable[[Path], RawDataset]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ml-100k", "ml-100k", ("u.data", "u.item", "u.user"), read_ml100k),
        Variant("ml-1m", "ml-1m", ("ratings.dat", "movies.dat", "users.dat"), read_ml1m),
        Variant("ml-10m", "ml-10m", ("ratings.dat", "movies.dat"), read_ml10m),
        Variant("ml-20m", "ml-20m", ("ratings.csv", "movies.csv"), lambda f: read_ml_csv(f, "ml-20m")),
        Variant("ml-25m", "ml-25m", ("ratings.csv", "movies.csv"), lambda f: read_ml_csv(f, "ml-25m")),
        Variant("ml-latest-small", "ml-latest-small", ("ratings.csv", "movies.csv"),
                lambda f: read_ml_csv(f, "ml-latest-small")),
        Variant("ml-latest", "ml-latest", ("ratings.csv", "movies.csv"), lambda f: read_ml_csv(f, "ml-latest")),
    )
}
_ALIASES = {"100k": "ml-100k", "1m": "ml-1m", "10m": "ml-10m", "ml-10m100k": "ml-10m", "20m": "ml-20m",
            "25m": "ml-25m", "latest-small": "ml-latest-small", "latest": "ml-latest"}


def _variant(name: str) -> Variant:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key.startswith("ml") and not key.startswith("ml-"):
        key = "ml-" + key[2:]
    if key not in VARIANTS:
        raise ConfigError(f"unknown MovieLens variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[key]


def _read_cached(variant: Variant, folder: Path) -> RawDataset | None:
    """The data set in ``folder`` if its ratings file is there, else None."""
    if variant.name == "ml-100k":
        if (folder / "u.data").is_file():
            return read_ml100k(folder)
        if (folder / "ml-100k.inter").is_file():
            return read_recbole_ml100k(folder)
        return None
    if (folder / variant.files[0]).is_file():
        return variant.reader(folder)
    return None


def _manual_hint(variant: Variant, final: Path) -> str:
    return (f"download {fetch.grouplens_url(variant.zip_name)} by hand and unzip {', '.join(variant.files)} "
            f"into {final}")


def load_movielens(
    variant: str = "ml-100k", root: str | os.PathLike | None = None, download: bool = True,
) -> RawDataset:
    """Load a MovieLens variant from ``<cache>/<variant>/``, downloading it first when absent.

    ``variant``: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest-small or ml-latest.
    ``root``: the cache folder (default ``$RECSYS_TORCH_DATA`` or ``~/.cache/recsys_torch``).
    ml-100k comes from GroupLens (MD5-checked) or, failing that, from the RecBole 1.2.1 wheel on PyPI
    (SHA-256-checked); other variants only from GroupLens. The cache is written atomically.
    """
    v = _variant(variant)
    cache = Path(root).expanduser() if root is not None else fetch.default_cache_dir()
    final = cache / v.name
    if v.name == "ml-100k":
        fetch.check_cached_ml100k(final)  # a truncated or changed copy of the real files
    cached = _read_cached(v, final)
    if cached is not None:
        logger.info("%s: reading cached files in %s", v.name, final)
        return cached
    if not download:
        raise DataError(f"{v.name}: no data in {final} and download=False; {_manual_hint(v, final)}")
    if v.name == "ml-100k":
        def fill(staging):
            return fetch.fetch_ml100k(v, staging)
    else:
        def fill(staging):
            try:
                fetch.fetch_grouplens(v, staging)
            except DataError as exc:
                raise DataError(f"cannot download {v.name}: {exc}") from None
            return f"GroupLens ({fetch.grouplens_url(v.zip_name)})"

    def marker(staging):
        return "ml-100k.inter" if (staging / "ml-100k.inter").exists() else v.files[0]

    return fetch.fetch_into_cache(v.name, cache, fill, lambda folder: _read_cached(v, folder), marker,
                                  _manual_hint(v, final))



def movielens(variant: str, root: str | os.PathLike | None = None, download: bool = True,
              duplicates: str = "last") -> RawDataset:
    """:func:`load_movielens` for a config (``data=ml1m`` ...): ``duplicates`` is the policy for
    repeated (user, item) ratings when encoding."""
    return load_movielens(variant, root=root, download=download).with_duplicates(duplicates)


def ml100k(root: str | os.PathLike | None = None, download: bool = True, duplicates: str = "last") -> RawDataset:
    """MovieLens 100k (943 users, 1682 movies, 100,000 ratings); see :func:`load_movielens`."""
    return movielens("ml-100k", root=root, download=download, duplicates=duplicates)
