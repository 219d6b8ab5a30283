"""Metric writers: TensorBoard, or nothing. The trainer only calls these three methods."""

from __future__ import annotations

import os


FINAL_PREFIX = "zz_final/"  # the final metrics of a run, in TensorBoard


class NullLogger:
    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Writes event files under ``log_dir`` (the run's ``tb/``, one subfolder per fold)."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        # Own tags, for the HPARAMS table: under the curves' names (val/rmse) the final value would add a
        # point at step 0; and TensorBoard lists tag groups alphabetically, so "zz_final/" keeps these
        # single points below the real curves (train/, val/, lr) instead of above them.
        finite = {f"{FINAL_PREFIX}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        # run_name="." keeps the hparams summary in this folder rather than a timestamped child
        self.writer.add_hparams(clean, finite, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
