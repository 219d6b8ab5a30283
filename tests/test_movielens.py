"""MovieLens readers and the cached downloader, on tiny handmade files; never the network or pip."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
import urllib.error
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from recsys_torch.data import fetch
from recsys_torch.data import movielens as ml
from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------
# Handmade fixture files
# ---------------------------------------------------------------------------------------------------

U_DATA = "1\t10\t4\t881250949\n2\t20\t3\t891717742\n1\t30\t5\t878887116\n3\t10\t1\t880606923\n"


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ml.ML100K_GENRES)


TOY_FLAGS = _flags("Animation", "Children's", "Comedy")
U_ITEM = (
    f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{TOY_FLAGS}\n"
    f"20|Misérables, Les (1995)|||http://x|{_flags('Drama', 'Musical')}\n"
    f"30|unknown||||{_flags('unknown')}\n"
    f"40|Land Before Time III: The Time of the Great Giving (1995) (V)|||url|{_flags('Animation')}\n"
)
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|15|M|student|T8H1N\n"

RB_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + U_DATA
RB_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    "20\tMisérables, Les\t1995\tDrama Musical\n"
    "30\tunkonwn\tunkonwn\tunknown\n"
    "40\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation\n"
)
RB_USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t15\tM\tstudent\tT8H1N\n"
)


def write(folder: Path, files: dict[str, str | bytes], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode(encoding)
        (folder / name).write_bytes(data)
    return folder


def ml100k_files(folder: Path) -> Path:
    return write(folder, {"u.data": U_DATA, "u.item": U_ITEM.encode("latin-1"), "u.user": U_USER})


def recbole_files(folder: Path) -> Path:
    return write(folder, {"ml-100k.inter": RB_INTER, "ml-100k.item": RB_ITEM, "ml-100k.user": RB_USER})


def zip_of(path: Path, members: dict[str, bytes | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_ratings(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == ["user", "item", "rating", "timestamp"]
    assert str(frame["rating"].dtype) == "float64"
    assert str(frame["timestamp"].dtype) == "int64"


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------------
# Guard: no test may reach the network or run pip
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    empty_server = tmp_path / "no-server"
    empty_server.mkdir()
    monkeypatch.setattr(fetch, "GROUPLENS_BASE_URL", empty_server.as_uri())  # file:// with no zips in it

    def no_pip(dest):
        raise DataError("pip is disabled in tests")

    monkeypatch.setattr(fetch, "_pip_download_recbole", no_pip)
    monkeypatch.delenv(fetch.DATA_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


def test_read_ml100k(tmp_path):
    d = ml.read_ml100k(ml100k_files(tmp_path / "ml-100k"))
    assert isinstance(d, RawDataset)
    check_ratings(d.ratings)
    assert d.ratings.values.tolist() == [[1, 10, 4, 881250949], [2, 20, 3, 891717742],
                                         [1, 30, 5, 878887116], [3, 10, 1, 880606923]]
    assert d.ratings["user"].dtype == "int64" and d.ratings["item"].dtype == "int64"
    assert d.rating_scale == (1.0, 5.0) and d.name == "ml-100k"
    assert d.item_title == "title"
    assert d.item_spec == {"genres": "multi:|", "year_bucket": "categorical"}
    assert d.user_spec == {"age_bucket": "categorical", "gender": "categorical", "occupation": "categorical"}
    items = d.items.set_index("item")
    assert items.loc[10, "genres"] == "Animation|Children's|Comedy"
    assert items.loc[10, "title"] == "Toy Story (1995)"  # kept as in the file
    assert items.loc[20, "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items.loc[20, "year_bucket"] == "1990s"  # no release date: year from the title
    assert items.loc[30, "year_bucket"] == "unknown"
    assert items.loc[30, "genres"] == "unknown"
    users = d.users.set_index("user")
    assert users["age_bucket"].to_dict() == {1: "18-24", 2: "50-55", 3: "<18"}
    assert users.loc[2, "gender"] == "F" and users.loc[3, "occupation"] == "student"
    assert list(d.users.columns) == ["user", "age_bucket", "gender", "occupation"]


def test_read_ml100k_side_files_optional(tmp_path):
    d = ml.read_ml100k(write(tmp_path, {"u.data": U_DATA}))
    assert d.items is None and d.users is None and d.item_title is None
    assert d.item_spec == {} and d.user_spec == {}
    assert len(d.ratings) == 4


def test_recbole_matches_grouplens_format(tmp_path):
    a = ml.read_ml100k(ml100k_files(tmp_path / "u"))
    b = ml.read_recbole_ml100k(recbole_files(tmp_path / "rb"))
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.users, b.users)
    cols = ["item", "genres", "year_bucket"]
    pd.testing.assert_frame_equal(a.items[cols], b.items[cols])
    assert b.items.set_index("item").loc[20, "title"] == "Misérables, Les"  # titles with spaces kept whole
    assert (b.name, b.rating_scale, b.item_title) == (a.name, a.rating_scale, a.item_title)


def test_read_ml1m(tmp_path):
    folder = write(tmp_path / "ml-1m", {
        "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
        "movies.dat": ("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                       "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                       "5::Café Olé: Part 2 (1950)::Comedy\n").encode("latin-1"),
        "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    })
    d = ml.read_ml1m(folder)
    check_ratings(d.ratings)
    assert d.ratings["item"].tolist() == [1193, 661, 1193]
    assert d.rating_scale == (1.0, 5.0) and d.name == "ml-1m"
    items = d.items.set_index("item")
    assert items.loc[661, "genres"] == "Animation|Children's|Musical"
    assert items.loc[1193, "year_bucket"] == "1970s"
    assert items.loc[5, "title"] == "Café Olé: Part 2 (1950)"
    users = d.users.set_index("user")
    assert users.loc[1].tolist() == ["<18", "F", "K-12 student"]
    assert users.loc[2].tolist() == ["56+", "M", "self-employed"]


def test_read_ml10m_without_users(tmp_path):
    folder = write(tmp_path / "ml-10M100K", {
        "ratings.dat": "1::122::4.5::838985046\n1::185::0.5::838983525\n",
        "movies.dat": "122::Boomerang (1992)::Comedy|Romance\n185::Net, The (1995)::Action|Crime|Thriller\n",
    })
    d = ml.read_ml10m(folder)
    assert d.users is None and d.user_spec == {}
    assert d.ratings["rating"].tolist() == [4.5, 0.5]
    assert d.rating_scale == (0.5, 5.0) and d.name == "ml-10m"
    assert d.items["year_bucket"].tolist() == ["1990s", "1990s"]


def test_read_ml_csv(tmp_path):
    folder = write(tmp_path / "ml-latest-small", {
        "ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n2,6,0.5,964982224\n",
        "movies.csv": ('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                       '3,"American President, The (1995)",Comedy|Drama|Romance\n'
                       "6,Fawlty Towers (1975\u20131979),(no genres listed)\n"
                       "7,Untitled,Drama\n"),
    })
    d = ml.read_ml_csv(folder)
    check_ratings(d.ratings)
    assert d.name == "ml-latest-small" and d.rating_scale == (0.5, 5.0) and d.users is None
    items = d.items.set_index("item")
    assert items.loc[3, "title"] == "American President, The (1995)"
    assert items.loc[6, "genres"] == "(no genres listed)"
    assert items["year_bucket"].to_dict() == {1: "1990s", 3: "1990s", 6: "1970s", 7: "unknown"}
    assert ml.read_ml_csv(folder, name="ml-25m").name == "ml-25m"


def test_read_ml_csv_columns_by_header(tmp_path):
    folder = write(tmp_path / "x", {"ratings.csv": "timestamp,rating,movieId,userId\n5,2.5,7,9\n"})
    d = ml.read_ml_csv(folder)
    assert d.ratings.values.tolist() == [[9, 7, 2.5, 5]] and d.items is None and d.name == "movielens"


def test_float_timestamps_become_int(tmp_path):
    folder = write(tmp_path, {"ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                               "1\t2\t3\t881250949.0\n"})
    d = ml.read_recbole_ml100k(folder)
    assert d.ratings["timestamp"].tolist() == [881250949] and str(d.ratings["timestamp"].dtype) == "int64"


def test_buckets():
    assert [ml.age_bucket(a) for a in (1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)] == [
        "<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55",
        "50-55", "56+", "56+"]
    assert ml.year_bucket(1995) == "1990s" and ml.year_bucket(1919) == "1910s" and ml.year_bucket(None) == "unknown"
    assert ml.year_from_title("Land Before Time III (1995) (V)") == 1995
    assert ml.year_from_title("Babylon 5") is None


# ---------------------------------------------------------------------------------------------------
# Malformed input: always a one-line DataError naming the file
# ---------------------------------------------------------------------------------------------------

RB_HEAD = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"

MALFORMED = [
    # reader, file, content (None = absent), expected fragment
    ("read_ml100k", "u.data", None, "file not found"),
    ("read_ml100k", "u.data", "", "file is empty"),
    ("read_ml100k", "u.data", "\n \n", "file is empty"),
    ("read_ml100k", "u.data", "1,10,4,881250949\n2,20,3,891717742\n", "line 1: expected 4 tab-separated fields, found 1"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\n2\t20\t3\t5\t9\n", "line 2: expected 4 tab-separated fields, found 5"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\n2\t20\t3\t5\n3\t30\t2\n", "line 3: expected 4 tab-separated fields, found 3"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\n2\t20\tgood\t5\n", "line 2: rating is not a number: 'good'"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\n2\t20\t\t5\n", "line 2: rating is not a number"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\nx\t20\t3\t5\n", "line 2: user id is not a number"),
    ("read_ml100k", "u.data", "1\t10\t4\t5\n2\t20\t3\t5.5\n", "line 2: timestamp is not an integer"),
    ("read_ml100k", "u.data", "1\t10\tnan\t5\n", "line 1: rating is not a number"),
    ("read_ml1m", "ratings.dat", None, "file not found"),
    ("read_ml1m", "ratings.dat", "", "file is empty"),
    ("read_ml1m", "ratings.dat", "1::10::4::5\n1:20:4:5\n", "line 2: expected 4 '::'-separated fields, found 1"),
    ("read_ml1m", "ratings.dat", "1::10::4::5\n1::20::five::5\n", "line 2: rating is not a number: 'five'"),
    ("read_ml10m", "ratings.dat", "1\t10\t4\t5\n", "expected 4 '::'-separated fields, found 1"),
    ("read_ml_csv", "ratings.csv", None, "file not found"),
    ("read_ml_csv", "ratings.csv", "", "file is empty"),
    ("read_ml_csv", "ratings.csv", "userId,movieId,rating,timestamp\n", "has no ratings"),
    ("read_ml_csv", "ratings.csv", "userId\tmovieId\trating\ttimestamp\n1\t2\t3\t4\n", "is the delimiter right?"),
    ("read_ml_csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,x,4\n", "line 3: rating is not a number"),
    ("read_ml_csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n", "line 3: expected 4 comma-separated"),
    ("read_recbole_ml100k", "ml-100k.inter", None, "file not found"),
    ("read_recbole_ml100k", "ml-100k.inter", "", "file is empty"),
    ("read_recbole_ml100k", "ml-100k.inter", RB_HEAD, "has no ratings"),
    ("read_recbole_ml100k", "ml-100k.inter", RB_HEAD + "1\t2\t3\t4\n1\t2\tbad\t4\n", "line 3: rating is not a number"),
    ("read_recbole_ml100k", "ml-100k.inter", "user_id item_id rating timestamp\n1 2 3 4\n", "header has no column"),
]


@pytest.mark.parametrize("reader,name,content,fragment", MALFORMED)
def test_malformed_ratings(tmp_path, reader, name, content, fragment):
    folder = tmp_path / "data"
    folder.mkdir()
    if content is not None:
        (folder / name).write_text(content)
    with pytest.raises(DataError) as exc:
        getattr(ml, reader)(folder)
    assert_one_line(exc, str(folder / name), fragment)


MALFORMED_SIDE = [
    ("read_ml100k", "u.item", "10|Toy Story (1995)|01-Jan-1995|\n", "line 1: expected 24 '|'-separated fields, found 4"),
    ("read_ml100k", "u.item", f"x|T|||u|{_flags('Drama')}\n", "line 1: movie id is not an integer: 'x'"),
    ("read_ml100k", "u.item", f"1|T|||u|{_flags('Drama').replace('1', '2')}\n", "genre flags must be 0 or 1"),
    ("read_ml100k", "u.item", "", "file is empty"),
    ("read_ml100k", "u.user", "1|24|M|technician|85711\n2\t53\tF\tother\t94043\n", "line 2: expected 5 '|'-separated fields, found 1"),
    ("read_ml100k", "u.user", "1|old|M|technician|85711\n", "line 1: age is not an integer: 'old'"),
    ("read_ml1m", "movies.dat", "1::Toy Story (1995)\n", "line 1: expected 3 '::'-separated fields, found 2"),
    ("read_ml1m", "users.dat", "1::F::1::ten::48067\n", "line 1: occupation is not an integer"),
    ("read_ml_csv", "movies.csv", "movieId,title,genres\n1,Toy Story (1995)\n", "line 2: expected 3 comma-separated fields, found 2"),
    ("read_ml_csv", "movies.csv", "movieId,title,genres\n", "has no movie rows (header only)"),
    ("read_ml_csv", "movies.csv", "id,name,genres\n1,a,b\n", "header has no column(s) ['movieId', 'title']"),
    ("read_recbole_ml100k", "ml-100k.item", RB_ITEM.replace("\t1995\tDrama", " 1995 Drama"), "line 3: expected 4 tab-separated fields, found 2"),
    ("read_recbole_ml100k", "ml-100k.user", RB_USER.replace("\t24\t", "\tyoung\t"), "line 2: age is not an integer"),
]

RATINGS_OF = {"read_ml100k": ("u.data", U_DATA), "read_ml1m": ("ratings.dat", "1::10::4::5\n"),
              "read_ml_csv": ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,5\n"),
              "read_recbole_ml100k": ("ml-100k.inter", RB_INTER)}


@pytest.mark.parametrize("reader,name,content,fragment", MALFORMED_SIDE)
def test_malformed_side_files(tmp_path, reader, name, content, fragment):
    ratings_name, ratings = RATINGS_OF[reader]
    folder = write(tmp_path / "data", {ratings_name: ratings, name: content})
    with pytest.raises(DataError) as exc:
        getattr(ml, reader)(folder)
    assert_one_line(exc, str(folder / name), fragment)


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "u.data").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        ml.read_ml100k(tmp_path)


# ---------------------------------------------------------------------------------------------------
# load_movielens: cache, fetch chain, checksums, atomic publication
# ---------------------------------------------------------------------------------------------------


def grouplens_zip(server: Path, monkeypatch, name: str = "ml-100k", members: dict | None = None,
                  md5_ok: bool = True) -> Path:
    """A fake GroupLens zip served from a file:// 'server' folder."""
    if members is None:
        members = {f"{name}/u.data": U_DATA, f"{name}/u.item": U_ITEM.encode("latin-1"),
                   f"{name}/u.user": U_USER, f"{name}/README": "readme", f"{name}/u1.base": "ignored"}
    path = zip_of(server / f"{name}.zip", members)
    monkeypatch.setattr(fetch, "GROUPLENS_BASE_URL", server.as_uri())
    monkeypatch.setattr(fetch, "GROUPLENS_MD5", {name: md5(path) if md5_ok else "0" * 32})
    return path


