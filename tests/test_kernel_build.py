"""Building the fused kernel never hangs on a lock a killed build left, never makes two checkouts
rebuild each other's kernel, and stops the run on a signal (the compiler itself is replaced by a
stand-in: these tests are about the locking around it)."""

import os
import shutil
import signal
import time

import pytest
import torch
import torch.utils.cpp_extension


# ---- building the kernel: never hang, never collide, stop on a signal --------------------------------------
@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The kernel module in a clean state, building into an empty folder with a stand-in compiler."""
    from recsys_torch import fused

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(fused, "_extension", None)
    monkeypatch.setattr(fused, "_failed", None)
    calls = []

    def fake_load(name, sources, extra_cflags, build_directory, verbose):
        calls.append((name, build_directory, os.path.exists(os.path.join(build_directory, "lock"))))
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    return fused, calls


def test_a_lock_left_by_a_killed_build_is_cleared(fresh_build):
    fused, calls = fresh_build
    _, folder = fused.build_directory()
    os.makedirs(folder)
    open(os.path.join(folder, "lock"), "w").close()  # torch's baton, never removed by a SIGKILLed build
    assert fused.load_extension(timeout=1) == "module"
    assert calls == [(calls[0][0], folder, False)]  # torch would have waited on it forever


def test_the_first_build_says_it_compiles_and_a_built_kernel_only_loads(fresh_build, caplog):
    """The first run pauses for the compiler: a warning says so (it shows from the Python API too)."""
    import logging

    fused, calls = fresh_build
    with caplog.at_level(logging.INFO, logger=fused.log.name):
        assert fused.load_extension(timeout=1) == "module"
    first = [r for r in caplog.records if "fused MF kernel" in r.getMessage()]
    assert [r.levelno for r in first] == [logging.WARNING] and "compiling" in first[0].getMessage()
    _, folder = fused.build_directory()
    open(os.path.join(folder, calls[0][0] + ".so"), "w").close()  # what the compiler leaves
    caplog.clear()
    fused._extension = None
    with caplog.at_level(logging.INFO, logger=fused.log.name):
        assert fused.load_extension(timeout=1) == "module"
    again = [r for r in caplog.records if "fused MF kernel" in r.getMessage()]
    assert [r.levelno for r in again] == [logging.INFO] and "loading" in again[0].getMessage()


def test_a_build_held_by_another_process_times_out_to_the_pure_path(fresh_build, caplog):
    import fcntl

    fused, calls = fresh_build
    _, folder = fused.build_directory()
    os.makedirs(folder)
    fd = os.open(os.path.join(folder, "recsys_torch.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another builder, alive
    try:
        t0 = time.monotonic()
        assert fused.load_extension(timeout=0.5) is None
        assert time.monotonic() - t0 < 5 and calls == []
    finally:
        os.close(fd)
    assert "recsys_torch.lock" in caplog.text and "pure PyTorch path" in caplog.text


def test_two_checkouts_build_in_two_folders(monkeypatch, tmp_path):
    from recsys_torch import fused

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = fused.build_directory()
    copy = tmp_path / "other-checkout" / "mf_fused.cpp"
    copy.parent.mkdir()
    shutil.copy(fused._SOURCE, copy)
    monkeypatch.setattr(fused, "_SOURCE", str(copy))
    second = fused.build_directory()
    assert first[0] != second[0] and first[1] != second[1]  # same source, other checkout: its own build


def test_a_signal_during_the_build_stops_the_run(fresh_build, monkeypatch):
    from recsys_torch.errors import TrainingInterrupted

    fused, _ = fresh_build

    def interrupted_load(**kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the compiler runs
        time.sleep(5)
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, sources, **kw: interrupted_load(**kw))
    with pytest.raises(TrainingInterrupted, match="build of the fused MF kernel was stopped by SIGINT") as info:
        fused.load_extension(timeout=1)
    assert info.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_two_ninjas_build_in_two_folders(monkeypatch, tmp_path):
    """A venv's ninja and the system's record their build commands differently: sharing a folder,
    each rebuilt the other's object (a minute, holding the build lock)."""
    from recsys_torch import fused

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_ninja", lambda: "/venv/bin/ninja 1.13.2")
    first = fused.build_directory()
    monkeypatch.setattr(fused, "_ninja", lambda: "/usr/bin/ninja 1.11.1")
    assert fused.build_directory()[1] != first[1]
    monkeypatch.undo()
    assert fused._ninja() == fused._ninja()  # the real one: stable within a machine
