"""Bad input and unsafe files, through the real command line (``recsys_torch.train.main``, run in
process): every user error is one line ``error: ...`` on stderr with exit status 2 (Hydra's own
override errors: exit 1, no traceback), and the run folder gets no metrics.json, checkpoint.pt or
last.pt. Odd but valid input (duplicates, odd ids, feature rows of unknown items) trains, and what
was dropped is counted in metrics.json."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO
from recsys_torch import train as entry
from recsys_torch.data.synthetic import synthetic
from recsys_torch.errors import CheckpointError, OutputError
from recsys_torch.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from recsys_torch.io import atomic_torch_save

RUN = ["trainer.epochs=1", "trainer.progress=false", "trainer.num_threads=1", "trainer.device=cpu", "logger=none"]
OUTPUTS = ("metrics.json", "checkpoint.pt", "last.pt")


def cli(monkeypatch, capsys, run_dir, *overrides) -> tuple[int, str]:
    """``python scripts/train.py ...`` in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *RUN, f"hydra.run.dir={run_dir}", *overrides])
    code = 0
    try:
        entry.main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """500 ratings of 40 users on 30 items, with timestamps."""
    return synthetic(n_users=40, n_items=30, n_ratings=500, seed=1).ratings


def write(folder, frame: pd.DataFrame, name="ratings.csv", sep=",") -> str:
    path = folder / name
    frame.to_csv(path, sep=sep, index=False)
    return str(path)


def with_cell(frame, row, column, value) -> pd.DataFrame:
    out = frame.astype({column: object})
    out.loc[row, column] = value
    return out


def assert_nothing_written(run_dir):
    left = [name for name in OUTPUTS if (run_dir / name).exists()]
    left += [name for name in os.listdir(run_dir) if name.startswith(".tmp-")] if run_dir.exists() else []
    assert not left, f"a failed run left {left}"


def assert_user_error(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(fragment, lines[0]), lines[0]


# --- bad ratings files ------------------------------------------------------------------------------------


def bad_file(kind, tmp_path, frame):
    """(ratings path, extra overrides) of one kind of bad input."""
    if kind == "missing":
        return str(tmp_path / "nowhere.csv"), []
    if kind == "empty":
        (tmp_path / "empty.csv").write_bytes(b"")
        return str(tmp_path / "empty.csv"), []
    if kind == "header only":
        (tmp_path / "head.csv").write_text("user,item,rating\n")
        return str(tmp_path / "head.csv"), []
    if kind == "binary garbage":
        (tmp_path / "junk.csv").write_bytes(bytes(range(256)) * 8)
        return str(tmp_path / "junk.csv"), []
    if kind == "wrong delimiter":
        return write(tmp_path, frame, sep=";"), []
    if kind == "misnamed column":
        return write(tmp_path, frame), ["data.columns.rating=stars"]
    if kind == "duplicates refused":
        return write(tmp_path, pd.concat([frame, frame.iloc[:3]])), ["data.duplicates=error"]
    if kind == "unknown duplicates policy":
        return write(tmp_path, frame), ["data.duplicates=newest"]
    if kind == "outside the scale":
        return write(tmp_path, with_cell(frame, 7, "rating", 7)), ["data.rating_scale=[1,5]"]
    if kind == "empty id":
        return write(tmp_path, with_cell(frame, 4, "user", "")), []
    if kind == "unreadable timestamp":
        return write(tmp_path, with_cell(frame, 2, "timestamp", "yesterday")), ["data.columns.timestamp=timestamp"]
    value = {"non-numeric rating": "abc", "NaN rating": "nan", "empty rating": "", "infinite rating": "inf"}[kind]
    return write(tmp_path, with_cell(frame, 5, "rating", value)), []


BAD_FILES = {
    "missing": r"ratings file not found: .*nowhere\.csv",
    "empty": r"ratings file is empty: .*empty\.csv",
    "header only": r"ratings file has a header but no rows: .*head\.csv",
    "binary garbage": r"(cannot read ratings file|has no column 'user').*junk\.csv",
    "wrong delimiter": r"has no column 'user' for user; columns are \['user;item;rating;timestamp'\] "
                       r"\(only one column was found: is the delimiter right\?\)",
    "misnamed column": r"ratings file .*ratings\.csv has no column 'stars' for rating; columns are "
                       r"\['user', 'item', 'rating', 'timestamp'\]",
    "non-numeric rating": r"ratings\.csv: 1 rating\(s\) are not finite numbers \(first at row 5: 'abc'\)",
    "NaN rating": r"ratings\.csv: 1 rating\(s\) are not finite numbers \(first at row 5: nan\)",
    "empty rating": r"ratings\.csv: 1 rating\(s\) are not finite numbers \(first at row 5",
    "infinite rating": r"ratings\.csv: 1 rating\(s\) are not finite numbers \(first at row 5: inf\)",
    "outside the scale": r"ratings\.csv: 1 rating\(s\) fall outside the declared scale \[1\.0, 5\.0\] "
                         r"\(first at row 7: 7\.0\)",
    "duplicates refused": r"ratings\.csv: 6 rows repeat a \(user, item\) pair \(e\.g\. user \d+, item \d+\)",
    "unknown duplicates policy": r"unknown duplicates policy 'newest'",
    "empty id": r"ratings\.csv: 1 rating row\(s\) have an empty user or item id \(first at row 4\)",
    "unreadable timestamp": r"ratings\.csv: 1 timestamp\(s\) could not be read \(first at row 2: 'yesterday'\)",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_ratings_file_is_one_line_and_exit_2(kind, tmp_path, frame, monkeypatch, capsys):
    path, extra = bad_file(kind, tmp_path, frame)
    run = tmp_path / "run"
    code, err = cli(monkeypatch, capsys, run, "data=csv", f"data.ratings={path}", *extra)
    assert_user_error(code, err, BAD_FILES[kind])
    assert_nothing_written(run)


def test_bad_feature_table(tmp_path, frame, monkeypatch, capsys):
    path = write(tmp_path, frame)
    items = write(tmp_path, pd.DataFrame({"item": range(30), "genre": ["a"] * 30}), "items.csv")
    code, err = cli(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}",
                    f"data.items={items}", "+data.item_features.colour=categorical")
    assert_user_error(code, err, r"item file .*items\.csv has no column 'colour' for colour")
    code, err = cli(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}",
                    f"data.items={items}", "+data.item_features.genre=color")
    assert_user_error(code, err, r"feature column 'genre': unknown kind 'color'")
    code, err = cli(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}",
                    f"data.items={tmp_path / 'no_items.csv'}")
    assert_user_error(code, err, r"item file not found: .*no_items\.csv")
    assert_nothing_written(tmp_path / "run")


