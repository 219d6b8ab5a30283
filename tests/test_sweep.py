"""Sweeps end to end on tiny synthetic data: the Optuna sweeper with its study in the sweep folder
(resumed by re-running the command), budget.json, TensorBoard events and HPARAMS per trial,
scripts/report.py on the result, and Hydra's basic sweeper running a grid without the extra."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
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
    """Two trials, then the same command with n_trials=3: the resumed study runs one more. Returns
    the folder, the first session's trial parameters and both sessions' processes."""
    if not HAVE_OPTUNA_SWEEPER:
        pytest.skip("the sweep extra (hydra-optuna-sweeper) is not installed")
    sweep_dir = tmp_path_factory.mktemp("optuna_sweep")
    args = ["-m", "hparams_search=mf_optuna", *TINY_TRIAL, f"hydra.sweep.dir={sweep_dir}"]
    session = run("scripts/train.py", *args, "hydra.sweeper.n_trials=2")
    first = {name: trial_params(sweep_dir / name) for name in ("0", "1")}
    resumed = run("scripts/train.py", *args, "hydra.sweeper.n_trials=3")
    return sweep_dir, first, resumed, session


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

    sweep_dir, first, resumed, _ = optuna_sweep
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
    sweep_dir, _, _, _ = optuna_sweep
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

    sweep_dir, _, _, _ = optuna_sweep
    mux = EventMultiplexer(purge_orphaned_data=False).AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    assert sorted(mux.Runs()) == [os.path.join(n, "tb") for n in ("0", "1", "2")]
    for name in ("0", "1", "2"):
        run_name = os.path.join(name, "tb")
        epochs = [e.step for e in mux.Scalars(run_name, "val/rmse")]
        assert epochs == [1, 2]  # the final metrics live under their own tags, not as a step-0 point
        content = mux.PluginRunToTagToContent("hparams")[run_name]
        data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = {k: v.number_value or v.string_value for k, v in data.session_start_info.hparams.items()}
        for key, value in trial_params(sweep_dir / name).items():
            assert hparams[key] == pytest.approx(float(value))
        metrics = read_json(sweep_dir / name / "metrics.json")
        assert mux.Scalars(run_name, "zz_final/test/rmse")[-1].value == pytest.approx(metrics["test/rmse"], rel=1e-6)
        # tag groups are listed alphabetically: the single points come after every curve
        groups = sorted({tag.split("/")[0] for tag in mux.GetAccumulator(run_name).Tags()["scalars"]})
        assert groups[-1] == "zz_final" and {"train", "val", "lr"} <= set(groups)
        # the run's identity names it in the HPARAMS table
        assert {"model", "data", "split", "task", "seed"} <= set(hparams)


@needs_optuna
@pytest.mark.slow
def test_report_ranks_the_sweep_plots_it_and_its_best_command_reproduces_the_best_trial(optuna_sweep, tmp_path):
    sweep_dir, _, _, _ = optuna_sweep
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
    if search == "ranking_optuna":  # the Gramian loss solved by ALS: its own settings, no learning rate
        assert {"task.gramian_weight", "task.reg", "task.confidence", "task.negative_weight",
                "model.embedding_dim"} <= set(params)
    else:
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
    # a value on the command line takes a parameter out of the search (the sweeper's rule), whether
    # the space held it (trainer.lr) or not (48 is not among the embedding_dim choices)
    assert "model.embedding_dim" not in values and "trainer.lr" not in values
    assert values["model.fusion"] == cfg.model.fusion and values["model.reg"] == cfg.model.reg


def test_a_failing_trial_does_not_end_the_sweep(tmp_path):
    """A user error inside one trial of a sweep fails that trial alone; later trials still run."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", "data=synthetic", "data.n_ratings=2000", "trainer.epochs=1",
         "logger=none", "trainer.progress=false", "trainer.lr=-1,0.01", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert "trainer.lr must be a finite number > 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "0" / "metrics.json").exists()
    assert (tmp_path / "1" / "metrics.json").exists(), proc.stderr[-2000:]


# ---- what a sweep prints: one line per trial, then the best, the folder and the report command -------
TRIAL_LINE = re.compile(r"^trial (\d+)  (val/rmse (\d\.\d{4})|failed) +\d+\.\d s  (.*?)(  \((.*)\))*$")
NOISE = ("setup plugin", "Warning", "Storage:", "\x1b[", "Launching", "Traceback", "summary", "[HYDRA]", "epoch ")


def trial_lines(out: str) -> dict[str, re.Match]:
    return {m.group(1): m for m in map(TRIAL_LINE.match, out.splitlines()) if m}