def fake_wheel(tmp_path: Path, monkeypatch, *, wheel_ok: bool = True, members_ok: bool = True) -> SimpleNamespace:
    """A fake RecBole wheel and a fake `pip download` that drops it in the target folder."""
    files = {"ml-100k.inter": RB_INTER.encode(), "ml-100k.item": RB_ITEM.encode(), "ml-100k.user": RB_USER.encode()}
    wheel = zip_of(tmp_path / "wheelhouse" / f"recbole-{fetch.RECBOLE_VERSION}-py3-none-any.whl", {
        **{f"{fetch.RECBOLE_MEMBER_DIR}/{n}": d for n, d in files.items()},
        "recbole/__init__.py": "",
        f"{fetch.RECBOLE_MEMBER_DIR}/ml-100k.kg": "not wanted",
    })
    monkeypatch.setattr(fetch, "RECBOLE_WHEEL_SHA256", sha256(wheel.read_bytes()) if wheel_ok else "0" * 64)
    sums = {n: sha256(d) for n, d in files.items()}
    if not members_ok:
        sums["ml-100k.item"] = "f" * 64
    monkeypatch.setattr(fetch, "RECBOLE_ML100K_SHA256", sums)
    calls = []

    def pip_download(dest):
        calls.append(dest)
        target = Path(dest) / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(fetch, "_pip_download_recbole", pip_download)
    return SimpleNamespace(path=wheel, calls=calls)


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_reads_cached_folder_without_fetching(tmp_path, monkeypatch):
    ml100k_files(tmp_path / "cache" / "ml-100k")

    def boom(*a, **k):
        raise AssertionError("must not fetch")

    monkeypatch.setattr(fetch, "fetch_grouplens", boom)
    monkeypatch.setattr(fetch, "fetch_recbole_ml100k", boom)
    d = ml.load_movielens("ml-100k", root=tmp_path / "cache")
    assert len(d.ratings) == 4 and d.name == "ml-100k"