# --- impossible settings ------------------------------------------------------------------------------------

BAD_SETTINGS = {
    "empty test set": (["split=user", "split.min_ratings=100000"], r"split 'user' leaves the test set empty"),
    "test fraction 0": (["split.test=0"], r"split.test must be a fraction in \[0, 1\), got 0.0"),
    "more folds than ratings": (["split=kfold", "split.folds=100000"], r"split.folds=100000 is more than the"),
    "no positives left": (["task=ranking", "task.threshold=6"], r"leaves the training set empty \(0 ratings in all\)"),
    "epochs not a number": (["trainer.epochs=abc"], r"trainer.epochs must be an integer >= 0, got 'abc'"),
    "model value not a number": (["model.embedding_dim=abc"], r"model.embedding_dim must be an integer >= 1, got 'abc'"),
    "unknown optimizer": (["trainer.optimizer=rmsprop"], r"trainer.optimizer must be one of"),
    "diverging loss": (["trainer.optimizer=sgd", "trainer.lr=1e12", "trainer.batch_size=64"],
                       r"the training loss became (inf|nan) at epoch 1, step \d+: lower trainer.lr"),
}


@pytest.mark.parametrize("kind", list(BAD_SETTINGS))
def test_impossible_setting_is_one_line_and_exit_2(kind, tmp_path, monkeypatch, capsys):
    overrides, fragment = BAD_SETTINGS[kind]
    run = tmp_path / "run"
    data = ["data=synthetic", "data.n_users=40", "data.n_items=30", "data.n_ratings=500"]
    code, err = cli(monkeypatch, capsys, run, *data, *overrides)
    assert_user_error(code, err, fragment)
    assert_nothing_written(run)


@pytest.mark.parametrize("override, first_line", [
    ("trainer.epochz=3", "Could not override 'trainer.epochz'."),
    ("model=nonexistent", "In 'train': Could not find 'model/nonexistent'"),
])
def test_unknown_config_key_is_hydras_error_without_traceback(override, first_line, tmp_path, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, tmp_path / "run", override)
    assert code == 1
    assert err.strip().splitlines()[0] == first_line and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "load_data", interrupted)
    code, err = cli(monkeypatch, capsys, tmp_path / "run", "data=synthetic")
    assert code == 130 and err == "error: interrupted\n"
    assert_nothing_written(tmp_path / "run")


# --- odd but valid input: trains, and reports what it dropped ---------------------------------------------


