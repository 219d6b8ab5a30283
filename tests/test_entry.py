"""The Hydra entry point: ``train(cfg, output_dir)`` in-process on the real configs (shrunk), and
``scripts/train.py`` as a subprocess. Checks the run-directory contract of DESIGN.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from conftest import REPO, TINY, TINY_RUN, compose_cfg
from recsys_torch.errors import ConfigError, DataError
from recsys_torch.checkpoint import load_checkpoint, model_from_checkpoint
from recsys_torch.metrics import rating_metrics
from recsys_torch.train import load_data, train

RUN_KEYS = {"test/rmse", "test/mae", "fit_seconds", "train_ratings_per_second", "n_train", "n_val", "n_test",
            "n_test_unknown_users", "n_test_unknown_items"}


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def scalar_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def rebuild_split(cfg, fold=0):
    dataset = load_data(cfg)
    inter = instantiate(cfg.task).prepare_data(dataset.interactions)
    return instantiate(cfg.split, _partial_=True)(inter, seed=int(cfg.seed))[fold]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("random_run")
    cfg = compose_cfg(["logger=tensorboard"])
    return cfg, out, train(cfg, str(out))


def test_metrics_json_has_the_contract_keys(random_run):
    cfg, out, returned = random_run
    metrics = read_json(out / "metrics.json")
    assert RUN_KEYS <= set(metrics)
    assert "folds" not in metrics and not any(k.endswith("_std") for k in metrics)
    assert metrics["test/rmse"] == pytest.approx(returned["test/rmse"])
    n = TINY["n_ratings"]
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (n - 2 * round(0.1 * n), round(0.1 * n),
                                                                          round(0.1 * n))
    assert 0 < metrics["test/mae"] <= metrics["test/rmse"] < 2
    assert metrics["fit_seconds"] > 0 and metrics["train_ratings_per_second"] > 0


def test_checkpoint_loads_safely_and_rebuilds_the_model(random_run):
    cfg, out, metrics = random_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["format"] == "recsys_torch/1"
    assert (state["n_users"], state["n_items"]) == (TINY["n_users"], TINY["n_items"])
    model = model_from_checkpoint(state)
    assert type(model).__name__ == "MFModel" and model.embedding_dim == cfg.model.embedding_dim
    assert state["config"]["trainer"]["epochs"] == 2
    split = rebuild_split(cfg)
    assert torch.equal(state["train"]["users"], split.train.users)
    # the rebuilt model reproduces the run's test metrics: the same weights and the same fallbacks
    again = rating_metrics(model, split.test, split.train)
    assert again["rmse"] == pytest.approx(metrics["test/rmse"], rel=1e-12)
    assert again["mae"] == pytest.approx(metrics["test/mae"], rel=1e-12)
    # and a second load gives identical predictions
    twin = model_from_checkpoint(load_checkpoint(str(out / "checkpoint.pt")))
    assert torch.equal(model(split.test.users, split.test.items), twin(split.test.users, split.test.items))


def test_tensorboard_events(random_run):
    _, out, _ = random_run
    assert {"train/loss", "val/rmse"} <= scalar_tags(out / "tb")


def test_kfold_reports_mean_std_and_folds(compose, tmp_path):
    cfg = compose(["split=kfold", "split.folds=3", "logger=tensorboard"])
    train(cfg, str(tmp_path))
    metrics = read_json(tmp_path / "metrics.json")
    assert RUN_KEYS <= set(metrics)
    assert len(metrics["folds"]) == 3
    per_fold = [f["test/rmse"] for f in metrics["folds"]]
    assert metrics["test/rmse"] == pytest.approx(sum(per_fold) / 3)
    assert metrics["test/rmse_std"] == pytest.approx(torch.tensor(per_fold, dtype=torch.float64).std().item())
    assert "test/mae_std" in metrics
    assert sum(f["n_test"] for f in metrics["folds"]) == TINY["n_ratings"]  # each rating tested once
    for fold in range(3):
        assert {"train/loss", "val/rmse"} <= scalar_tags(tmp_path / "tb" / f"fold{fold}")
    # the checkpoint holds fold 0's model with split.final_fit=false (by default: one trained on everything)
    train(compose(["split=kfold", "split.folds=3", "split.final_fit=false"]), str(tmp_path / "fold0"))
    model = model_from_checkpoint(load_checkpoint(str(tmp_path / "fold0" / "checkpoint.pt")))
    split = rebuild_split(cfg, fold=0)
    assert rating_metrics(model, split.test, split.train)["rmse"] == pytest.approx(per_fold[0], rel=1e-12)


@pytest.mark.parametrize("overrides", [
    ["model=popularity"],
    ["model=baseline"],
    ["split=user"],
    ["split=temporal"],
    ["split=leave_last"],
    ["split=cold_user"],
], ids=lambda o: " ".join(o))
def test_each_config_group_option_runs(compose, tmp_path, overrides):
    metrics = train(compose(overrides), str(tmp_path))
    assert RUN_KEYS <= set(metrics) and 0 < metrics["test/rmse"] < 2
    assert not (tmp_path / "tb").exists()  # logger=none writes no event files


def test_a_model_gets_its_preset_for_a_task_its_defaults_are_not_for(compose):
    """configs/preset/hybrid_ranking.yaml: model=hybrid under task=ranking trains what the ranking
    experiment does; mf_ranking.yaml gives model=mf its ranking dimension; under task=rating (and for
    models without a preset) nothing changes; the command line still overrides a preset's keys."""
    ranking = compose(["task=ranking", "model=hybrid"])
    assert ranking.model.reg == 0.07 and ranking.model.implicit is False and ranking.trainer.batch_size == 100000
    assert compose(["model=hybrid"]).model.reg == 1.0 and compose(["model=hybrid"]).model.implicit is True
    assert compose(["task=ranking"]).model._target_ == "recsys_torch.models.MFModel"
    # configs/preset/mf_ranking.yaml: 128 factors for ranking, 64 for ratings; the experiment pins its own
    assert compose(["task=ranking"]).model.embedding_dim == 128 and compose([]).model.embedding_dim == 64
    assert compose(["experiment=ranking_ml100k_mf"]).model.embedding_dim == 64
    mine = compose(["task=ranking", "model=hybrid", "model.reg=0.5", "trainer.lr=0.02"])
    assert mine.model.reg == 0.5 and mine.trainer.lr == 0.02
    experiment = compose(["experiment=ranking_ml100k_hybrid"])
    assert experiment.model == compose(["task=ranking", "model=hybrid", "split=user"]).model


