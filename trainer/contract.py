"""The black-box contract between hpsweep and a training function.

A Python trainer is ``train(hparams: dict, data: DataRefs, ctx: TrainContext) -> float``
returning the validation F1 in [0, 1]. A command trainer gets the same information
through the environment variables named below and writes ``{"f1": <float>}`` to
``$HPSWEEP_RESULT``. These names are a public contract: extend, never rename.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

ENV_HPARAMS = "HPSWEEP_HPARAMS"  # path of a JSON file: hparams merged with the spec's fixed settings
ENV_TRAIN_DATA = "HPSWEEP_TRAIN_DATA"
ENV_VAL_DATA = "HPSWEEP_VAL_DATA"
ENV_CHECKPOINT_DIR = "HPSWEEP_CHECKPOINT_DIR"  # write checkpoints here; resume from what is found
ENV_MODEL_DIR = "HPSWEEP_MODEL_DIR"  # files left here become the trial's `model` artifact
ENV_RESULT = "HPSWEEP_RESULT"  # path where the trainer writes {"f1": <float>}
ENV_DEVICE = "HPSWEEP_DEVICE"  # "cuda" when the trial was given GPUs (see CUDA_VISIBLE_DEVICES), else "cpu"
# A path that exists once the sweep's early-stopping rule stopped the trial (it holds the reason): save a
# checkpoint and exit; a trainer still running a grace period later gets SIGTERM, then SIGKILL.
ENV_STOP_FILE = "HPSWEEP_STOP_FILE"


@dataclass(frozen=True)
class DataRefs:
    """Where the trial's data lives (files or folders, already on local disk)."""

    train: Path
    val: Path


@dataclass
class TrainContext:
    """What hpsweep offers a running Python trainer.

    ``report(step, **metrics)`` logs step metrics to the trial's MLflow run.
    ``checkpoint_dir`` survives a retry of the same trial; ``resume_from`` is the newest
    checkpoint file found there (None on a fresh start): a trainer that resumes from it
    loses at most one checkpoint interval when its process dies. ``should_stop()`` turns True
    when the sweep's early-stopping rule stopped the trial: return early (its checkpoint saved) with
    the current F1; a trainer that goes on is ended after a grace period.
    """

    checkpoint_dir: Path
    model_dir: Path
    device: str = "cpu"
    gpu_ids: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("hpsweep.trainer"))
    _reporter: Callable[[int, dict[str, float]], None] | None = None
    stop_file: Path | None = None  # appears when the trial should stop (``should_stop``)

    @property
    def resume_from(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)

    def should_stop(self) -> bool:
        """True once the sweep's early-stopping rule stopped this trial (cheap: one stat)."""
        return self.stop_file is not None and self.stop_file.exists()

    def report(self, step: int, **metrics: float) -> None:
        """Log per-step metrics (for example per-epoch validation F1) to MLflow."""
        if self._reporter is not None:
            self._reporter(step, {k: float(v) for k, v in metrics.items()})


class TrainFunction(Protocol):
    def __call__(self, hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float: ...


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The most recently written regular file in ``checkpoint_dir``, if any.

    Trainers should write checkpoints atomically (write to a temp name, then rename)
    so a process killed mid-write never leaves a half file as the newest one.
    """
    if not checkpoint_dir.is_dir():
        return None
    files = [p for p in checkpoint_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
