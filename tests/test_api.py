"""The Python API: the README's snippet runs as written, and a run made from Python is the same
kind of run folder as one of scripts/train.py."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api:start -->\s*```python\n(.*?)```\s*<!-- api:end -->", text, re.S)
    assert block, "README has no api snippet"
    return block.group(1)


def tiny_ratings(folder) -> None:
    rng = np.random.default_rng(0)
    rows = [(u, int(i), int(rng.integers(1, 6))) for u in range(1, 61) for i in rng.choice(40, 20, replace=False)]
    pd.DataFrame(rows, columns=["userId", "movieId", "rating"]).to_csv(folder / "ratings.csv", index=False)


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    tiny_ratings(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = readme_snippet().replace("epochs=20", "epochs=3, progress=False", 1)  # tiny, quick
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 5 + 1 and float(out[0].split()[0]) > 0
    from recsys_torch.runfolder import complete_metrics

    assert complete_metrics(str(tmp_path / "runs" / "mf"))["run_id"]
    assert (tmp_path / "runs" / "mf" / "tb").is_dir() and (tmp_path / "runs" / "mf" / "recommend.npz").exists()


def test_fit_takes_the_command_lines_defaults_and_refuses_unknown_names(tmp_path):
    import recsys_torch as rt
    from recsys_torch.errors import ConfigError

    tiny_ratings(tmp_path)
    data = rt.load(str(tmp_path / "ratings.csv"), columns={"user": "userId", "item": "movieId"})
    run = rt.fit(data, model="mf", out=str(tmp_path / "run"), epochs=1, progress=False, tensorboard=False)
    import torch

    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["model_config"]["reg"] == 1.0 and saved["model_config"]["reg_exponent"] == 0.5  # configs/model/mf.yaml
    assert saved["config"]["trainer"]["lr"] == 0.005 and run.metrics["n_train"] > 0
    with pytest.raises(ConfigError, match=r"unknown model 'nope' \(choose one of baseline, content, hybrid, mf"):
        rt.fit(data, model="nope", out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"unknown model_args key of mf 'embeding_dim' \(did you mean embedding_dim\?\)"):
        rt.fit(data, model="mf", out=str(tmp_path / "y"), model_args={"embeding_dim": 8}, epochs=1)
    with pytest.raises(ConfigError, match=r"unknown trainer setting 'epoch' \(did you mean epochs\?\)"):
        rt.fit(data, model="mf", out=str(tmp_path / "z"), epoch=1)
    with pytest.raises(ConfigError, match=r"unknown trainer setting 'overwrite'; the settings are: epochs, "):
        rt.fit(data, model="mf", out=str(tmp_path / "z"), overwrite=True)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # refused before any run folder


def test_fit_takes_a_models_preset_for_the_task_as_the_command_line_does(tmp_path):
    """rt.fit(model=..., task=...) composes configs/preset/<model>_<task>.yaml like train.py: the same
    model, task and trainer settings as `train.py model=... task=...`, and the caller's keywords win."""
    import recsys_torch as rt
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    tiny_ratings(tmp_path)
    data = rt.load(str(tmp_path / "ratings.csv"), columns={"user": "userId", "item": "movieId"})
    for model in ("mf", "hybrid"):
        run = rt.fit(data, model=model, task="ranking", split="user", out=str(tmp_path / model), epochs=1,
                     progress=False, tensorboard=False)
        config = torch.load(os.path.join(run.path, "checkpoint.pt"), weights_only=True)["config"]
        cli = OmegaConf.to_container(compose_cfg([f"model={model}", "task=ranking"]), resolve=True)
        assert {k: v for k, v in config["model"].items()} == cli["model"]
        assert config["trainer"]["lr"] == cli["trainer"]["lr"] and config["trainer"]["epochs"] == 1
    assert config["trainer"]["batch_size"] == 100000  # the hybrid preset's, not the default trainer's
    mine = rt.fit(data, model="mf", task="ranking", split="user", out=str(tmp_path / "mine"), epochs=1, progress=False,
                  tensorboard=False, model_args={"embedding_dim": 16})
    config = torch.load(os.path.join(mine.path, "checkpoint.pt"), weights_only=True)["config"]
    assert config["model"]["embedding_dim"] == 16


def test_fit_warns_about_model_l2_settings_the_gramian_loss_ignores(tmp_path, caplog):
    """task=ranking trains the Gramian loss, whose L2 is task.reg: a model_args reg would change nothing."""
    import recsys_torch as rt

    tiny_ratings(tmp_path)
    data = rt.load(str(tmp_path / "ratings.csv"), columns={"user": "userId", "item": "movieId"})
    with caplog.at_level("WARNING", logger="recsys_torch"):
        rt.fit(data, model="mf", task="ranking", split="user", out=str(tmp_path / "run"), epochs=1, progress=False,
               tensorboard=False, model_args={"reg": 0.5, "embedding_dim": 8})
    assert [r.getMessage().split(" changes")[0] for r in caplog.records if "task.loss=gramian" in r.getMessage()] == \
        ["model.reg"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="recsys_torch"):  # a loss that uses the model's L2: nothing to say
        rt.fit(data, model="mf", task="ranking", split="user", out=str(tmp_path / "bpr"), epochs=1, progress=False,
               tensorboard=False, model_args={"reg": 0.5}, task_args={"loss": "bpr"})
    assert not [r for r in caplog.records if "task.loss=gramian" in r.getMessage()]
