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


# ---- params.png: readable log axes and a legend -----------------------------------------------------
def _visible_labels(ax, renderer, minor=False):
    low, high = sorted(ax.get_xlim())
    ticks = ax.xaxis.get_minor_ticks() if minor else ax.xaxis.get_major_ticks()
    return [t.label1 for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]


def _overlapping(labels, renderer) -> list[tuple[str, str]]:
    boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


@pytest.mark.parametrize("low, high", [(0.0041, 0.0058), (0.31, 0.59), (0.4, 7.9), (0.0012, 0.049), (1e-5, 30.0)])
def test_log_ticks_fit_any_span(low, high):
    ticks = report.log_ticks(low, high)
    assert ticks == [] or (2 <= len(ticks) <= 5 and all(low <= t <= high for t in ticks))


def test_params_plot_labels_narrow_log_axes_without_overlap_and_has_a_legend(tmp_path):
    """Log axes spanning less than a decade (a narrow search range, or a few trials of a wide one
    plotted without their range) once got minor-tick labels like 4x10^-1 printed over each other."""
    sweeper = {"params": {"model.reg": "tag(log, interval(0.35, 0.95))",            # under one decade
                          "model.reg_bias": "tag(log, interval(0.0041, 0.0058))",  # too narrow for 1-9 ticks
                          "trainer.lr": "tag(log, interval(0.001, 0.05))",         # 1.7 decades
                          "model.embedding_dim": "choice(16, 32, 64)"}}
    values = [(0.36, 0.0042, 0.0012, 16, 0.93), (0.52, 0.0047, 0.004, 32, 0.91),
              (0.71, 0.0051, 0.011, 64, 0.95), (0.94, 0.0057, 0.048, 16, 0.92)]
    for n, (reg, bias, lr, dim, value) in enumerate(values):
        make_trial(tmp_path, str(n), [f"model.reg={reg}", f"model.reg_bias={bias}", f"trainer.lr={lr}",
                                      f"model.embedding_dim={dim}"], {"val/rmse": value}, sweeper=sweeper)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report.params_figure(report.load(str(tmp_path)))
    canvas = FigureCanvasAgg(fig)  # as savefig renders it: the layout and the text extents
    canvas.draw()
    renderer = canvas.get_renderer()
    by_name = {ax.get_xlabel(): ax for ax in fig.axes}
    assert set(by_name) == {"model.reg", "model.reg_bias", "trainer.lr", "model.embedding_dim"}
    for name, ax in by_name.items():
        labels = _visible_labels(ax, renderer)
        assert len(labels) >= 2, (name, [t.get_text() for t in labels])
        assert not _overlapping(labels, renderer), (name, _overlapping(labels, renderer))
        assert not _visible_labels(ax, renderer, minor=True), name  # minor ticks carry no labels
    assert [t.get_text() for t in _visible_labels(by_name["model.embedding_dim"], renderer)] == ["16", "32", "64"]
    assert by_name["model.reg"].get_xscale() == "log"
    # the searched range is the axis: the trials are seen within it
    low, high = by_name["trainer.lr"].get_xlim()
    assert low <= 0.001 and high >= 0.05
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert any(text.startswith("the best: trial 1, val/rmse = 0.9100") for text in legend), legend


# ---- a single run: report.md, learning curves, errors or popularity ------------------------------
def _train(tmp_path_factory, name, overrides):
    from conftest import compose_cfg
    from recsys_torch.train import train

    folder = tmp_path_factory.mktemp(name)
    metrics = train(compose_cfg(["logger=tensorboard", "trainer.epochs=4", *overrides]), str(folder))
    return folder, metrics


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory):
    # refit: the model learns from train + val, and the report must count (and mask) those rows
    return _train(tmp_path_factory, "rating_run", ["trainer.refit=true"])


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory):
    return _train(tmp_path_factory, "ranking_run", ["task=ranking", "task.threshold=3"])


def _report_lines(folder) -> list[str]:
    return (folder / "report.md").read_text().splitlines()


