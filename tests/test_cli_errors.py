"""Config mistakes end with one `error:` line and exit 2, in-process and from the command line."""

import os
import subprocess
import sys

import pytest

from recsys_torch.errors import ConfigError
from recsys_torch.cli import check_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_key_no_component_takes_is_refused(compose):
    cfg = compose(["+model.embeding_dim=8"])
    with pytest.raises(ConfigError, match=r"model.embeding_dim is not a setting of MFModel.*embedding_dim"):
        check_keys(cfg)


def test_every_shipped_config_passes_the_key_check(compose):
    for overrides in (["model=popularity"], ["model=baseline"], ["model=content"], ["model=hybrid"],
                      ["split=kfold"], ["split=user"], ["split=temporal"], ["split=leave_last"],
                      ["split=cold_item"], ["split=cold_user"], ["task=ranking"], ["trainer=gpu"],
                      ["trainer=ddp"], ["data=csv", "data.ratings=x.csv"]):
        check_keys(compose(overrides))


@pytest.mark.parametrize("override, message", [
    # the closest real key and the group's keys, not Hydra's advice to append with +
    ("model.embeding_dim=8", "model.embeding_dim is not a setting of model (did you mean embedding_dim?); its "
                             "settings are: embedding_dim, init_std, reg, reg_bias, reg_exponent"),
    ("+model.embeding_dim=8", "model.embeding_dim is not a setting of MFModel (did you mean embedding_dim?)"),
    ("model=foo", "Could not find 'model/foo' (options: baseline, content, hybrid, mf, popularity)"),
])
def test_cli_config_mistakes_are_one_line(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "data=synthetic", override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def own_experiments(tmp_path):
    """A config folder of one's own, on Hydra's search path: one good experiment and one that is no YAML."""
    folder = tmp_path / "configs" / "experiment"
    folder.mkdir(parents=True)
    (folder / "tiny.yaml").write_text("# @package _global_\nmodel:\n  embedding_dim: 4\ntrainer:\n  epochs: 1\n")
    (folder / "broken.yaml").write_text("# @package _global_\ndefaults:\n  - override /task:\n  threshold: 4.0\n")
    return f"hydra.searchpath=[file://{tmp_path / 'configs'}]"


def test_an_experiment_of_ones_own_on_the_search_path_passes_the_precheck(tmp_path, capsys):
    """The precheck composed the config without hydra.searchpath, and refused every experiment that
    lives outside configs/ ("Could not find 'experiment/tiny'")."""
    from recsys_torch.cli import precheck

    precheck([own_experiments(tmp_path), "experiment=tiny", "data=synthetic"])  # no SystemExit
    assert capsys.readouterr().err == ""


def test_a_config_file_that_is_no_yaml_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train.py", own_experiments(tmp_path), "experiment=broken",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path}/configs/experiment/broken.yaml, line 4: not valid YAML (while parsing a "
                     "block collection: expected <block end>, but found '?')"], proc.stderr