@needs_optuna
@pytest.mark.slow
def test_an_optuna_sweep_prints_one_line_per_trial_then_the_best_and_the_report_command(optuna_sweep):
    sweep_dir, first, resumed, session = optuna_sweep
    out = session.stdout + session.stderr
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out
    lines = out.splitlines()
    assert len(lines) == 6, out
    assert lines[0] == f"study mf_optuna: 2 trials, minimize val/rmse, in {sweep_dir}"
    trials = trial_lines(out)
    assert list(trials) == ["0", "1"] and lines[1:3] == [m.group(0) for m in trials.values()]
    values = {n: read_json(sweep_dir / n / "metrics.json")["val/rmse"] for n in ("0", "1")}
    for name, match in trials.items():
        assert float(match.group(3)) == pytest.approx(values[name], abs=5e-5)
        shown = dict(p.split("=", 1) for p in match.group(4).split())
        assert list(shown) == ["trainer.lr", "trainer.batch_size", "trainer.patience", "model.embedding_dim",
                               "model.reg", "model.reg_bias"]  # the searched ones, not the fixed overrides
        assert {k: float(shown[k]) for k in first[name]} == pytest.approx(
            {k: float(v) for k, v in first[name].items()}, rel=1e-3)
    assert trials["0"].group(0).endswith("(the config's own values)")
    best = min(values, key=values.get)
    assert re.fullmatch(rf"best: trial {best}, val/rmse = {values[best]:.4f} \(2 of 2 trials completed, \d+ s\)", lines[3])
    assert lines[4:] == [f"sweep folder: {sweep_dir}", f"report: python scripts/report.py {sweep_dir}"]
    # the resumed session: its own first line, the new trial, the best of all three
    again = (resumed.stdout + resumed.stderr).splitlines()
    assert again[0] == "resuming study mf_optuna: 2 of 3 trials finished, running 1 more"
    assert list(trial_lines("\n".join(again))) == ["2"] and len(again) == 5
    assert re.match(r"best: trial \d, val/rmse = 0\.\d{4} \(3 of 3 trials completed", again[2])


@needs_optuna
@pytest.mark.slow
def test_a_failed_optuna_trial_is_one_line_and_the_sweep_goes_on(tmp_path):
    """A user error in a trial (here a batch size the search range should not have offered) fails
    that trial alone: its line says why, Optuna records it as failed, the next trials run."""
    proc = run("scripts/train.py", "-m", "hparams_search=mf_optuna", *TINY_TRIAL, "logger=none",
               "hydra.sweeper.n_trials=3", "trainer.batch_size=choice(-5, 512)", f"hydra.sweep.dir={tmp_path}")
    out = proc.stdout + proc.stderr
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out
    assert "trial failed" not in out  # the entry point's own line for it stays in the trial's train.log
    trials = trial_lines(out)
    assert list(trials) == ["0", "1", "2"], out
    failed = {n for n, m in trials.items() if m.group(2) == "failed"}
    assert failed and failed != set(trials)
    for name, match in trials.items():
        if name in failed:
            assert "trainer.batch_size=-5 " in match.group(4) + " "
            assert match.group(0).endswith("(failed: trainer.batch_size must be an integer >= 1, got -5)")
        else:
            assert "trainer.batch_size=512" in match.group(4)
    import optuna

    from recsys_torch.tools.sweep import sqlite_storage

    study = optuna.load_study(study_name="mf_optuna", storage=sqlite_storage(str(tmp_path / "optuna.db")))
    assert {str(t.number) for t in study.trials if t.state.name == "FAIL"} == failed
    budget = read_json(tmp_path / "budget.json")
    assert budget["n_completed"] == 3 - len(failed)
    assert {t["dir"] for t in budget["trials"] if t["status"] == "FAILED"} == failed
    assert out.splitlines()[-3].startswith(f"best: trial ")