def test_rating_run_report_has_curves_errors_by_activity_and_its_headline_metrics(rating_run, tmp_path):
    folder, metrics = rating_run
    assert not (folder / ".hydra").exists()  # a Python API run: checkpoint.pt, metrics.json, tb/
    run = report.load_run(str(folder))
    written = report.write_run_report(run, str(tmp_path))
    assert set(written) == {"report", "learning", "errors"}
    for name in ("learning.png", "errors.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    lines = _report_lines(tmp_path)
    assert f"| rmse | {metrics['test/rmse']:.4f} | {metrics['val/rmse']:.4f} |" in lines
    # each PNG named, with a one-line caption under it
    for png in ("learning.png", "errors.png"):
        at = next(i for i, line in enumerate(lines) if line.startswith("![") and line.endswith(f"({png})"))
        assert lines[at + 2].startswith(f"*{png}: ") and lines[at + 2].endswith("*")
    assert any("refit on train + val" in line for line in lines)
    # the predictions are the run's: rebuilt model, split and refit rows give its test RMSE
    errors = report.rating_errors(report.rebuild(run))
    assert errors["rmse"] == pytest.approx(metrics["test/rmse"], rel=1e-5)
    for side in ("users", "items"):
        assert sum(r["n"] for r in errors[side]) == metrics["n_test"]
        assert f"| {errors[side][0]['bucket']} | {errors[side][0]['n']:,} | {errors[side][0]['rmse']:.4f} |" in lines
    curves, source = report.run_curves(run)
    assert source == "tb" and set(curves) == {"train/loss", "val/rmse", "refit/train/loss"}
    assert [e for e, _ in curves["val/rmse"]] == list(range(1, len(curves["val/rmse"]) + 1))


def test_ranking_run_report_compares_recommended_popularity_with_the_catalog(ranking_run, tmp_path):
    folder, metrics = ranking_run
    run = report.load_run(str(folder))
    written = report.write_run_report(run, str(tmp_path))
    assert set(written) == {"report", "learning", "popularity"}
    assert (tmp_path / "popularity.png").read_bytes()[:8] == PNG
    lines = _report_lines(tmp_path)
    assert f"| ndcg@10 | {metrics['test/ndcg@10']:.4f} | {metrics['val/ndcg@10']:.4f} |" in lines
    assert any(line.startswith("*popularity.png: ") for line in lines)
    # the same top-10 lists as evaluation: coverage and mean popularity agree with metrics.json
    pop = report.ranking_popularity(report.rebuild(run), 10)
    assert pop["coverage"] == pytest.approx(metrics["test/coverage@10"])
    assert pop["avg_popularity"] == pytest.approx(metrics["test/avg_popularity@10"])
    assert f"- coverage@10: {pop['coverage']:.4f}" in " ".join(lines)
    assert report.run_curves(run)[0].keys() == {"train/loss", "val/ndcg@10"}


def test_script_reports_a_run_folder(rating_run, tmp_path, capsys):
    folder, metrics = rating_run
    assert cli.run(script().main, [str(folder), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rmse", "test", f"{metrics['test/rmse']:.4f}", "val", f"{metrics['val/rmse']:.4f}"]
    assert "learning.png" in out and "errors.png" in out


def test_run_without_events_takes_its_curves_from_last_pt(tmp_path_factory, tmp_path):
    folder, _ = _train(tmp_path_factory, "no_logger", ["logger=none"])
    run = report.load_run(str(folder))
    curves, source = report.run_curves(run)
    assert source == "last*.pt" and len(curves["train/loss"]) == len(curves["val/rmse"]) >= 1
    assert "learning" in report.write_run_report(run, str(tmp_path))


def test_run_report_without_matplotlib_still_has_the_tables(rating_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    folder, metrics = rating_run
    written = report.write_run_report(report.load_run(str(folder)), str(tmp_path))
    assert set(written) == {"report"} and not list(tmp_path.glob("*.png"))
    text = (tmp_path / "report.md").read_text()
    assert "plots need matplotlib" in text and f"| rmse | {metrics['test/rmse']:.4f}" in text
    assert "| user's training ratings | test ratings | RMSE |" in text


def test_a_run_whose_data_no_longer_rebuilds_still_gets_curves_and_metrics(rating_run, tmp_path):
    folder, _ = rating_run
    run = report.load_run(str(folder))
    run.checkpoint = {**run.checkpoint, "config": {**run.checkpoint["config"],
                                                  "data": {**run.checkpoint["config"]["data"], "n_ratings": 900}}}
    written = report.write_run_report(run, str(tmp_path))
    assert set(written) == {"report", "learning"}
    assert "no analysis of predictions: the run's data no longer gives its split" in (tmp_path / "report.md").read_text()


# ---- broken folders: one error line, or the trial counted as unfinished --------------------------
def _complete_run(folder, metrics_text):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(metrics_text)
    (folder / "run.json").write_text(json.dumps({"run_id": "abc", "status": "complete"}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("corrupt", "its metrics.json is unreadable, not a JSON object"),
    ("list", "its metrics.json is unreadable, not a JSON object"),
    ("failed", "run.json says it failed: the training loss became nan"),
    ("running", "run.json says 'running'"),
    ("yaml", "cannot read"),
])
def test_script_on_a_broken_run_folder_is_one_error_line(tmp_path, capsys, case, message):
    folder = tmp_path / "run"
    if case in ("corrupt", "list"):
        _complete_run(folder, '{"val/rmse": 0.9, "run_id": "ab' if case == "corrupt" else '[1, 2]')
    elif case == "yaml":
        _complete_run(folder, json.dumps({"val/rmse": 0.9, "run_id": "abc", "optimized_metric": "val/rmse"}))
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("- model.reg=1\n- [unclosed\n")
    else:
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"val/rmse": 0.9, "run_id": "old"}))
        status = {"failed": {"status": "failed", "error": "the training loss became nan at epoch 3"},
                  "running": {"status": "running"}}[case]
        (folder / "run.json").write_text(json.dumps({"run_id": "new", **status}))
    assert cli.run(script().main, [str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("budget", ['{"n_trials": 3, "sess', "[1, 2]", '{"n_trials": "x"}', '{"sessions": 4}'])
def test_sweep_with_broken_metrics_or_budget_reports_the_rest(tmp_path, capsys, budget):
    sweep = tmp_path / "sweep"
    make_trial(sweep, "0", ["model.reg=1"], {"val/rmse": 0.93, "test/rmse": 0.94})
    make_trial(sweep, "1", ["model.reg=2"], {"val/rmse": 0.91, "test/rmse": 0.92})
    (make_trial(sweep, "2", ["model.reg=3"]) / "metrics.json").write_text('{"val/rmse": 0.8')   # corrupt
    (make_trial(sweep, "3", ["model.reg=4"]) / "metrics.json").write_text("[0.5]")              # not an object
    (sweep / "budget.json").write_text(budget)
    assert cli.run(script().main, [str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "budget: 4 trials (2 completed): 0 s in trials (budget.json unreadable)" in out
    rows = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| rank")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "1"], ["| 2", "0"], ["| —", "2"], ["| —", "3"]]
