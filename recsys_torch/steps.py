"""One training step: a batch's loss, its gradients and the optimizer's update.

:class:`AutogradStep` is the reference path for every model and task: ``task.loss`` under autograd,
gradients combined across ranks when data-parallel, then the row-wise optimizers. :func:`build_step`
hands the trainer the compiled kernel of :mod:`recsys_torch.fused` instead when that computes the
same step (``fused=auto``), so the trainer never knows which one it runs.
"""

from __future__ import annotations

import torch

from recsys_torch.errors import ConfigError
from recsys_torch.optim import OptimizerGroup, build_optimizer


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` takes CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device} but CUDA is not available here; use auto or cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"trainer.device: unknown device {device!r} (use auto, cpu or cuda)") from None


class AutogradStep:
    """``step(*batch) -> loss``: the loss is ``task.loss(model, *batch)``, returned detached (no
    host sync). Batches held in pinned host memory are copied to the device asynchronously."""

    def __init__(self, model, task, optimizers: OptimizerGroup, batch_size: int, device: torch.device,
                 precision: str = "32", world_size: int = 1) -> None:
        self.model, self.task, self.optimizers = model, task, optimizers
        self.rows_per_step = batch_size
        self.device, self.world_size = device, world_size
        self.bf16 = precision == "bf16"

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        batch = tuple(t if t.device == self.device else t.to(self.device, non_blocking=True) for t in batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.task.loss(self.model, *batch)
        self.optimizers.zero_grad()
        loss.float().backward()
        if self.world_size > 1:
            from recsys_torch.distributed import sync_gradients

            sync_gradients(self.model, self.world_size)
        self.optimizers.step()
        return loss.detach().float()

    def end_epoch(self) -> None:
        """Called once after each epoch's last step (a no-op here; ALS solves its items then)."""


def build_step(model, task, optimizer: str, lr: float, batch_size: int, device: torch.device,
               fused: bool | str = "auto", world_size: int = 1, precision: str = "32", num_threads=None):
    """The step the trainer runs: the compiled kernel when it computes exactly this step (``fused``
    ``auto`` or ``true``; ``true`` refuses to fall back), else :class:`AutogradStep`."""
    if optimizer == "auto":  # ALS where it solves the loss exactly (biased MF, Gramian loss), else Adam
        from recsys_torch.models.mf import MFModel

        optimizer = "als" if type(model) is MFModel and task.loss_name == "gramian" else "adam"
    if optimizer == "als":  # alternating least squares for the Gramian loss (recsys_torch.als)
        from recsys_torch import fused as kernel
        from recsys_torch.als import ALSStep

        # the compiled kernel does the conjugate-gradient product over the positives on the CPU
        ext = kernel.load_extension() if fused is not False and device.type == "cpu" else None
        if fused is True and ext is None:
            raise ConfigError("trainer.fused=true needs a CPU device and a C++ compiler; use trainer.fused=auto "
                              "to fall back")
        return ALSStep(model, task, batch_size, ext)
    if fused is not False and world_size == 1:
        from recsys_torch import fused as kernel

        if kernel.supports(model, task, optimizer, device) and kernel.load_extension() is not None:
            return kernel.FusedStep(model, optimizer, lr, batch_size, num_threads)
        if fused is True:
            raise ConfigError("trainer.fused=true needs model=mf, task=rating, optimizer sgd or adam, a CPU "
                              "device and a C++ compiler; use trainer.fused=auto to fall back")
    return AutogradStep(model, task, build_optimizer(model, optimizer, lr), batch_size, device, precision, world_size)
