"""SIGINT and SIGTERM always stop a run: outside training too (SIGTERM's default would kill the
process silently, its run folder left "running"), after the last training step, inside a finalizer
that swallows the exception, and in a sweep (not only its current trial)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from recsys_torch import signals
from recsys_torch.errors import TrainingInterrupted
from recsys_torch.runfolder import RunFolder, read_manifest


@pytest.mark.parametrize("sig, line", [(signal.SIGTERM, "error: terminated (SIGTERM)"),
                                       (signal.SIGINT, "error: interrupted")])
def test_a_script_stopped_outside_training_says_so_in_one_line(sig, line):
    code = ("import os, sys\nfrom recsys_torch import cli\n"
            f"def body(argv):\n    os.kill(os.getpid(), {int(sig)})\n    print('went on')\n"
            "sys.exit(cli.run(body))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + sig and proc.stdout == ""
    assert proc.stderr == line + "\n"


def test_a_signal_swallowed_by_a_finalizer_still_fails_the_run(tmp_path, recwarn):
    signals.install()

    class SignalsWhenCollected:
        def __del__(self):  # the handler's exception is raised here, and Python only prints it
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT") as info:
        with RunFolder(str(tmp_path)) as run:
            obj = SignalsWhenCollected()
            del obj  # "Exception ignored in ... KeyboardInterrupt": the run would go on
            run.finish([])
    assert info.value.signum == signal.SIGINT
    assert read_manifest(str(tmp_path))["status"] == "failed"


def test_a_signal_after_the_last_training_step_stops_the_run():
    with pytest.raises(TrainingInterrupted, match="SIGTERM after its last step"):
        with signals.SignalGuard():
            os.kill(os.getpid(), signal.SIGTERM)  # recorded; no step comes to look at it
    assert signal.getsignal(signal.SIGTERM) is not None
    with pytest.raises(ValueError):  # an error already on its way is not replaced
        with signals.SignalGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError


def test_an_interrupted_trial_stops_the_sweep(monkeypatch, tmp_path):
    from recsys_torch import train as entry

    def interrupted(cfg, output_dir, need_objective=False):
        raise TrainingInterrupted("training stopped by SIGINT", signal.SIGINT)

    monkeypatch.setattr(entry, "train", interrupted)
    with pytest.raises(TrainingInterrupted):
        entry._trial(None, str(tmp_path))


def test_a_signal_that_stopped_an_earlier_run_does_not_fail_the_next(tmp_path):
    """In a notebook one process runs many fits: a Ctrl-C that stopped one is not the next one's."""
    signals.record(signal.SIGINT)  # what the trainer's guard recorded when an earlier fit was stopped
    with RunFolder(str(tmp_path)) as run:
        run.finish([])
    assert read_manifest(str(tmp_path))["status"] == "complete"
