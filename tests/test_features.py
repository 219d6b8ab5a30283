"""Feature tables: categorical / numeric / multi:SEP columns, missing and unknown entities."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from torch import nn

from recsys_torch.data import encode
from recsys_torch.data.features import Features, build_features, parse_spec
from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import DataError

RATINGS = pd.DataFrame({"user": [1, 1, 2, 3], "item": ["a", "b", "c", "a"], "rating": [1.0, 2.0, 3.0, 4.0]})
# items a, b have rows; c has none; zz and zz2 have no ratings (their values must not enter the vocab)
ITEMS = pd.DataFrame({
    "item": ["a", "b", "zz", "zz2"],
    "title": ["Alpha", "Beta", "Zed", "Zed 2"],
    "genres": ["g1| g2", "g2", "g7", "g8"],
    "era": ["80s", "90s", "70s", None],
    "quality": [1.0, 3.0, 100.0, 5.0],
})
ITEM_SPEC = {"genres": "multi:|", "era": "categorical", "quality": "numeric"}


def encoded(items=ITEMS, spec=ITEM_SPEC, **kwargs):
    return encode(RawDataset(RATINGS, items=items, item_spec=spec, name="toy", **kwargs))


def code(data, raw_item):
    return list(data.interactions.item_ids).index(raw_item)


def bag(features: Features, entity: int) -> dict[str, float]:
    """Feature name -> weight of one entity's bag (padding left out)."""
    out: dict[str, float] = {}
    for fid, w in zip(features.index[entity].tolist(), features.weight[entity].tolist()):
        if fid != 0:
            out[features.vocab[fid]] = out.get(features.vocab[fid], 0.0) + w
    return out


def test_each_kind_of_column():
    data = encoded()
    f = data.item_features
    a, b = code(data, "a"), code(data, "b")
    # multi-valued genres share a weight of one per entity, spaces around tokens are stripped
    assert bag(f, a) == {"genres=g1": 0.5, "genres=g2": 0.5, "era=80s": 1.0}
    assert bag(f, b) == {"genres=g2": 1.0, "era=90s": 1.0}
    assert f.names_of(a) == ["genres=g1", "genres=g2", "era=80s"]
    # numeric columns standardized over the known rows (1 and 3: mean 2, std 1)
    assert f.dense_names == ["quality"]
    assert f.dense[a].tolist() == [-1.0] and f.dense[b].tolist() == [1.0]
    assert f.index.dtype == torch.int64 and f.weight.dtype == f.dense.dtype == torch.float32


def test_entity_without_a_feature_row_gets_an_empty_bag():
    data = encoded()
    f = data.item_features
    c = code(data, "c")
    assert f.n_entities == data.n_items == 3
    assert f.present.tolist() == [True, True, False]
    assert f.index[c].eq(0).all() and f.weight[c].eq(0).all()
    assert f.dense[c].tolist() == [0.0]  # the mean, after standardizing
    assert f.names_of(c) == []


def test_rows_of_unknown_ids_are_dropped_and_counted():
    data = encoded()
    assert data.report["n_item_feature_rows_unknown"] == 2
    vocab = set(data.item_features.vocab)
    assert {"genres=g7", "genres=g8", "era=70s"}.isdisjoint(vocab)
    assert data.item_features.vocab[0] == "<pad>"
    assert data.item_features.n_vocab == len(vocab) == 5


def test_titles_fall_back_to_the_raw_id():
    data = encoded(item_title="title")
    assert data.item_titles == ["Alpha", "Beta", "c"]


def test_missing_title_column():
    with pytest.raises(DataError, match="no title column 'name'"):
        encoded(item_title="name")


def test_missing_numeric_and_categorical_values():
    items = pd.DataFrame({"item": ["a", "b", "c"], "era": ["80s", None, "80s"], "quality": [2.0, None, 4.0]})
    data = encoded(items, {"era": "categorical", "quality": "numeric"})
    f = data.item_features
    b = code(data, "b")
    assert bag(f, b) == {} and bool(f.present[b])  # a row with nothing in it is still present
    assert f.dense[:, 0].tolist() == [-1.0, 0.0, 1.0]


def test_other_separator_and_repeated_rows():
    items = pd.DataFrame({"item": ["a", "a", "b"], "tags": ["x;y", "x;y;z", ";;"]})
    data = encoded(items, {"tags": "multi:;"})
    f = data.item_features
    third = pytest.approx(1 / 3)
    assert bag(f, code(data, "a")) == {"tags=x": third, "tags=y": third, "tags=z": third}  # the last row wins
    assert bag(f, code(data, "b")) == {}


def test_user_features():
    users = pd.DataFrame({"user": [1, 2, 99], "gender": ["F", "M", "F"], "age": [20, 40, 60]})
    data = encode(RawDataset(RATINGS, users=users, user_spec={"gender": "categorical", "age": "numeric"}))
    f = data.user_features
    assert data.report["n_user_feature_rows_unknown"] == 1
    assert f.present.tolist() == [True, True, False]
    assert bag(f, 0) == {"gender=F": 1.0} and bag(f, 1) == {"gender=M": 1.0}
    assert f.dense[:, 0].tolist() == [-1.0, 1.0, 0.0]
    assert data.item_features is None


