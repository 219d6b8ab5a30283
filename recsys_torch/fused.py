"""The fast CPU path: one compiled call per batch for biased MF with the MSE loss.

The kernel (``csrc/mf_fused.cpp``, built on first use with torch's own extension tooling and cached
under ``$TORCH_EXTENSIONS_DIR``) does the forward pass, the gradient and the row-wise SGD or lazy-Adam
update of :mod:`recsys_torch.optim` in one pass over the batch, without autograd, sparse tensors or
per-op dispatch. It computes the same step as the pure-PyTorch path (tested to float32 rounding); the
pure path remains the reference and the fallback where no compiler is available.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time

import torch

from recsys_torch.errors import TrainingInterrupted
from recsys_torch.optim import OptimizerGroup, advance_adam_state
from recsys_torch.signals import record, signal_name

log = logging.getLogger(__name__)

ONLINE_CHUNK = 16384  # ratings per trainer step (progress, loss logging, signal checks) in online SGD

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "mf_fused.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
# How long a run waits for another process's build of the kernel before it trains on the pure path.
LOCK_TIMEOUT = float(os.environ.get("RECSYS_TORCH_KERNEL_LOCK_TIMEOUT", "120"))
_lock = threading.Lock()
_extension = None
_failed: str | None = None


def build_directory() -> tuple[str, str]:
    """``(module name, build folder)`` of this checkout's kernel. Both carry a hash of the source's
    path and content, the flags, torch's version and the ninja on PATH: two checkouts (or versions, or
    ninjas) never share a build folder, so neither makes ninja rebuild the other's."""
    from torch.utils.cpp_extension import get_default_build_root

    with open(_SOURCE, "rb") as fh:
        key = fh.read() + "\0".join([_SOURCE, *FLAGS, torch.__version__, _ninja()]).encode()
    name = f"recsys_torch_mf_fused_{hashlib.sha256(key).hexdigest()[:16]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return name, os.path.join(root, name)