def test_cached_recbole_files_are_read(tmp_path):
    recbole_files(tmp_path / "ml-100k")
    d = ml.ml100k(root=tmp_path, download=False)
    assert len(d.ratings) == 4 and d.items["genres"].iloc[0] == "Animation|Children's|Comedy"


def test_env_var_cache(tmp_path, monkeypatch):
    ml100k_files(tmp_path / "envcache" / "ml-100k")
    monkeypatch.setenv(fetch.DATA_ENV, str(tmp_path / "envcache"))
    assert fetch.default_cache_dir() == tmp_path / "envcache"
    assert len(ml.ml100k(download=False).ratings) == 4


def test_default_cache_dir_in_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path / ".cache" / "recsys_torch"


def test_download_false_missing_says_where(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as exc:
        ml.load_movielens("ml-100k", root=cache, download=False)
    assert_one_line(exc, str(cache / "ml-100k"), "download=False", "ml-100k.zip")
    assert cache_entries(cache) == []


def test_unknown_variant():
    with pytest.raises(ConfigError, match="unknown MovieLens variant"):
        ml.load_movielens("ml-7k")
    assert ml._variant("100k").name == "ml-100k" and ml._variant("ML_1M").name == "ml-1m"


def test_grouplens_download(tmp_path, monkeypatch, caplog):
    grouplens_zip(tmp_path / "server", monkeypatch)
    wheel = fake_wheel(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=fetch.__name__):
        d = ml.ml100k(root=cache)
    assert wheel.calls == []  # GroupLens worked: no fallback
    assert "GroupLens" in caplog.text
    assert cache_entries(cache) == ["ml-100k"]
    assert sorted(os.listdir(cache / "ml-100k")) == ["u.data", "u.item", "u.user"]
    pd.testing.assert_frame_equal(d.ratings, ml.read_ml100k(ml100k_files(tmp_path / "ref")).ratings)
    # a second call reads the cache, even with the source gone
    (tmp_path / "server" / "ml-100k.zip").unlink()
    assert len(ml.ml100k(root=cache).ratings) == 4


def test_fallback_to_recbole_when_grouplens_unreachable(tmp_path, monkeypatch, caplog):
    def unreachable(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", unreachable)
    wheel = fake_wheel(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=fetch.__name__):
        d = ml.ml100k(root=cache)
    assert len(wheel.calls) == 1
    assert "RecBole" in caplog.text and "GroupLens download failed" in caplog.text
    assert cache_entries(cache) == ["ml-100k"]
    assert sorted(os.listdir(cache / "ml-100k")) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    # the same ratings frame as GroupLens' format
    pd.testing.assert_frame_equal(d.ratings, ml.read_ml100k(ml100k_files(tmp_path / "ref")).ratings)
    assert ml.ml100k(root=cache).ratings.shape == (4, 4)
    assert len(wheel.calls) == 1  # cached now


def test_fallback_when_grouplens_checksum_mismatches(tmp_path, monkeypatch, caplog):
    grouplens_zip(tmp_path / "server", monkeypatch, md5_ok=False)
    wheel = fake_wheel(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=fetch.__name__):
        d = ml.ml100k(root=tmp_path / "cache")
    assert "MD5 mismatch" in caplog.text and len(wheel.calls) == 1
    assert (tmp_path / "cache" / "ml-100k" / "ml-100k.inter").is_file()
    assert not (tmp_path / "cache" / "ml-100k" / "u.data").exists()  # nothing of the bad zip kept
    assert len(d.ratings) == 4


def test_fallback_when_grouplens_zip_is_corrupt(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    (server / "ml-100k.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(fetch, "GROUPLENS_BASE_URL", server.as_uri())
    monkeypatch.setattr(fetch, "GROUPLENS_MD5", {"ml-100k": md5(server / "ml-100k.zip")})
    fake_wheel(tmp_path, monkeypatch)
    assert len(ml.ml100k(root=tmp_path / "cache").ratings) == 4


@pytest.mark.parametrize("wheel_ok,members_ok,fragment", [
    (False, True, "SHA-256 mismatch"),
    (True, False, "ml-100k.item: SHA-256 mismatch"),
])
def test_all_sources_fail_checksum_leaves_nothing(tmp_path, monkeypatch, wheel_ok, members_ok, fragment):
    grouplens_zip(tmp_path / "server", monkeypatch, md5_ok=False)
    fake_wheel(tmp_path, monkeypatch, wheel_ok=wheel_ok, members_ok=members_ok)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as exc:
        ml.ml100k(root=cache)
    assert_one_line(exc, "MD5 mismatch", fragment, str(cache / "ml-100k"), "by hand")
    assert cache_entries(cache) == []  # no final folder, no staging left-overs


def test_extract_recbole_checks_real_sums(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setattr(fetch, "RECBOLE_WHEEL_SHA256", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fetch.extract_recbole_ml100k(wheel.path, tmp_path)


def test_extract_recbole_missing_member(tmp_path, monkeypatch):
    wheel = zip_of(tmp_path / "recbole-1.2.1-py3-none-any.whl", {"recbole/__init__.py": ""})
    monkeypatch.setattr(fetch, "RECBOLE_WHEEL_SHA256", sha256(wheel.read_bytes()))
    with pytest.raises(DataError, match="has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        fetch.extract_recbole_ml100k(wheel, tmp_path)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_killed_fetch_leaves_no_partial_folder(tmp_path, monkeypatch, error):
    def half_written(dest):
        (Path(dest) / "ml-100k.inter").write_text(RB_INTER[:30])  # a partial file, then death
        raise error("killed")

    monkeypatch.setattr(fetch, "fetch_recbole_ml100k", half_written)
    cache = tmp_path / "cache"
    with pytest.raises((error, DataError)):
        ml.ml100k(root=cache)
    assert cache_entries(cache) == []


def test_unreadable_download_is_not_cached(tmp_path, monkeypatch):
    grouplens_zip(tmp_path / "server", monkeypatch, members={
        "ml-100k/u.data": "1\t2\tbad\t4\n", "ml-100k/u.item": U_ITEM.encode("latin-1"), "ml-100k/u.user": U_USER})
    with pytest.raises(DataError) as exc:
        ml.ml100k(root=tmp_path / "cache")
    assert_one_line(exc, "rating is not a number")
    assert cache_entries(tmp_path / "cache") == []


def test_existing_empty_folder_is_filled(tmp_path, monkeypatch):
    (tmp_path / "cache" / "ml-100k").mkdir(parents=True)
    (tmp_path / "cache" / "ml-100k" / "notes.txt").write_text("mine")
    fake_wheel(tmp_path, monkeypatch)
    assert len(ml.ml100k(root=tmp_path / "cache").ratings) == 4
    assert sorted(os.listdir(tmp_path / "cache" / "ml-100k")) == [
        "ml-100k.inter", "ml-100k.item", "ml-100k.user", "notes.txt"]
    assert cache_entries(tmp_path / "cache") == ["ml-100k"]


def test_stale_staging_folders_are_removed(tmp_path, monkeypatch):
    stale = tmp_path / "cache" / ".ml-100k-partial-deadbeef"
    stale.mkdir(parents=True)
    (stale / "u.data").write_text("1\t2")
    old = time.time() - fetch.STALE_STAGING_AGE - 60
    os.utime(stale, (old, old))
    fresh = tmp_path / "cache" / ".ml-100k-partial-running"
    fresh.mkdir()
    fake_wheel(tmp_path, monkeypatch)
    ml.ml100k(root=tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == [".ml-100k-partial-running", "ml-100k"]


def test_other_variant_download(tmp_path, monkeypatch, caplog):
    grouplens_zip(tmp_path / "server", monkeypatch, name="ml-1m", members={
        "ml-1m/ratings.dat": "1::1193::5::978300760\n2::1193::4::978298413\n",
        "ml-1m/movies.dat": "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n",
        "ml-1m/users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
        "ml-1m/README": "x",
    })
    monkeypatch.setattr(fetch, "GROUPLENS_MD5", {})  # no checksum known: logged, not verified
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=fetch.__name__):
        d = ml.movielens("ml-1m", root=cache)
    assert "not verified" in caplog.text
    assert d.name == "ml-1m" and len(d.ratings) == 2 and len(d.users) == 2
    assert sorted(os.listdir(cache / "ml-1m")) == ["movies.dat", "ratings.dat", "users.dat"]
    assert cache_entries(cache) == ["ml-1m"]


def test_ml10m_zip_folder_name_differs(tmp_path, monkeypatch):
    grouplens_zip(tmp_path / "server", monkeypatch, name="ml-10m", members={
        "ml-10M100K/ratings.dat": "1::122::4.5::838985046\n",
        "ml-10M100K/movies.dat": "122::Boomerang (1992)::Comedy|Romance\n",
        "ml-10M100K/tags.dat": "1::122::x::1\n",
    })
    d = ml.load_movielens("ml-10m", root=tmp_path / "cache")
    assert d.rating_scale == (0.5, 5.0) and d.users is None
    assert sorted(os.listdir(tmp_path / "cache" / "ml-10m")) == ["movies.dat", "ratings.dat"]


def test_other_variant_network_failure_says_where(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as exc:
        ml.load_movielens("ml-25m", root=cache)
    assert_one_line(exc, "cannot download ml-25m", "ml-25m.zip", str(cache / "ml-25m"), "ratings.csv")
    assert cache_entries(cache) == []


def test_zip_without_ratings_file(tmp_path, monkeypatch):
    grouplens_zip(tmp_path / "server", monkeypatch, name="ml-20m", members={"ml-20m/movies.csv": "a"})
    with pytest.raises(DataError, match="zip has no ratings.csv"):
        ml.load_movielens("ml-20m", root=tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------------
# pip download wrapper (subprocess faked)
# ---------------------------------------------------------------------------------------------------


# captured at import, before the autouse guard replaces it
_ORIGINAL_PIP = fetch._pip_download_recbole


def test_pip_download_command(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"], seen["kw"] = cmd, kw
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "recbole-1.2.1-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    wheel = _ORIGINAL_PIP(tmp_path)
    assert wheel == tmp_path / "recbole-1.2.1-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "recbole==1.2.1" in cmd
    assert "install" not in cmd
    assert seen["kw"]["timeout"] == fetch.PIP_TIMEOUT


def test_pip_download_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "WARNING: x\nERROR: Could not find a version that satisfies the requirement recbole==1.2.1\n"))
    with pytest.raises(DataError, match="failed: ERROR: Could not find a version"):
        _ORIGINAL_PIP(tmp_path)

    def timeout(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(fetch.subprocess, "run", timeout)
    with pytest.raises(DataError, match="timed out"):
        _ORIGINAL_PIP(tmp_path)

    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(DataError, match="left no wheel"):
        _ORIGINAL_PIP(tmp_path)


# ---------------------------------------------------------------------------------------------------
# A damaged copy of the real ml-100k in the cache (fake files, which start otherwise, are not checked)
# ---------------------------------------------------------------------------------------------------

# how the real files start (the first ratings of ml-100k, in both formats)
REAL_INTER_START = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n"
REAL_U_DATA_START = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n"


def test_truncated_cached_recbole_file_is_refused(tmp_path):
    """A cut-off ml-100k.inter trained silently on the ratings it still had (50,700 of 100,000)."""
    inter = REAL_INTER_START + b"22\t377\t1\t878887116\n244\t51"
    folder = write(tmp_path / "ml-100k", {"ml-100k.inter": inter, "ml-100k.item": RB_ITEM, "ml-100k.user": RB_USER})
    with pytest.raises(DataError) as exc:
        ml.ml100k(root=tmp_path, download=False)
    assert str(exc.value) == (f"{folder / 'ml-100k.inter'}: the cached copy of ml-100k is damaged (SHA-256 mismatch, "
                              f"{len(inter)} bytes: truncated or changed); delete the folder {folder} "
                              "to download it again")


@pytest.mark.parametrize("cut", [1, 30, len(REAL_INTER_START) - 1])
def test_cached_recbole_file_cut_inside_its_first_lines_is_refused(tmp_path, cut):
    write(tmp_path / "ml-100k", {"ml-100k.inter": REAL_INTER_START[:cut], "ml-100k.item": RB_ITEM,
                                 "ml-100k.user": RB_USER})
    with pytest.raises(DataError, match="the cached copy of ml-100k is damaged"):
        ml.ml100k(root=tmp_path, download=False)


def test_whole_cached_recbole_files_are_checked_and_read(tmp_path, monkeypatch):
    """The side files are checked too, and a missing one is damage; with the sums of these (fake)
    files, the folder reads as usual."""
    inter = REAL_INTER_START + b"22\t377\t1\t878887116\n"
    folder = write(tmp_path / "ml-100k", {"ml-100k.inter": inter, "ml-100k.item": RB_ITEM, "ml-100k.user": RB_USER})
    sums = {n: sha256((folder / n).read_bytes()) for n in fetch.RECBOLE_ML100K_SHA256}
    monkeypatch.setattr(fetch, "RECBOLE_ML100K_SHA256", sums)
    assert len(ml.ml100k(root=tmp_path, download=False).ratings) == 2
    (folder / "ml-100k.user").write_text(RB_USER[:-30])
    with pytest.raises(DataError, match=r"ml-100k\.user: the cached copy of ml-100k is damaged \(SHA-256 mismatch"):
        ml.ml100k(root=tmp_path, download=False)
    (folder / "ml-100k.user").unlink()
    with pytest.raises(DataError, match=r"ml-100k\.user: the cached copy of ml-100k is damaged \(missing\)"):
        ml.ml100k(root=tmp_path, download=False)


def test_truncated_cached_grouplens_file_is_refused(tmp_path, monkeypatch):
    folder = write(tmp_path / "ml-100k", {"u.data": REAL_U_DATA_START + b"22\t377\t1\t878887116\n",
                                          "u.item": U_ITEM.encode("latin-1"), "u.user": U_USER})
    with pytest.raises(DataError) as exc:
        ml.load_movielens("ml-100k", root=tmp_path)  # not downloaded again: the user decides
    assert str(exc.value) == (f"{folder / 'u.data'}: the cached copy of ml-100k is damaged (3 rows, the real file "
                              f"has 100,000); delete the folder {folder} to download it again")
    monkeypatch.setattr(fetch, "ML100K_ROWS", {"u.data": 3, "u.item": 4, "u.user": 3})  # these files, whole
    assert len(ml.ml100k(root=tmp_path, download=False).ratings) == 3
    (folder / "u.item").write_bytes("".join(U_ITEM.splitlines(keepends=True)[:3]).encode("latin-1"))
    with pytest.raises(DataError, match=r"u\.item: the cached copy of ml-100k is damaged \(3 rows, the real file has 4\)"):
        ml.ml100k(root=tmp_path, download=False)


def test_the_real_cache_if_present_passes_its_check():
    folder = fetch.default_cache_dir() / "ml-100k"
    if not folder.is_dir():
        pytest.skip("no ml-100k in the data cache")
    fetch.check_cached_ml100k(folder)