def test_bags_feed_embedding_bag():
    f = encoded().item_features
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(f.n_vocab, 4, mode="sum", padding_idx=0)
    out = emb(f.index, per_sample_weights=f.weight)
    w = emb.weight.detach()
    v = {name: w[i] for i, name in enumerate(f.vocab)}
    torch.testing.assert_close(out[0], 0.5 * v["genres=g1"] + 0.5 * v["genres=g2"] + v["era=80s"])
    torch.testing.assert_close(out[2], torch.zeros(4))


def test_state_round_trips_through_a_safe_load():
    f = encoded().item_features
    buffer = io.BytesIO()
    torch.save(f.state(), buffer)
    buffer.seek(0)
    back = Features.from_state(torch.load(buffer, weights_only=True))
    for name in ("index", "weight", "dense", "present"):
        assert torch.equal(getattr(back, name), getattr(f, name))
    assert back.vocab == f.vocab and back.dense_names == f.dense_names


@pytest.mark.parametrize("kind", ["text", "multi:", "Categorical", ""])
def test_unknown_kind(kind):
    with pytest.raises(DataError, match=f"feature column 'era': unknown kind '{kind}'"):
        encoded(spec={"era": kind})


def test_parse_spec():
    assert parse_spec("multi:|", "g") == ("multi", "|")
    assert parse_spec("multi:, ", "g") == ("multi", ", ")
    assert parse_spec("numeric", "g") == ("numeric", None)


def test_spec_names_a_missing_column():
    with pytest.raises(DataError, match=r"item feature table has no column\(s\) \['year'\]"):
        encoded(spec={"year": "numeric"})


def test_table_without_its_id_column():
    with pytest.raises(DataError, match="no id column 'item'"):
        build_features(ITEMS.rename(columns={"item": "movie"}), "item", {}, {"a": 0}, 1)


def test_no_feature_columns_gives_presence_only():
    f, dropped = build_features(ITEMS, "item", {}, {"a": 0, "b": 1, "c": 2}, 3)
    assert dropped == 2
    assert f.index.shape == (3, 1) and f.index.eq(0).all()
    assert f.n_dense == 0 and f.present.tolist() == [True, True, False]


# --- numeric columns hold float32 numbers or nothing ---------------------------------------------------------


@pytest.mark.parametrize("bad, shown", [("abc", "'abc'"), ("12 apples", "'12 apples'"), (float("inf"), "inf"),
                                        (1e39, "1e+39"), ("-1e39", "'-1e39'"), ("True", "'True'")])
def test_numeric_column_cells_that_are_not_float32_numbers_are_errors(bad, shown):
    """A text column declared numeric used to become all zeros without a word."""
    items = pd.DataFrame({"item": ["a", "b", "c"], "quality": [1.0, bad, 2.0]})
    with pytest.raises(DataError) as exc:
        encoded(items, {"quality": "numeric"})
    assert str(exc.value) == (f"toy: item feature table: numeric feature column 'quality' has 1 cell(s) that are "
                              f"not finite numbers (first at row 1: {shown})")


def test_numeric_text_cells_and_missing_ones(caplog):
    items = pd.DataFrame({"item": ["a", "b", "c", "zz"], "quality": [" 1 ", "", "3", None]})
    with caplog.at_level("INFO", logger="recsys_torch.data.features"):
        f = encoded(items, {"quality": "numeric"}).item_features
    assert f.dense[:, 0].tolist() == [-1.0, 0.0, 1.0]  # b is empty: the mean; zz has no ratings
    assert "toy: item feature table: numeric column 'quality': 1 of 3 cell(s) are empty" in caplog.text


def test_bad_numeric_cell_in_a_row_of_an_unknown_item_is_still_an_error():
    items = pd.DataFrame({"item": ["a", "zz"], "quality": [1.0, "n/a?"]})
    with pytest.raises(DataError, match=r"first at row 1: 'n/a\?'"):
        encoded(items, {"quality": "numeric"})


# --- feature tables that match none, or only some, of the rated ids -----------------------------------------


def test_a_table_none_of_whose_ids_is_rated_is_an_error():
    items = pd.DataFrame({"item": ["A", "B"], "era": ["80s", "90s"]})  # the ratings say a, b, c
    with pytest.raises(DataError, match=r"^toy: item feature table: none of its 2 row\(s\) names an item with ratings "
                                        r"\(its ids: \['A', 'B'\]; rated items: \['a', 'b', 'c'\]\)"):
        encoded(items, {"era": "categorical"})


def test_rated_ids_without_a_row_are_counted_in_the_log(caplog):
    with caplog.at_level("WARNING", logger="recsys_torch.data.dataset"):
        encoded()  # a and b have rows, c has none; zz and zz2 are unknown
    assert "toy: 2 item feature row(s) name items with no ratings; ignored; 1 of the 3 rated items have no feature row" \
        in caplog.text
    caplog.clear()
    items = ITEMS[ITEMS["item"].isin(["a", "b"])]
    with caplog.at_level("WARNING", logger="recsys_torch.data.dataset"):
        encoded(items)
    assert "toy: 1 of the 3 rated items have no feature row" in caplog.text
