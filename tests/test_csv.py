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
    with pytest.raises(DataError, match=r"ratings file .*r\.csv: 1 row\(s\) do not have the header's 3 fields "
                                        r"\(first at row 1, line 3: 5 fields\)$"):
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


# --- a row whose number of fields is not the header's: never shifted columns or filled-up rows --------------

FIELD_COUNTS = {
    # name: (file name, text, count of bad rows, first bad row, its line, its fields, header fields)
    "header one name short": ("r.csv", "user,item,rating\n1,10,4,881250949\n2,20,3,891717742\n", 2, 0, 2, 4, 3),
    "tsv header short": ("r.tsv", "user\titem\trating\n1\t10\t4\t5\n", 1, 0, 2, 4, 3),
    "a later row too long": ("r.csv", "user,item,rating\n1,10,4\n2,20,3\n3,30,2,1\n", 1, 2, 4, 4, 3),
    "a row too short": ("r.csv", "user,item,rating,timestamp\n1,10,4,5\n2,20,3\n", 1, 1, 3, 3, 4),
    "short row, last column an id": ("r.csv", "rating,user,item\n4,1,10\n3,2\n", 1, 1, 3, 2, 3),
    "blank lines and quoted newlines count as lines": (
        "r.csv", 'user,item,rating\n\n"a\nb",10,4\n\n2,20\n', 1, 1, 6, 2, 3),
    "sniffed delimiter": ("r.txt", "user;item;rating\n1;10;4\n2;20;3;7\n", 1, 1, 3, 4, 3),
    "sniffed, header short": ("r.txt", "user;item;rating\n1;10;4;7\n", 1, 0, 2, 4, 3),
}


@pytest.mark.parametrize("case", list(FIELD_COUNTS))
def test_rows_must_have_the_headers_number_of_fields(tmp_path, case):
    """A header with fewer names than the rows have fields made pandas take the first column as the
    index and shift the others (user -> index, item -> user, rating -> item, timestamp -> rating: a
    test RMSE of 27 million); a short row was filled up with missing cells."""
    name, text, n_bad, row, line, fields, header = FIELD_COUNTS[case]
    path = write(tmp_path / name, text)
    message = (f"ratings file {path}: {n_bad} row(s) do not have the header's {header} fields "
               f"(first at row {row}, line {line}: {fields} fields)")
    with pytest.raises(DataError) as exc:
        csv(path, columns={"timestamp": "timestamp"} if header == 4 else None)
    assert str(exc.value) == message


def test_quoted_delimiters_and_empty_cells_are_not_extra_or_missing_fields(tmp_path):
    items = write(tmp_path / "items.csv", 'item,title,year\n10,"Heat, the film",1995\n20,"Up",\n')
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,20,3\n")
    data = encode(csv(ratings, items=items, item_title="title", item_features={"year": "numeric"}))
    assert data.item_titles == ["Heat, the film", "Up"]
    assert data.item_features.dense[:, 0].tolist() == [0.0, 0.0]  # one value, and one missing (the mean)


# --- ids are text: only an empty cell is a missing id -------------------------------------------------------

NA_LIKE = ["NA", "null", "None", "nan", "N/A", "NULL", "n/a", "#N/A", "<NA>", "NaN", "-nan"]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_ids_spelled_like_missing_values_are_ids(tmp_path, suffix, sep):
    rows = "".join(f"{u}{sep}{i}{sep}4\n" for u, i in zip(NA_LIKE, ["x"] + NA_LIKE[:-1]))
    ratings = write(tmp_path / f"r{suffix}", f"user{sep}item{sep}rating\n{rows}")
    items = write(tmp_path / f"items{suffix}", f"item{sep}genre\n" + "".join(f"{i}{sep}g{i}\n" for i in NA_LIKE))
    data = encode(csv(ratings, items=items, item_features={"genre": "categorical"}))
    assert sorted(data.interactions.user_ids) == sorted(NA_LIKE)
    assert sorted(data.interactions.item_ids) == sorted(["x"] + NA_LIKE[:-1])
    assert data.report["n_item_feature_rows_unknown"] == 1  # "-nan" rated nothing; "NA" found its row
    assert data.item_features.names_of(list(data.interactions.item_ids).index("NA")) == ["genre=gNA"]


def test_an_empty_id_cell_is_still_an_empty_id(tmp_path):
    raw = csv(write(tmp_path / "r.csv", "user,item,rating\nNA,10,4\n  ,20,3\n"))
    with pytest.raises(DataError, match=r"r\.csv: 1 rating row\(s\) have an empty user or item id \(first at row 1\)"):
        encode(raw)


