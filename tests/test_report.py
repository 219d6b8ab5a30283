"""recsys_torch.report and scripts/report.py on handmade run and sweep folders (what scripts/train.py
writes: metrics.json, .hydra/*.yaml, tb/ events); the real sweep is read in tests/test_sweep.py."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys

import pytest

from recsys_torch import cli
import yaml

from conftest import CONFIG_DIR, REPO
from recsys_torch.tools import report
from recsys_torch.loggers import TensorBoardLogger

DEFAULT_CHOICES = {"data": "ml100k", "split": "random", "model": "mf", "task": "rating", "trainer": "default",
                   "logger": "tensorboard", "hparams_search": None, "experiment": None}
PNG = b"\x89PNG\r\n\x1a\n"


def make_trial(root, name, overrides, metrics=None, choices=None, sweeper=None, objective="val/rmse", curve=None):
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": objective, "seed": 42}))
    hydra = {"runtime": {"choices": {**DEFAULT_CHOICES, "hydra/sweeper": "basic", **(choices or {})}},
             "sweeper": sweeper or {}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}, sort_keys=False))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        logger = TensorBoardLogger(str(folder / "tb"))
        for epoch, value in enumerate(curve, 1):
            logger.scalar(objective, value, epoch)
        logger.hparams({"model.embedding_dim": 8}, {objective: min(curve), "test/rmse": 1.0})
        logger.close()
    return folder


def script():
    spec = importlib.util.spec_from_file_location("report_script", REPO / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trials_rank_by_the_objective_in_its_direction_unfinished_last(tmp_path):
    for name, value in [("0", 0.93), ("1", 0.91), ("2", None), ("3", 0.95)]:
        metrics = None if value is None else {"val/rmse": value, "val/ndcg@10": value}
        make_trial(tmp_path, name, [f"model.reg={name}"], metrics)
    assert [t.name for t in report.load(str(tmp_path)).ranked()] == ["1", "0", "3", "2"]
    maximized = report.load(str(tmp_path), objective="val/ndcg@10")
    assert maximized.direction == "maximize"
    assert [t.name for t in maximized.ranked()] == ["3", "0", "1", "2"]


def test_the_sweepers_direction_wins_over_the_metric_name(tmp_path):
    for name, value in [("0", 0.5), ("1", 0.7)]:
        make_trial(tmp_path, name, [f"model.reg={name}"], {"val/score": value},
                   sweeper={"direction": "minimize", "params": {"model.reg": "choice(0, 1)"}}, objective="val/score")
    sweep = report.load(str(tmp_path))
    assert (sweep.direction, sweep.best.name) == ("minimize", "0")


def test_table_lists_searched_parameters_and_kfold_spread(tmp_path):
    sweeper = {"params": {"trainer.lr": "tag(log, interval(0.001, 0.1))", "++model.extra": "choice(1, 2)"}}
    make_trial(tmp_path, "0", ["trainer.lr=0.01", "++model.extra=1", "data=synthetic", "model.embedding_dim=8"],
               {"val/rmse": 0.9, "val/rmse_std": 0.01, "test/rmse": 0.92, "best_epoch": 7, "total_seconds": 3.25},
               sweeper=sweeper)
    make_trial(tmp_path, "1", ["trainer.lr=0.002", "++model.extra=1", "data=synthetic", "model.embedding_dim=16"], None,
               sweeper=sweeper)
    sweep = report.load(str(tmp_path))
    # searched: the Optuna space (keys without "++") plus what differs between trials; data is fixed
    assert sweep.searched == ["trainer.lr", "model.extra", "model.embedding_dim"]
    lines = report.table(sweep).splitlines()
    assert lines[0] == ("| rank | trial | val/rmse | test/rmse | trainer.lr | model.extra | model.embedding_dim "
                        "| best epoch | seconds |")
    assert lines[2] == "| 1 | 0 | 0.9000 ± 0.0100 | 0.9200 | 0.01 | 1 | 8 | 7 | 3.2 |"
    assert lines[3] == "| — | 1 | — | — | 0.002 | 1 | 16 | — | — |"


def test_command_drops_sweep_settings_and_names_groups_the_search_config_chose(tmp_path):
    overrides = ["model.embedding_dim=64", "model.hidden=[32, 16]", "hparams_search=hybrid_optuna", "data=synthetic",
                 "trainer.num_threads=1"]
    trial = report.Trial.read(str(make_trial(tmp_path, "0", overrides, {"val/rmse": 0.9},
                                             choices={"model": "hybrid", "data": "synthetic", "task": "rating"})), "0")
    command = report.command(trial, DEFAULT_CHOICES)
    assert command.startswith("python scripts/train.py model=hybrid model.embedding_dim=64 ")
    assert shlex.split(command)[2:] == ["model=hybrid", "model.embedding_dim=64", "model.hidden=[32, 16]",
                                       "data=synthetic", "trainer.num_threads=1"]


def test_experiment_config_holds_the_best_deltas_and_composes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweeper = {"params": {"trainer.lr": "tag(log, interval(1e-6, 0.1))", "model.fusion": "choice(sum, gated)"}}
    for name, (lr, fusion, value) in {"0": ("1e-05", "gated", 0.9), "1": ("0.01", "sum", 1.0)}.items():
        make_trial(sweep_dir, name, [f"trainer.lr={lr}", f"model.fusion={fusion}", "hparams_search=hybrid_optuna",
                                     "data=synthetic", "logger=none", "trainer.num_threads=1"],
                   {"val/rmse": value}, choices={"model": "hybrid", "data": "synthetic", "logger": "none"}, sweeper=sweeper)
    sweep = report.load(str(sweep_dir))
    text = report.experiment_yaml(sweep, sweep.best, DEFAULT_CHOICES)
    assert text.startswith("# @package _global_\n")
    assert "# The sweep also ran with: logger=none trainer.num_threads=1\n" in text
    body = yaml.safe_load(text)
    assert body == {"defaults": [{"override /model": "hybrid"}, {"override /data": "synthetic"}],
                    "trainer": {"lr": 1e-05}, "model": {"fusion": "gated"}}
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "experiment" / "best.yaml").write_text(text)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=best"])
    assert (cfg.model._target_, cfg.model.fusion, cfg.trainer.lr) == ("recsys_torch.models.HybridModel", "gated", 1e-05)
    assert cfg.data._target_ == "recsys_torch.data.synthetic.synthetic"


def test_learning_curve_is_per_epoch_without_the_final_hparams_point(tmp_path):
    folder = make_trial(tmp_path, "0", [], {"val/rmse": 0.93}, curve=[0.95, 0.93, 0.94])
    curve = report.learning_curve(report.Trial.read(str(folder), "0"), "val/rmse")
    assert curve == [(1, pytest.approx(0.95)), (2, pytest.approx(0.93)), (3, pytest.approx(0.94))]


def test_kfold_curves_come_from_the_first_fold(tmp_path):
    folder = make_trial(tmp_path, "0", [], {"val/rmse": 0.9})
    for fold, curve in [("fold1", [1.0, 0.9]), ("fold2", [2.0, 1.9])]:
        logger = TensorBoardLogger(str(folder / "tb" / fold))
        for epoch, value in enumerate(curve, 1):
            logger.scalar("val/rmse", value, epoch)
        logger.close()
    assert [v for _, v in report.learning_curve(report.Trial.read(str(folder), "0"), "val/rmse")] == pytest.approx([1.0, 0.9])


def test_a_single_run_folder_gets_a_report_with_its_curve(tmp_path):
    run = make_trial(tmp_path, "run", ["model=mf"], {"val/rmse": 0.93, "test/rmse": 0.94}, curve=[0.95, 0.93])
    sweep = report.load(str(run))
    assert ([t.name for t in sweep.trials], sweep.searched) == (["."], [])
    written = report.write_report(sweep, str(tmp_path / "out"), "python scripts/train.py model=mf")
    assert set(written) == {"report", "curves"}
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == PNG
    assert "python scripts/train.py model=mf" in (tmp_path / "out" / "report.md").read_text()


def test_script_prints_the_best_command_and_saves_it_as_an_experiment(tmp_path, monkeypatch, capsys):
    for name, (dim, value) in {"0": (8, 0.95), "1": (16, 0.91), "2": (32, 0.97)}.items():
        make_trial(tmp_path / "sweep", name, [f"model.embedding_dim={dim}", "trainer.num_threads=1"],
                   {"val/rmse": value, "test/rmse": value + 0.01}, curve=[value + 0.02, value])
    mod = script()
    monkeypatch.setattr(mod, "CONFIG_DIR", str(tmp_path / "configs"))
    (tmp_path / "configs").mkdir()
    shutil.copy(CONFIG_DIR / "train.yaml", tmp_path / "configs" / "train.yaml")
    assert cli.run(mod.main, [str(tmp_path / "sweep"), "--save-experiment", "dim_tuned"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == "best: trial 1, val/rmse = 0.9100 (minimize)"
    assert out[-1] == "python scripts/train.py model.embedding_dim=16 trainer.num_threads=1"
    for name in ("report.md", "curves.png", "params.png"):
        assert (tmp_path / "sweep" / name).exists()
    saved = yaml.safe_load((tmp_path / "configs" / "experiment" / "dim_tuned.yaml").read_text())
    assert saved == {"defaults": [{"override /model": "mf"}], "model": {"embedding_dim": 16}}
    # an existing experiment is kept unless --force
    assert cli.run(mod.main, [str(tmp_path / "sweep"), "--save-experiment", "dim_tuned"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists: pass --force" in err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "neither a run folder"),
    ("bad-name", "use letters, digits"),
    ("no-objective", "no trial in"),
])
def test_script_reports_user_errors_in_one_line(tmp_path, capsys, case, message):
    folder = tmp_path / "sweep"
    folder.mkdir()
    args = [str(folder)]
    if case == "missing":
        args = [str(tmp_path / "nope")]
    elif case == "bad-name":
        make_trial(folder, "0", ["model.reg=1"], {"val/rmse": 0.9})
        args += ["--save-experiment", "../escape"]
    elif case == "no-objective":
        make_trial(folder, "0", ["model.reg=1"], None)
    assert cli.run(script().main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_without_matplotlib_the_report_is_written_without_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    for name, value in [("0", 0.93), ("1", 0.91)]:
        make_trial(tmp_path / "sweep", name, [f"model.reg={name}"], {"val/rmse": value}, curve=[value])
    written = report.write_report(report.load(str(tmp_path / "sweep")), str(tmp_path / "out"), "python x")
    assert set(written) == {"report"}
    assert "plots need matplotlib" in (tmp_path / "out" / "report.md").read_text()