def run_ok(monkeypatch, capsys, run, *overrides) -> dict:
    code, err = cli(monkeypatch, capsys, run, *overrides)
    assert code in (0, None), err
    with open(run / "metrics.json") as fh:
        return json.load(fh)


def logged(run) -> str:
    """The run's log file (Hydra's logging replaces pytest's caplog handler)."""
    return (run / "train.log").read_text()


def test_duplicates_keep_the_latest_and_are_counted(tmp_path, frame, monkeypatch, capsys):
    older = frame.iloc[:3].assign(timestamp=frame["timestamp"].iloc[:3] - 1000, rating=1.0)
    path = write(tmp_path, pd.concat([older, frame]))  # the older copies come first in the file
    metrics = run_ok(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}",
                     "data.columns.timestamp=timestamp")
    assert metrics["n_duplicates_dropped"] == 3
    assert "dropped 3 duplicate (user, item) rating(s), keeping last" in logged(tmp_path / "run")
    assert len(load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["train"]["ratings"]) == metrics["n_train"]


ODD_IDS = ["alice ", "bob smith", "123456789012345678901234567890", "18446744073709551615", "007", "7", "-3",
           "Ünïcode ✓"]


def test_odd_ids_train_and_round_trip(tmp_path, frame, monkeypatch, capsys):
    odd = frame.astype({"user": object})
    odd["user"] = odd["user"].map(lambda u: ODD_IDS[u] if u < len(ODD_IDS) else u)
    path = write(tmp_path, odd)
    run_ok(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}")
    user_ids = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["user_ids"]
    # "alice " is "alice": a trailing space is not part of an id; "007" and "7" stay two users
    assert {"alice", "bob smith", "123456789012345678901234567890", "18446744073709551615", "007", "7", "-3",
            "Ünïcode ✓"} <= set(user_ids)
    assert len(user_ids) == frame["user"].nunique()


def test_feature_rows_of_unknown_items_are_dropped_and_counted(tmp_path, frame, monkeypatch, capsys):
    path = write(tmp_path, frame)
    ids = [*range(30), 1000, 1001, "ghost"]
    items = write(tmp_path, pd.DataFrame({"item": ids, "genre": ["a", "b", "c"] * 11}), "items.csv")
    metrics = run_ok(monkeypatch, capsys, tmp_path / "run", "data=csv", f"data.ratings={path}",
                     f"data.items={items}", "+data.item_features.genre=categorical", "model=hybrid")
    assert metrics["n_item_feature_rows_unknown"] == 3
    assert "3 item feature row(s) name items with no ratings; ignored" in logged(tmp_path / "run")


# --- checkpoints that carry code, or are not checkpoints -----------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(tmp_path):
    marker = tmp_path / "pwned"
    torch_file = tmp_path / "torch_save.pt"  # torch's zip format, a valid checkpoint dict around the payload
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": {}, "extra": Payload(marker)}, torch_file)
    raw_file = tmp_path / "raw_pickle.pt"  # a bare pickle, as torch.load also accepts
    raw_file.write_bytes(pickle.dumps(Payload(marker)))
    return marker, [torch_file, raw_file]


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    marker, files = malicious_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match=r"refusing to load .*: it holds pickled Python objects"):
            load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=r"\(it asks for posix\.system\)"):
        load_checkpoint(str(files[0]))
    assert not marker.exists()


def test_resume_from_a_last_pt_with_pickled_code_is_refused(tmp_path, monkeypatch, capsys):
    marker, files = malicious_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(files[0].read_bytes())
    data = ["data=synthetic", "data.n_users=40", "data.n_items=30", "data.n_ratings=500"]
    code, err = cli(monkeypatch, capsys, run, *data, "trainer.resume=true")
    assert_user_error(code, err, r"refusing to load .*last\.pt: it holds pickled Python objects")
    assert not marker.exists()
    assert not (run / "metrics.json").exists() and not (run / "checkpoint.pt").exists()


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match=r"cannot load .*truncated\.pt: not a readable checkpoint"):
        load_checkpoint(str(truncated))
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a recsys_torch checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*absent\.pt"):
        load_checkpoint(str(tmp_path / "absent.pt"))


