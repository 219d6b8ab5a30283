"""`data=csv`: ratings and feature tables from csv, tsv and parquet files, and malformed files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys_torch.data import encode
from recsys_torch.data.tabular import csv, read_table
from recsys_torch.errors import DataError

ROWS = [("u1", 10, 4.0, 881250949), ("u2", 20, 3.0, 891717742), ("u1", 30, 5.0, 878887116)]
FRAME = pd.DataFrame(ROWS, columns=["userId", "movieId", "stars", "when"])
COLUMNS = {"user": "userId", "item": "movieId", "rating": "stars", "timestamp": "when"}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def check_loaded(raw):
    inter = encode(raw).interactions
    assert len(inter) == 3
    assert list(inter.user_ids) == ["u1", "u2"] and list(inter.item_ids) == ["10", "20", "30"]
    assert inter.ratings.tolist() == [4.0, 3.0, 5.0]
    assert inter.timestamps.tolist() == [881250949, 891717742, 878887116]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t"), (".txt", ";"), (".dat", "|")])
def test_delimited_files(tmp_path, suffix, sep):
    path = tmp_path / f"ratings{suffix}"
    FRAME.to_csv(path, sep=sep, index=False)
    raw = csv(str(path), columns=COLUMNS)
    assert list(raw.ratings.columns) == ["user", "item", "rating", "timestamp"]
    assert raw.name == path.name
    check_loaded(raw)


def test_parquet(tmp_path):
    path = tmp_path / "ratings.parquet"
    FRAME.to_parquet(path)
    check_loaded(csv(str(path), columns=COLUMNS))


def test_explicit_separator_overrides_the_suffix(tmp_path):
    path = write(tmp_path / "ratings.csv", "userId;movieId;stars;when\n" + "".join(
        f"{u};{i};{r};{t}\n" for u, i, r, t in ROWS))
    check_loaded(csv(path, columns=COLUMNS, sep=";"))


def test_default_column_names_and_no_timestamp(tmp_path):
    path = write(tmp_path / "r.csv", "user, item, rating\n1, 10, 4\n2, 10, 3\n")  # spaces after commas
    raw = csv(path, rating_scale=[1, 5], name="mine")
    assert list(raw.ratings.columns) == ["user", "item", "rating"]
    assert raw.rating_scale == (1.0, 5.0) and raw.name == "mine"
    inter = encode(raw).interactions
    assert inter.timestamps is None and inter.ratings.tolist() == [4.0, 3.0]


def test_feature_tables(tmp_path):
    ratings = tmp_path / "ratings.csv"
    FRAME.to_csv(ratings, index=False)
    # item 40 has no ratings; item 20 has no row; an empty id cell makes pandas read the ids as floats
    items = write(tmp_path / "movies.csv", "movieId,name,genres,year,junk\n10,Heat,Crime|Drama,1995,x\n"
                                           "30,Up,Animation,2009,y\n40,Old,Drama,1950,z\n,Nameless,Drama,2000,w\n")
    users = write(tmp_path / "users.tsv", "uid\tgender\nu1\tF\nu2\tM\n")
    raw = csv(str(ratings), columns=COLUMNS, items=items, item_id="movieId", item_title="name",
              item_features={"genres": "multi:|", "year": "numeric"},
              users=users, user_id="uid", user_features={"gender": "categorical"})
    assert "junk" not in raw.items.columns  # only the named columns are kept
    data = encode(raw)
    assert data.item_titles == ["Heat", "20", "Up"]
    assert data.report["n_item_feature_rows_unknown"] == 2  # item 40 and the row without an id
    f = data.item_features
    assert f.present.tolist() == [True, False, True]
    assert f.names_of(0) == ["genres=Crime", "genres=Drama"] and f.names_of(2) == ["genres=Animation"]
    assert f.dense_names == ["year"]
    assert data.user_features.names_of(0) == ["gender=F"] and data.user_features.names_of(1) == ["gender=M"]


# --- malformed files: one clear DataError each -------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"ratings file not found: {tmp_path}/nope.csv"):
        csv(str(tmp_path / "nope.csv"))


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a file"):
        csv(str(tmp_path))


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="ratings file is empty"):
        csv(write(tmp_path / "r.csv", ""))


def test_header_without_rows(tmp_path):
    with pytest.raises(DataError, match="has a header but no rows"):
        csv(write(tmp_path / "r.csv", "user,item,rating\n"))


def test_ragged_rows(tmp_path):
    with pytest.raises(DataError, match=r"cannot read ratings file .*r\.csv: .*Expected 3 fields in line 3, saw 5"):
        csv(write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,20,3,9,9\n"))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "r.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read ratings file"):
        csv(str(path))


def test_binary_garbage_as_csv(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"user,item,rating\n\xff\xfe\x00\x81,1,2\n")
    with pytest.raises(DataError, match="cannot read ratings file"):
        csv(str(path))


def test_missing_column_names_the_columns(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,score\n1,10,4\n")
    with pytest.raises(DataError, match=r"has no column 'rating' for rating; columns are \['user', 'item', 'score'\]$"):
        csv(path)


def test_wrong_delimiter_gets_a_hint(tmp_path):
    path = write(tmp_path / "r.csv", "user;item;rating\n1;10;4\n")
    with pytest.raises(DataError, match="only one column was found: is the delimiter right"):
        csv(path)


def test_unknown_columns_key(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n")
    with pytest.raises(DataError, match=r"data.columns has unknown key\(s\) \['score'\]"):
        csv(path, columns={"score": "rating"})


@pytest.mark.parametrize("scale", [[5, 1], [3, 3], [1, 3, 5]])
def test_bad_rating_scale(tmp_path, scale):
    path = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n")
    with pytest.raises(DataError, match="data.rating_scale must be"):
        csv(path, rating_scale=scale)


def test_missing_feature_column_in_item_file(tmp_path):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n")
    items = write(tmp_path / "items.csv", "item,genres\n10,a\n")
    with pytest.raises(DataError, match=r"item file .*items\.csv has no column 'year'"):
        csv(ratings, items=items, item_features={"year": "numeric"})


def test_missing_item_file(tmp_path):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n")
    with pytest.raises(DataError, match="item file not found"):
        csv(ratings, items=str(tmp_path / "items.csv"))


@pytest.mark.parametrize("cell", ["", "four", "inf"])
def test_bad_rating_cell_fails_at_encoding(tmp_path, cell):
    raw = csv(write(tmp_path / "r.csv", f"user,item,rating\n1,10,4\n2,10,{cell}\n"))
    with pytest.raises(DataError, match=r"r\.csv: 1 rating\(s\) are not finite numbers"):
        encode(raw)


def test_read_table_strips_header_spaces(tmp_path):
    frame = read_table(write(tmp_path / "t.tsv", " a \t b\n1\t2\n"))
    assert list(frame.columns) == ["a", "b"]



def test_undetectable_delimiter_is_a_data_error(tmp_path, monkeypatch):
    """The python engine's sniffer (sep=None, for files neither .csv nor .tsv) can raise csv.Error
    (hypothesis found such a file in tests/test_fuzz.py); the user must get a DataError."""
    import csv as _csv

    import pandas as pd

    from recsys_torch.data import tabular

    def sniff_fails(*args, **kwargs):
        raise _csv.Error("Could not determine delimiter")

    path = tmp_path / "ratings.txt"
    path.write_text("user item rating\n1 2 3\n")
    monkeypatch.setattr(pd, "read_csv", sniff_fails)
    with pytest.raises(DataError, match="cannot read ratings file .*Could not determine delimiter"):
        tabular.read_table(path)