def test_recorder_lines_for_finished_and_failed_trials(tmp_path, monkeypatch, caplog):
    """The per-trial line, here for a grid (no sweeper plugin): the searched values are the overrides
    the command line swept. A trial that returns no objective failed: the reason is the one the entry
    point logged, else run.json's; a trial that raised (a bug) gets its traceback logged too."""
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import read_write

    from recsys_torch.tools import sweep as callbacks

    monkeypatch.setattr(callbacks, "_trial_offset", 0)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.sweep.dir={tmp_path}", "trainer.progress=false"],
                      return_hydra_config=True)
    with read_write(cfg.hydra.overrides):
        cfg.hydra.overrides.task = ["model.reg=1,100,7,5", "trainer.progress=false"]
    recorder = callbacks.SweepRecorder()
    caplog.set_level(logging.INFO)
    recorder.on_multirun_start(cfg)
    try:
        raise TypeError("boom")
    except TypeError as exc:
        bug = exc
    jobs = [("1", 0.91, None, None), ("100", float("nan"), "loss became nan at epoch 3 (logged)", "raw exception"),
            ("7", None, None, "the run's own reason"), ("5", bug, None, None)]
    for n, (reg, value, logged, manifest) in enumerate(jobs):
        folder = tmp_path / str(n)
        folder.mkdir()
        if manifest:
            (folder / "run.json").write_text(json.dumps({"status": "failed", "error": manifest}))
        elif isinstance(value, float):
            (folder / "metrics.json").write_text(json.dumps({"optimized_metric": "val/rmse", "val/rmse": value}))
        job = JobReturn(overrides=[f"model.reg={reg}", "trainer.progress=False"],
                        status=JobStatus.FAILED if value is bug else JobStatus.COMPLETED)
        job.return_value = value
        recorder.on_job_start(cfg)
        if logged:
            logging.getLogger("recsys_torch").error("trial failed: %s", logged)
        recorder.on_job_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}}), job)
        if n == 1:
            assert job.return_value is None  # what Optuna records as a failed trial (it refuses NaN)
    recorder.on_multirun_end(cfg)
    raised = [r for r in caplog.records if r.name == "recsys_torch.trial"]
    assert len(raised) == 1 and raised[0].exc_info[1] is bug
    lines = [r.getMessage() for r in caplog.records if r.name == "recsys_torch.tools.sweep"]
    assert lines[0] == f"sweep in {tmp_path}"
    assert re.fullmatch(r"trial 0  val/rmse 0\.9100 +\d+\.\d s  model\.reg=1", lines[1]), lines[1]
    assert re.fullmatch(r"trial 1  failed +\d+\.\d s  model\.reg=100  \(failed: loss became nan at epoch 3 \(logged\)\)",
                        lines[2]), lines[2]
    assert lines[3].endswith("model.reg=7  (failed: the run's own reason)"), lines[3]
    assert lines[4].endswith("model.reg=5  (failed: TypeError: boom)"), lines[4]
    assert lines[5].startswith("best: trial 0, val/rmse = 0.9100 (1 of 4 trials completed")
    assert lines[6:] == [f"sweep folder: {tmp_path}", f"report: python scripts/report.py {tmp_path}"]
    budget = read_json(tmp_path / "budget.json")
    assert [(t["status"], t["objective"], t.get("error")) for t in budget["trials"]] == [
        ("COMPLETED", 0.91, None), ("FAILED", None, "loss became nan at epoch 3 (logged)"),
        ("FAILED", None, "the run's own reason"), ("FAILED", None, "TypeError: boom")]
    assert not [h for h in logging.getLogger("recsys_torch").handlers if isinstance(h, callbacks._FailureListener)]


def test_console_filter_shows_each_warning_once_and_not_the_failure_the_trial_line_gives():
    from recsys_torch.tools import sweep as callbacks

    callbacks._shown.clear()
    console = callbacks.ConsoleFilter(loud=["recsys_torch.data.fetch"])

    def record(name, level, message):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    assert [console.filter(record(*args)) for args in [
        ("recsys_torch", logging.INFO, "data synthetic: 1,200 ratings"),
        ("recsys_torch.data.fetch", logging.INFO, "ml-100k: downloading"),
        ("recsys_torch.data.dataset", logging.WARNING, "dropped 3 duplicate ratings"),
        ("recsys_torch.data.dataset", logging.WARNING, "dropped 3 duplicate ratings"),  # the next trial's
        ("recsys_torch", logging.ERROR, "trial failed: trainer.lr must be > 0"),
        ("recsys_torch", logging.ERROR, "something else broke"),
    ]] == [False, True, True, False, False, True]


@needs_optuna
def test_a_search_range_given_on_the_command_line_replaces_the_configs(tmp_path):
    """The config's own batch size (1024) is outside choice(-5, 512) from the command line: it is not
    queued (Optuna would refuse it); the other defaults still are."""
    from hydra import compose, initialize_config_dir
    from omegaconf import read_write

    from recsys_torch.tools.sweep import config_values_in_space

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=mf_optuna"], return_hydra_config=True)
    with read_write(cfg.hydra.overrides):  # as -m composes it: the sweep override stays unapplied
        cfg.hydra.overrides.task.append("trainer.batch_size=choice(-5, 512)")
        cfg.hydra.overrides.task.append("model.reg=3")
    values = config_values_in_space(cfg)
    assert "trainer.batch_size" not in values and "model.reg" not in values  # fixed: not searched at all
    assert values["trainer.lr"] == cfg.trainer.lr and values["model.embedding_dim"] == cfg.model.embedding_dim


@pytest.mark.parametrize("text", ['{"n_trials": 2, "tri', '[]', '{"sessions": [], "trials": [{"dir": "0"}]}'])
def test_recorder_sets_an_unreadable_budget_aside_and_starts_a_new_one(tmp_path, monkeypatch, text):
    from hydra import compose, initialize_config_dir

    from recsys_torch.tools import sweep as callbacks

    monkeypatch.setattr(callbacks, "_trial_offset", 0)
    (tmp_path / "budget.json").write_text(text)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    callbacks.SweepRecorder().on_multirun_start(cfg)
    assert (tmp_path / "budget.json.bad").read_text() == text
    budget = read_json(tmp_path / "budget.json")
    assert (budget["n_trials"], len(budget["sessions"])) == (0, 1)
