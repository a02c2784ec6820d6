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
# Optional: where the trainer may write its validation predictions, one line per validation example in
# the same order every trial: CSV with the header `y_true,y_pred`, or a NumPy .npz (numpy.savez) with
# arrays `y_true` and `y_pred` (told apart by content). hpsweep then gives the F1 an interval.
ENV_PREDICTIONS = "HPSWEEP_PREDICTIONS"
ENV_DEVICE = "HPSWEEP_DEVICE"  # "cuda" when the trial was given GPUs (see CUDA_VISIBLE_DEVICES), else "cpu"


@dataclass(frozen=True)
class DataRefs:
    """Where the trial's data lives (files or folders, already on local disk)."""

    train: Path
    val: Path


@dataclass
class TrainContext:
    """What hpsweep offers a running Python trainer.

    ``report(step, **metrics)`` logs step metrics to the trial's MLflow run; ``log_predictions(y_true,
y_pred)`` hands over the validation predictions (optional).
    ``checkpoint_dir`` survives a retry of the same trial; ``resume_from`` is the newest
    checkpoint file found there (None on a fresh start): a trainer that resumes from it
    loses at most one checkpoint interval when its process dies.
    """

    checkpoint_dir: Path
    model_dir: Path
    device: str = "cpu"
    gpu_ids: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("hpsweep.trainer"))
    _reporter: Callable[[int, dict[str, float]], None] | None = None
    _predictions: Callable[[Any, Any], None] | None = None

    @property
    def resume_from(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)

    def report(self, step: int, **metrics: float) -> None:
        """Log per-step metrics (for example per-epoch validation F1) to MLflow."""
        if self._reporter is not None:
            self._reporter(step, {k: float(v) for k, v in metrics.items()})

    def log_predictions(self, y_true: Any, y_pred: Any) -> None:
        """Hand over the validation set's labels and this trial's predicted labels (array-likes of class
        labels, one per validation example, in the same order for every trial), once, before returning.
        Optional: hpsweep recomputes the F1 from them and gives it a confidence interval, comparing the
        trials example by example. A length mismatch raises ValueError."""
        if self._predictions is not None:
            self._predictions(y_true, y_pred)


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
