"""The loaders, fuzzed: random bytes and almost-valid delimited files (valid cells, with a few broken
cells, rows and headers), written to files and read by ``data.tabular.csv`` and the MovieLens readers,
then encoded. Whatever the input, they either load or raise a :class:`RecsysError`, never another
exception. (Run with ``--hypothesis-show-statistics`` to see how far the examples get.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from recsys_torch.data import encode
from recsys_torch.data import movielens as ml
from recsys_torch.data.tabular import csv
from recsys_torch.errors import RecsysError

# A warning is output too: on the command line it would print beside the one-line error.
pytestmark = pytest.mark.filterwarnings("error")

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Cells that break parsers: numbers at the edges, non-finite values, quotes, separators, blanks, unicode.
JUNK = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "NA", "null", "1e400", "0x1F", "1,5", "\"", "\"\"",
                     "'", "\\", "|", "::", "\t", ";", "\r", "\n", "\x00", "é", "\ufeff", "2001-02-03", "  7  "]),
    st.text(max_size=8),
)
ID = st.integers(0, 30).map(str)
RATING = st.sampled_from(["1", "2", "3", "4", "5", "3.5", "0.5"])
TIME = st.integers(880000000, 890000000).map(str)
WORD = st.sampled_from(["Toy Story (1995)", "Heat", "Drama", "Comedy|Drama", "M", "F", "writer", "12345", "x y"])
FLAG = st.sampled_from(["0", "1"])
DATE = st.sampled_from(["01-Jan-1995", "", "1998"])


def sometimes_broken(cell: st.SearchStrategy, odds: int = 40) -> st.SearchStrategy:
    """Junk once in ``odds`` draws, else the valid cell (so that some whole files stay valid)."""
    return st.integers(1, odds).flatmap(lambda n: JUNK if n == 1 else cell)


@st.composite
def table(draw, header: list[str] | None, cells: list[st.SearchStrategy], sep: str) -> bytes:
    """An almost-valid delimited file: now and then a broken header, a short or long row, a broken cell."""
    lines = []
    if header is not None:
        names = header if draw(st.integers(0, 9)) else draw(st.lists(sometimes_broken(WORD, 3), max_size=6))
        lines.append(sep.join(names))
    for _ in range(draw(st.integers(0, 15))):
        row = [draw(sometimes_broken(c)) for c in cells]
        shape = draw(st.integers(0, 60))
        if shape == 0:
            row = row[:-1]
        elif shape == 1:
            row = row + [draw(JUNK)]
        lines.append(sep.join(row))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))
    return text.encode("utf-8", "surrogatepass")


def content(header, cells, sep) -> st.SearchStrategy:
    """A file's bytes: random one time in six, else an almost-valid table."""
    return st.integers(0, 5).flatmap(lambda n: st.binary(max_size=400) if n == 0 else table(header, cells, sep))


def only_our_errors(load, duplicates: str = "last"):
    """Run ``load`` and encode what it returns; anything but a RecsysError fails the test."""
    try:
        encode(load(), duplicates=duplicates)
        event("loaded")
    except RecsysError as exc:
        words = re.sub(r"\S*/\S*", "<path>", str(exc)).split()
        event(f"{type(exc).__name__}: {' '.join(words[:5])}")


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path


# --- data=csv ----------------------------------------------------------------------------------------------

RATING_CELLS = [ID, ID, RATING, TIME]


@st.composite
def ratings_file(draw):
    suffix, sep = draw(st.sampled_from([(".csv", ","), (".tsv", "\t"), (".txt", ";"), (".txt", "|"), (".parquet", ",")]))
    data = draw(content(["user", "item", "rating", "timestamp"], RATING_CELLS, sep))
    return suffix, data


@FUZZ
@given(case=ratings_file(), sep=st.sampled_from([None, None, None, ",", ";", "\t"]),
       scale=st.sampled_from([None, (1, 5), (0.5, 5.0)]), timestamp=st.booleans(),
       duplicates=st.sampled_from(["last", "first", "mean", "error"]))