def test_every_torch_load_is_weights_only():
    """Static guard: a new ``torch.load`` without ``weights_only=True`` anywhere in the package fails."""
    calls = []
    for folder in (REPO / "recsys_torch", REPO / "scripts"):
        for path in folder.rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                depth, end = 1, match.end()
                while depth and end < len(text):  # the call's own closing parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    end += 1
                calls.append((path.name, "weights_only=True" in text[match.end():end]))
    assert calls and all(ok for _, ok in calls), calls


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(str(path), {"version": 1})

    def dies_half_way(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OutputError, match=r"cannot write .*checkpoint\.pt: No space left on device"):
        atomic_torch_save(str(path), {"version": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]



def test_a_full_disk_under_torch_save_is_one_line(tmp_path, monkeypatch):
    """torch.save's zip writer raises its own RuntimeError while handling the OSError of a full disk
    (seen on a 400 KiB tmpfs): that is still the one-line OutputError, naming the real reason."""
    path = tmp_path / "checkpoint.pt"

    def fills_the_disk(obj, fh):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 260096 vs 260048")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(OutputError, match=r"cannot write .*checkpoint\.pt: No space left on device$"):
        atomic_torch_save(str(path), {"version": 2})
    assert os.listdir(tmp_path) == []


def test_an_interrupt_during_a_failed_write_stays_an_interrupt(tmp_path, monkeypatch):
    def interrupted_while_handling_a_full_disk(obj, fh):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_while_handling_a_full_disk)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(str(tmp_path / "last.pt"), {"version": 2})
    assert os.listdir(tmp_path) == []

# --- data that pandas read without a word: shifted columns, float32 overflow, unmatched or non-numeric features


def data_case(kind, tmp_path, frame) -> list[str]:
    """Overrides of one kind of bad data that used to train (or crash) rather than say what was wrong."""
    if kind == "header one name short":  # every row has a timestamp field the header does not name
        path = tmp_path / "ratings.csv"
        path.write_text("user,item,rating\n" + frame.to_csv(header=False, index=False))
        return ["data=csv", f"data.ratings={path}"]
    if kind == "a row one field short":
        path = tmp_path / "ratings.csv"
        lines = frame.to_csv(index=False).splitlines()
        lines[4] = lines[4].rsplit(",", 1)[0]
        path.write_text("\n".join(lines) + "\n")
        return ["data=csv", f"data.ratings={path}", "data.columns.timestamp=timestamp"]
    if kind == "rating beyond float32":
        return ["data=csv", f"data.ratings={write(tmp_path, with_cell(frame, 3, 'rating', '1e39'))}", "model=popularity"]
    if kind == "NaN in the rating scale":
        return ["data=csv", f"data.ratings={write(tmp_path, frame)}", "data.rating_scale=[nan,5]"]
    if kind == "synthetic scale beyond float32":
        return ["data=synthetic", "data.n_users=40", "data.n_items=30", "data.n_ratings=500", "+data.rating_scale=[1,1e39]"]
    items = {"zero-padded feature ids": pd.DataFrame({"item": [f"{i:03d}" for i in range(30)], "genre": ["a"] * 30}),
             "text in a numeric column": pd.DataFrame({"item": range(30), "genre": ["a", "b", "Comedy"] * 10})}[kind]
    kinds = {"zero-padded feature ids": "categorical", "text in a numeric column": "numeric"}
    return ["data=csv", f"data.ratings={write(tmp_path, frame)}", f"data.items={write(tmp_path, items, 'items.csv')}",
            f"+data.item_features.genre={kinds[kind]}", "model=hybrid"]


BAD_DATA = {
    "header one name short": r"ratings file .*ratings\.csv: 500 row\(s\) do not have the header's 3 fields "
                             r"\(first at row 0, line 2: 4 fields\)$",
    "a row one field short": r"ratings file .*ratings\.csv: 1 row\(s\) do not have the header's 4 fields "
                             r"\(first at row 3, line 5: 3 fields\)$",
    "rating beyond float32": r"ratings\.csv: 1 rating\(s\) are not finite numbers \(first at row 3: 1e\+39\); "
                             r"ratings are float32",
    "NaN in the rating scale": r"data\.rating_scale must be \[low, high\], two finite numbers .*got \[nan, 5\]$",
    "synthetic scale beyond float32": r"synthetic: rating_scale high must be a finite float32 number",
    "zero-padded feature ids": r"item file .*items\.csv: none of its 30 row\(s\) names an item with ratings \(its ids: "
                               r"\['000', '001', '002'\]; rated items: \['0', '1', '2'\]\)",
    "text in a numeric column": r"item file .*items\.csv: numeric feature column 'genre' has 30 cell\(s\) that are not "
                                r"finite numbers \(first at row 0: 'a'\)$",
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_that_used_to_train_is_one_line_and_exit_2(kind, tmp_path, frame, monkeypatch, capsys):
    run = tmp_path / "run"
    code, err = cli(monkeypatch, capsys, run, *data_case(kind, tmp_path, frame))
    assert_user_error(code, err, BAD_DATA[kind])
    assert_nothing_written(run)