def test_parquet_ids_spelled_like_missing_values_are_ids_and_nulls_are_empty(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user": ["NA", "null", "None"], "item": ["nan", "N/A", "x"], "rating": [4.0, 3.0, 5.0]}).to_parquet(path)
    assert sorted(encode(csv(str(path))).interactions.user_ids) == ["NA", "None", "null"]
    pd.DataFrame({"user": ["NA", None], "item": ["x", "y"], "rating": [4.0, 3.0]}).to_parquet(path)
    with pytest.raises(DataError, match=r"1 rating row\(s\) have an empty user or item id \(first at row 1\)"):
        encode(csv(str(path)))


def test_missing_values_in_other_columns_are_still_missing(tmp_path):
    raw = csv(write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,10,NA\n"))
    with pytest.raises(DataError, match=r"1 rating\(s\) are not finite numbers \(first at row 1: nan\)"):
        encode(raw)


# --- values: checked as the float32 they become ---------------------------------------------------------------


@pytest.mark.parametrize("scale", [[float("nan"), 5], [1, float("inf")], [1, 1e39], [-1e39, 5], ["a", 5], "15", 5])
def test_rating_scale_must_be_two_finite_float32_numbers(tmp_path, scale):
    path = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n")
    with pytest.raises(DataError, match=r"^data.rating_scale must be \[low, high\]") as exc:
        csv(path, rating_scale=scale)
    assert "\n" not in str(exc.value)


def test_numeric_feature_column_with_text_names_the_file_column_and_row(tmp_path):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,20,3\n")
    items = write(tmp_path / "items.csv", "item,year\n10,1995\n20,nineteen\n30,x\n")
    raw = csv(ratings, items=items, item_features={"year": "numeric"})
    with pytest.raises(DataError) as exc:
        encode(raw)
    assert str(exc.value) == (f"item file {items}: numeric feature column 'year' has 2 cell(s) that are not finite "
                              "numbers (first at row 1: 'nineteen')")


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e39", "0x1F", "1,5"])
def test_numeric_feature_cells_that_are_no_float32(tmp_path, cell):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,20,3\n")
    items = write(tmp_path / "items.tsv", f"item\tyear\n10\t1995\n20\t{cell}\n")
    with pytest.raises(DataError, match=r"items\.tsv: numeric feature column 'year' has 1 cell\(s\) that are not "
                                        r"finite numbers \(first at row 1: "):
        encode(csv(ratings, items=items, item_features={"year": "numeric"}))


def test_empty_numeric_feature_cells_are_the_mean_and_counted(tmp_path, caplog):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,10,4\n2,20,3\n1,30,3\n")
    items = write(tmp_path / "items.csv", "item,year\n10,1990\n20,\n30,2000\n")
    with caplog.at_level("INFO"):
        data = encode(csv(ratings, items=items, item_features={"year": "numeric"}))
    assert data.item_features.dense[:, 0].tolist() == [-1.0, 0.0, 1.0]
    assert f"item file {items}: numeric column 'year': 1 of 3 cell(s) are empty" in caplog.text


# --- feature tables whose ids do not match the ratings' --------------------------------------------------------


def test_feature_table_naming_no_rated_id_is_an_error(tmp_path):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,1,4\n2,2,3\n")
    items = write(tmp_path / "items.csv", "item,genre\n001,a\n002,b\n")  # zero-padded: "001" is not "1"
    with pytest.raises(DataError) as exc:
        encode(csv(ratings, items=items, item_features={"genre": "categorical"}))
    assert str(exc.value) == (f"item file {items}: none of its 2 row(s) names an item with ratings (its ids: "
                              "['001', '002']; rated items: ['1', '2']): are the ids written the same way in both files?")
    users = write(tmp_path / "users.csv", "user,age\nu1,20\n")
    with pytest.raises(DataError, match=r"user file .*users\.csv: none of its 1 row\(s\) names a user with ratings"):
        encode(csv(ratings, users=users, user_features={"age": "numeric"}))


def test_feature_table_matching_some_ids_says_how_many_do_not(tmp_path, caplog):
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,1,4\n2,2,3\n2,3,3\n")
    items = write(tmp_path / "items.csv", "item,genre\n1,a\n002,b\n003,c\n")
    with caplog.at_level("WARNING"):
        data = encode(csv(ratings, items=items, item_features={"genre": "categorical"}))
    assert data.report["n_item_feature_rows_unknown"] == 2
    assert ("r.csv: 2 item feature row(s) name items with no ratings; ignored; 2 of the 3 rated items have no "
            "feature row") in caplog.text