@example(case=(".csv", b"user,item,rating,timestamp\n0,0,1,inf"), sep=None, scale=None, timestamp=True,
         duplicates="last")
def test_csv_ratings_file(folder, case, sep, scale, timestamp, duplicates):
    suffix, data = case
    path = fresh(folder / "csv") / f"ratings{suffix}"
    path.write_bytes(data)
    columns = {"timestamp": "timestamp"} if timestamp else None
    only_our_errors(lambda: csv(str(path), columns=columns, sep=sep, rating_scale=scale), duplicates)


GOOD_RATINGS = "user,item,rating\n1,10,4\n2,10,3\n2,20,5\n3,30,1\n"


@FUZZ
@given(items=content(["item", "title", "genre", "year"], [ID, WORD, WORD, TIME], ","),
       users=content(["user", "age", "job"], [ID, ID, WORD], ","),
       kind=st.sampled_from(["categorical", "numeric", "multi:|", "multi: "]), title=st.booleans())
def test_csv_feature_tables(folder, items, users, kind, title):
    """Valid ratings with a random item and user table."""
    base = fresh(folder / "features")
    (base / "ratings.csv").write_text(GOOD_RATINGS)
    (base / "items.csv").write_bytes(items)
    (base / "users.csv").write_bytes(users)
    only_our_errors(lambda: csv(
        str(base / "ratings.csv"), items=str(base / "items.csv"), item_title="title" if title else None,
        item_features={"genre": kind, "year": "numeric"}, users=str(base / "users.csv"),
        user_features={"age": kind, "job": "categorical"},
    ))


# --- MovieLens readers: each file absent, random bytes, or an almost-valid table in its format ----------

ITEM_100K = [ID, WORD, DATE, st.just(""), st.just("http://x"), *[FLAG] * 19]
READERS = {
    "ml-100k": (ml.read_ml100k, {
        "u.data": (None, RATING_CELLS, "\t"),
        "u.item": (None, ITEM_100K, "|"),
        "u.user": (None, [ID, ID, WORD, WORD, WORD], "|"),
    }),
    "ml-1m": (ml.read_ml1m, {
        "ratings.dat": (None, RATING_CELLS, "::"),
        "movies.dat": (None, [ID, WORD, WORD], "::"),
        "users.dat": (None, [ID, WORD, ID, ID, WORD], "::"),
    }),
    "ml-csv": (ml.read_ml_csv, {
        "ratings.csv": (["userId", "movieId", "rating", "timestamp"], RATING_CELLS, ","),
        "movies.csv": (["movieId", "title", "genres"], [ID, WORD, WORD], ","),
    }),
    "recbole": (ml.read_recbole_ml100k, {
        "ml-100k.inter": (["user_id:token", "item_id:token", "rating:float", "timestamp:float"], RATING_CELLS, "\t"),
        "ml-100k.item": (["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
                         [ID, WORD, DATE, WORD], "\t"),
        "ml-100k.user": (["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
                         [ID, ID, WORD, WORD, WORD], "\t"),
    }),
}


@st.composite
def movielens_folder(draw):
    """(reader name, {file: bytes or None})."""
    name = draw(st.sampled_from(sorted(READERS)))
    files = {}
    for file, (header, cells, sep) in READERS[name][1].items():
        files[file] = draw(st.one_of(st.none(), content(header, cells, sep)))
    return name, files


@FUZZ
@given(case=movielens_folder())
@example(case=("ml-100k", {"u.data": b"1e20\t2\t3\t881250949\n", "u.item": None, "u.user": None}))
@example(case=("ml-100k", {"u.data": b"1\t2\t3\t881250949\n", "u.user": None,
                           "u.item": b"%d|T|01-Jan-1995||u" % 2 ** 70 + b"|0" * 19 + b"\n"}))
@example(case=("ml-csv", {"ratings.csv": b"\r\x00", "movies.csv": None}))  # bare CR inside the header line
def test_movielens_readers(folder, case):
    name, files = case
    base = fresh(folder / "ml")
    for file, data in files.items():
        if data is not None:
            (base / file).write_bytes(data)
    only_our_errors(lambda: READERS[name][0](base))
