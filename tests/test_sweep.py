"""Sweeps end to end on tiny synthetic data: the Optuna sweeper with its study in the sweep folder
(resumed by re-running the command), budget.json, TensorBoard events and HPARAMS per trial,
scripts/report.py on the result, and Hydra's basic sweeper running a grid without the extra."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, TINY, compose_cfg
from recsys_torch.tools import report

HAVE_OPTUNA_SWEEPER = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
# optuna 2.x under SQLAlchemy 2 warns about its own ORM declarations on every import
pytestmark = pytest.mark.filterwarnings("ignore:.*declarative_base:DeprecationWarning")
needs_optuna = pytest.mark.skipif(not HAVE_OPTUNA_SWEEPER, reason="the sweep extra (hydra-optuna-sweeper) is not installed")

TINY_DATA = ["data=synthetic", *(f"data.{key}={value}" for key, value in TINY.items())]
# TensorBoard stays on: the trials' event files are part of what is checked
TINY_TRIAL = [*TINY_DATA, "trainer.epochs=2", "trainer.progress=false", "trainer.num_threads=1", "trainer.device=cpu"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def trial_params(folder) -> dict:
    overrides = yaml.safe_load(open(os.path.join(folder, ".hydra", "overrides.yaml")))
    return {k: v for k, v in map(report.split_override, overrides) if k.startswith(("model.", "trainer.lr"))}


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    """Two trials, then the same command with n_trials=3: the resumed study runs one more."""
    if not HAVE_OPTUNA_SWEEPER:
        pytest.skip("the sweep extra (hydra-optuna-sweeper) is not installed")
    sweep_dir = tmp_path_factory.mktemp("optuna_sweep")
    args = ["-m", "hparams_search=mf_optuna", *TINY_TRIAL, f"hydra.sweep.dir={sweep_dir}"]
    run("scripts/train.py", *args, "hydra.sweeper.n_trials=2")
    first = {name: trial_params(sweep_dir / name) for name in ("0", "1")}
    resumed = run("scripts/train.py", *args, "hydra.sweeper.n_trials=3")
    return sweep_dir, first, resumed


@needs_optuna
def test_sqlite_storage_opens_a_new_database_and_reopens_it(tmp_path):
    import optuna

    from recsys_torch.tools.sweep import sqlite_storage

    path = tmp_path / "new" / "optuna.db"
    study = optuna.create_study(study_name="s", storage=sqlite_storage(str(path)))
    study.tell(study.ask(), 1.5)
    again = optuna.load_study(study_name="s", storage=sqlite_storage(str(path)))
    assert [t.value for t in again.trials] == [1.5]


@needs_optuna
@pytest.mark.slow
def test_resumed_sweep_keeps_finished_trials_and_counts_them_in_n_trials(optuna_sweep):
    import optuna

    from recsys_torch.tools.sweep import sqlite_storage

    sweep_dir, first, resumed = optuna_sweep
    study = optuna.load_study(study_name="mf_optuna", storage=sqlite_storage(str(sweep_dir / "optuna.db")))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert "resuming study mf_optuna: 2 of 3 trials finished, running 1 more" in resumed.stdout + resumed.stderr
    # the first trial measured the config's own values (the defaults the sweep must beat)
    defaults = compose_cfg([])
    assert {k: float(v) for k, v in first["0"].items()} == {k: float(OmegaConf.select(defaults, k)) for k in first["0"]}
    # the first session's folders are untouched, the new trial got the next number and new values
    assert {name: trial_params(sweep_dir / name) for name in ("0", "1")} == first
    assert trial_params(sweep_dir / "2") not in first.values()
    for trial in study.trials:
        metrics = read_json(sweep_dir / str(trial.number) / "metrics.json")
        assert trial.value == pytest.approx(metrics["val/rmse"])  # the objective is validation RMSE


@needs_optuna
@pytest.mark.slow
def test_budget_records_each_session_and_trial(optuna_sweep):
    sweep_dir, _, _ = optuna_sweep
    budget = read_json(sweep_dir / "budget.json")
    assert (budget["n_trials"], budget["n_completed"]) == (3, 3)
    assert [s["n_trials_run"] for s in budget["sessions"]] == [2, 1]
    assert [s["n_trials_finished_before"] for s in budget["sessions"]] == [0, 2]
    assert all(s["ended"] for s in budget["sessions"])
    assert [t["dir"] for t in budget["trials"]] == ["0", "1", "2"]
    for trial in budget["trials"]:
        assert trial["objective"] == pytest.approx(read_json(sweep_dir / trial["dir"] / "metrics.json")["val/rmse"])
    assert budget["trial_seconds"] == pytest.approx(sum(t["seconds"] for t in budget["trials"]), abs=0.01)
    assert budget["wall_seconds"] >= budget["trial_seconds"] > 0


@needs_optuna
@pytest.mark.slow
def test_tensorboard_sees_every_trial_with_curves_and_hparams(optuna_sweep):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep_dir, _, _ = optuna_sweep
    mux = EventMultiplexer(purge_orphaned_data=False).AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    assert sorted(mux.Runs()) == [os.path.join(n, "tb") for n in ("0", "1", "2")]
    for name in ("0", "1", "2"):
        run_name = os.path.join(name, "tb")
        epochs = [e.step for e in mux.Scalars(run_name, "val/rmse")]
        assert epochs == [1, 2]  # the final metrics live under hparam/ tags, not as a step-0 point
        content = mux.PluginRunToTagToContent("hparams")[run_name]
        data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = {k: v.number_value or v.string_value for k, v in data.session_start_info.hparams.items()}
        for key, value in trial_params(sweep_dir / name).items():
            assert hparams[key] == pytest.approx(float(value))
        metrics = read_json(sweep_dir / name / "metrics.json")
        assert mux.Scalars(run_name, "hparam/test/rmse")[-1].value == pytest.approx(metrics["test/rmse"], rel=1e-6)


@needs_optuna
@pytest.mark.slow
def test_report_ranks_the_sweep_plots_it_and_its_best_command_reproduces_the_best_trial(optuna_sweep, tmp_path):
    sweep_dir, _, _ = optuna_sweep
    out = tmp_path / "report"
    proc = run("scripts/report.py", str(sweep_dir), "--out", str(out))
    values = {n: read_json(sweep_dir / n / "metrics.json")["val/rmse"] for n in ("0", "1", "2")}
    best = min(values, key=values.get)
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [row.split(" | ")[1] for row in rows] == sorted(values, key=values.get)
    assert "3 trials (3 completed) in 2 session(s)" in text
    for png in ("curves.png", "params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("python scripts/train.py ") and "hparams_search" not in command
    from recsys_torch.train import train

    # the printed overrides, composed as scripts/train.py would and run in-process (faster)
    metrics = train(compose_cfg([*shlex.split(command)[2:], "logger=none"]), str(tmp_path / "rerun"))
    assert metrics["val/rmse"] == pytest.approx(values[best], rel=1e-5)


@pytest.mark.slow
def test_basic_sweeper_runs_a_grid_and_report_reads_it(tmp_path):
    sweep_dir = tmp_path / "grid"
    run("scripts/train.py", "-m", "model.embedding_dim=4,8", *TINY_TRIAL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    sweep = report.load(str(sweep_dir))
    assert [t.name for t in sweep.trials] == ["0", "1"]
    assert sweep.searched == ["model.embedding_dim"]
    assert sweep.best.value("val/rmse") == min(t.value("val/rmse") for t in sweep.trials)


@pytest.mark.parametrize("search, metric, direction", [
    ("mf_optuna", "val/rmse", "minimize"),
    ("hybrid_optuna", "val/rmse", "minimize"),
    ("ranking_optuna", "val/ndcg@10", "maximize"),
])
@needs_optuna
def test_search_configs_optimize_a_validation_metric_their_runs_report(search, metric, direction, tmp_path):
    from recsys_torch.train import train

    cfg = compose_cfg([f"hparams_search={search}"])
    assert cfg.optimized_metric == metric
    assert metric in train(cfg, str(tmp_path))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        hydra_cfg = compose(config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert hydra_cfg.hydra.sweeper.direction == direction
    assert hydra_cfg.hydra.sweeper.n_jobs == 1
    params = hydra_cfg.hydra.sweeper.params
    assert {"trainer.lr", "trainer.batch_size", "trainer.patience", "model.embedding_dim", "model.reg"} <= set(params)
    assert ("model.fusion" in params) == (search == "hybrid_optuna")


def test_recorder_numbers_new_trials_after_the_folders_already_there(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from recsys_torch.tools import sweep as callbacks

    monkeypatch.setattr(callbacks, "_trial_offset", 0)  # restored after the test
    for name in ("0", "3", "notes"):
        (tmp_path / name).mkdir()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    callbacks.SweepRecorder().on_multirun_start(cfg)
    assert [callbacks.trial_dir(n) for n in (0, 1)] == ["4", "5"]
    overrides = OmegaConf.to_container(cfg.hydra.overrides.hydra, resolve=False)
    assert "hydra.sweep.subdir='${trial_dir:${hydra.job.num}}'" in overrides
    budget = read_json(tmp_path / "budget.json")
    assert (budget["n_trials"], len(budget["sessions"]), budget["sessions"][0]["ended"]) == (0, 1, None)


@needs_optuna
def test_config_values_outside_the_search_space_are_not_queued():
    from hydra import compose, initialize_config_dir

    from recsys_torch.tools.sweep import config_values_in_space

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hparams_search=hybrid_optuna", "model.embedding_dim=48", "trainer.lr=0.003"])
    values = config_values_in_space(cfg)
    assert "model.embedding_dim" not in values  # 48 is not among the choices
    assert values["trainer.lr"] == 0.003 and values["model.fusion"] == cfg.model.fusion


def test_a_failing_trial_does_not_end_the_sweep(tmp_path):
    """A user error inside one trial of a sweep fails that trial alone; later trials still run."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", "data=synthetic", "data.n_ratings=2000", "trainer.epochs=1",
         "logger=none", "trainer.progress=false", "trainer.lr=-1,0.01", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert "trainer.lr must be a finite number > 0" in proc.stderr
    assert not (tmp_path / "0" / "metrics.json").exists()
    assert (tmp_path / "1" / "metrics.json").exists(), proc.stderr[-2000:]