def test_cold_item_split_reports_unknown_items_and_cold_metrics(compose, tmp_path):
    metrics = train(compose(["split=cold_item"]), str(tmp_path))
    assert metrics["n_test_unknown_items"] == round(0.2 * TINY["n_items"])
    assert metrics["n_test_unknown_users"] == 0
    assert metrics["test/cold/rmse"] == pytest.approx(metrics["test/rmse"])  # every test row is cold


# --- every config key is wired (Surprise's test_SVD_parameters, through the configs) -----------------

CHANGES = ["trainer.lr=0.03", "trainer.epochs=3", "trainer.batch_size=256", "trainer.optimizer=adagrad",
           "model.embedding_dim=16", "model.reg=0.5", "seed=7", "trainer.refit=true"]


@pytest.fixture(scope="module")
def reference_rmse(tmp_path_factory):
    return train(compose_cfg(), str(tmp_path_factory.mktemp("reference")))["test/rmse"]


@pytest.mark.parametrize("override", CHANGES)
def test_each_override_changes_the_result(compose, tmp_path, reference_rmse, override):
    assert train(compose([override]), str(tmp_path))["test/rmse"] != pytest.approx(reference_rmse, abs=1e-6)


def test_same_config_same_result(compose, tmp_path, reference_rmse):
    assert train(compose(), str(tmp_path))["test/rmse"] == reference_rmse