def _ninja() -> str:
    """Which ninja builds the kernel (its path and version): two ninjas record their build commands
    differently, and each would rebuild the other's objects (a minute, holding the build lock)."""
    import shutil
    import subprocess

    path = shutil.which("ninja") or ""
    try:
        version = subprocess.run([path or "ninja", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{path} {version.strip()}"


@contextlib.contextmanager
def _build_lock(folder: str, timeout: float):
    """Our own lock on ``folder`` (an OS file lock, released when its process dies however it dies):
    yields whether it was taken within ``timeout`` seconds."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "recsys_torch.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # Windows: no stale-lock protection beyond torch's own
        os.close(fd)
        yield True
        return
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_recorded(received: list):
    """SIGINT and SIGTERM during the build stop it (the compiler is killed) and are recorded, so that
    the run stops too instead of training on without the kernel."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        received.append(signum)
        record(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_extension(timeout: float | None = None):
    """The compiled module, or None (with the reason logged once) when it cannot be built, or when
    another process's build of it does not finish within ``timeout`` seconds (default
    :data:`LOCK_TIMEOUT`). A SIGINT or SIGTERM during the build raises :class:`TrainingInterrupted`."""
    global _extension, _failed
    with _lock:
        if _extension is not None or _failed is not None:
            return _extension
        try:
            from torch.utils.cpp_extension import load

            name, folder = build_directory()
        except Exception as exc:  # noqa: BLE001 -- no build tooling at all: fall back
            _failed = _first_line(exc)
            log.warning("fused MF kernel unavailable (%s); using the pure PyTorch path", _failed)
            return None
        received: list[int] = []
        with _build_lock(folder, LOCK_TIMEOUT if timeout is None else timeout) as locked:
            if not locked:
                _failed = "another process is building it"
                log.warning("the fused MF kernel is being built by another process (lock %s held for more than "
                            "%g s); this run uses the pure PyTorch path", os.path.join(folder, "recsys_torch.lock"),
                            LOCK_TIMEOUT if timeout is None else timeout)
                return None
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):  # torch's own lock, left by a build that was killed (we hold the folder)
                log.warning("removing %s, left by an interrupted build of the fused MF kernel", stale)
                os.unlink(stale)
            try:
                if any(f.endswith((".so", ".pyd")) for f in os.listdir(folder)):
                    log.info("loading the fused MF kernel (built once per source version, then cached in %s)", folder)
                else:  # a pause of a minute or so, once: say so where it shows, also from the Python API
                    log.warning("compiling the fused MF kernel, once per source version (about a minute on 2 "
                                "cores; cached in %s; trainer.fused=false skips it)", folder)
                with _signals_recorded(received):
                    _extension = load(name=name, sources=[_SOURCE], extra_cflags=FLAGS, build_directory=folder,
                                      verbose=False)
            except KeyboardInterrupt:
                if not received:
                    raise
            except Exception as exc:  # no compiler, no ninja, headers missing: fall back
                _failed = _first_line(exc)
                log.warning("fused MF kernel unavailable (%s); using the pure PyTorch path", _failed)
            finally:
                if os.path.exists(stale):
                    os.unlink(stale)
        if received:
            _extension = None
            raise TrainingInterrupted(f"the build of the fused MF kernel was stopped by "
                                      f"{signal_name(received[0])}; nothing was trained", received[0])
        return _extension


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def supports(model, task, optimizer: str, device: torch.device) -> bool:
    """Whether the fused step computes exactly this model/task/optimizer combination."""
    from recsys_torch.models.mf import MFModel
    from recsys_torch.tasks import RatingTask

    return (type(model) is MFModel and type(task) is RatingTask and not task.weighted and optimizer in ("sgd", "adam")
            and device.type == "cpu" and model.user_factors.weight.dtype == torch.float32)


class FusedMF(torch.optim.Optimizer):
    """An optimizer over an MFModel's four tables whose :meth:`fused_step` also computes the loss
    and gradients. Its ``param_groups`` / ``state`` mirror :class:`~recsys_torch.optim.RowAdam`, so
    learning-rate schedulers and checkpoints work unchanged."""

    def __init__(self, model, optimizer: str = "adam", lr: float = 0.001, betas=(0.9, 0.999), eps: float = 1e-8,
                 online: bool = False):
        self.model = model
        self.adam = optimizer == "adam"
        # online: per-rating SGD over each chunk passed to fused_step (batch_size=1 semantics)
        self.online = bool(online) and not self.adam
        self.tables = [model.user_factors.weight, model.item_factors.weight, model.user_bias.weight,
                       model.item_bias.weight]
        super().__init__(self.tables, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.ext = load_extension()
        if self.ext is None:
            raise RuntimeError("the fused MF kernel could not be built")
        self.grads = [torch.zeros_like(t) for t in self.tables]
        self.touched_users = torch.zeros(model.n_users, dtype=torch.uint8)
        self.touched_items = torch.zeros(model.n_items, dtype=torch.uint8)
        self.steps = 0

    def _moments(self) -> list[torch.Tensor]:
        if not self.adam:
            return []
        out = []
        for t in self.tables:
            state = self.state[t]
            advance_adam_state(state, t)
            out += [state["exp_avg"], state["exp_avg_sq"]]
        return out

    @torch.no_grad()
    def fused_step(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                   n_threads: int = 1) -> torch.Tensor:
        """One minibatch step, or in online mode one SGD step per rating of the chunk (Hogwild over
        ``n_threads`` threads when more than one); returns the mean loss as a 0-d tensor."""
        m = self.model
        group = self.param_groups[0]
        if self.online:
            losses = torch.empty(len(users))
            self.ext.mf_sgd_online(*self.tables, m.user_reg_scale, m.item_reg_scale, users.contiguous(),
                                   items.contiguous(), ratings.contiguous(), losses, float(m.global_bias),
                                   m.reg, m.reg_bias, group["lr"], int(n_threads))
            return losses.double().mean()
        moments = self._moments()
        step = self.state[self.tables[0]]["step"] if self.adam else 0
        beta1, beta2 = group["betas"]
        return torch.tensor(self.ext.mf_step(
            *self.tables, *self.grads, moments, m.user_reg_scale, m.item_reg_scale,
            users.contiguous(), items.contiguous(), ratings.contiguous(),
            self.touched_users, self.touched_items,
            float(m.global_bias), m.reg, m.reg_bias, group["lr"], step, beta1, beta2, group["eps"],
        ), dtype=torch.float64)

    def step(self, closure=None):  # the update happens inside fused_step
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


class FusedStep:
    """The trainer's step through the kernel (see :func:`recsys_torch.steps.build_step`): a minibatch
    per call, or with ``batch_size=1`` and SGD a chunk of :data:`ONLINE_CHUNK` single-rating steps."""

    def __init__(self, model, optimizer: str, lr: float, batch_size: int, num_threads: int | None = None) -> None:
        self.kernel = FusedMF(model, optimizer, lr, online=batch_size == 1 and optimizer == "sgd")
        self.optimizers = OptimizerGroup([self.kernel])
        self.rows_per_step = ONLINE_CHUNK if self.kernel.online else batch_size
        self.num_threads = num_threads if isinstance(num_threads, int) else None  # auto: as set by the trainer

    def __call__(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        loss = self.kernel.fused_step(users, items, ratings, self.num_threads or torch.get_num_threads())
        self.kernel.step()  # a no-op that lets learning-rate schedulers see a step
        return loss

    def end_epoch(self) -> None:
        pass