def test_refit_trains_on_train_and_validation_for_the_chosen_epochs(compose, tmp_path):
    from recsys_torch.io import safe_torch_load

    plain = train(compose(["trainer.epochs=5"]), str(tmp_path / "plain"))
    refit = train(compose(["trainer.epochs=5", "trainer.refit=true"]), str(tmp_path / "refit"))
    # validation judged the early-stopped model, the same in both runs, and chose the epochs
    assert refit["val/rmse"] == plain["val/rmse"] and refit["best_epoch"] == plain["best_epoch"]
    assert refit["test/rmse"] != pytest.approx(plain["test/rmse"], abs=1e-6)
    state = load_checkpoint(str(tmp_path / "refit" / "checkpoint.pt"))
    assert len(state["train"]["users"]) == refit["n_train"] + refit["n_val"]  # val rows are training rows now
    second = safe_torch_load(str(tmp_path / "refit" / "last-refit.pt"))
    assert second["finished"] and len(second["result"]["history"]) == plain["best_epoch"]
    # a resumed run finds both fits finished and reports the same figures
    again = train(compose(["trainer.epochs=5", "trainer.refit=true", "trainer.resume=true"]), str(tmp_path / "refit"))
    assert again["test/rmse"] == refit["test/rmse"]


# --- user errors ------------------------------------------------------------------------------------------


def test_impossible_split_is_a_config_error(compose, tmp_path):
    with pytest.raises(ConfigError, match="split.folds must be at least 2"):
        train(compose(["split=kfold", "split.folds=1"]), str(tmp_path))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_missing_ratings_file_is_a_data_error(compose, tmp_path):
    with pytest.raises(Exception) as info:
        train(compose(["data=csv", "data.ratings=/nonexistent.csv"]), str(tmp_path))
    # Hydra's instantiate wraps what a target raises; the DataError must still be reachable
    error = info.value if isinstance(info.value, DataError) else info.value.__cause__
    assert isinstance(error, DataError) and str(error) == "ratings file not found: /nonexistent.csv"


# --- the command line -------------------------------------------------------------------------------------


def run_script(*overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "scripts/train.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_runs_an_experiment(tmp_path):
    tiny = [f"data.{key}={value}" for key, value in TINY.items()]
    proc = run_script("data=synthetic", *tiny, *TINY_RUN, "model=baseline", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    metrics = read_json(tmp_path / "metrics.json")
    assert RUN_KEYS <= set(metrics)
    assert (tmp_path / "checkpoint.pt").exists()
    assert "recsys_torch run summary" in proc.stdout and "test/rmse" in proc.stdout


def test_script_says_which_preset_it_picked(tmp_path):
    tiny = [f"data.{key}={value}" for key, value in TINY.items()]
    proc = run_script("data=synthetic", *tiny, *TINY_RUN, "task=ranking", "model=hybrid", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "preset hybrid_ranking: configs/preset/hybrid_ranking.yaml" in (tmp_path / "train.log").read_text()


def test_script_names_no_preset_where_the_model_and_task_have_none(tmp_path):
    tiny = [f"data.{key}={value}" for key, value in TINY.items()]
    proc = run_script("data=synthetic", *tiny, *TINY_RUN, "task=ranking", "model=content", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "preset" not in (tmp_path / "train.log").read_text()  # there is no configs/preset/content_ranking.yaml


def test_script_warns_when_a_typed_model_l2_setting_changes_nothing(tmp_path):
    tiny = [f"data.{key}={value}" for key, value in TINY.items()]
    proc = run_script("data=synthetic", *tiny, *TINY_RUN, "task=ranking", "model.reg=0.3", "model.embedding_dim=8",
                      f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in (tmp_path / "train.log").read_text().splitlines() if "task.loss=gramian" in line)
    assert "WARNING" in line and "model.reg changes nothing under task.loss=gramian: its L2 is task.reg" in line
    assert "embedding_dim" not in line


def test_script_reports_a_user_error_in_one_line(tmp_path):
    proc = run_script("data=csv", "data.ratings=/nonexistent.csv", *TINY_RUN, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ratings file not found: /nonexistent.csv" in lines[0]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoint.pt").exists()
