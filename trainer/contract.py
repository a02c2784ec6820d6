"""The black-box contract between hpsweep and a training function.

A Python trainer is ``train(hparams: dict, data: DataRefs, ctx: TrainContext) -> float``
returning the validation F1 in [0, 1]. A command trainer gets the same information
through the environment variables named below and writes ``{"f1": <float>}`` to
``$HPSWEEP_RESULT``. These names are a public contract: extend, never rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

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

    ``report(step, **metrics)`` logs step metrics to the trial's MLflow run; ``log_predictions(y_true,
y_pred)`` hands over the validation predictions (optional).
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
    _predictions: Callable[[Any, Any], None] | None = None

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

    def save_model(self, model: Any, trusted_types: Sequence[str] = ()) -> Path:
        """Save ``model`` as the trial's MLflow model (see ``save_model``); returns ``model_dir``."""
        return save_model(model, self.model_dir, trusted_types)

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


# Packages whose types a scikit-learn model's skops file holds: their types are trusted on load
# without asking (skops refuses every type not on the list, e.g. a forest's sklearn.tree._tree.Tree).
SKLEARN_PACKAGES = {"sklearn": "scikit-learn", "numpy": "numpy", "scipy": "scipy"}


def save_model(model: Any, model_dir: Path | str, trusted_types: Sequence[str] = ()) -> Path:
    """Save a fitted scikit-learn estimator (``mlflow.sklearn``, skops format) or ``torch.nn.Module``
    (``mlflow.pytorch``, CPU weights) as an MLflow model in ``model_dir``: ``MLmodel`` at its top, so the
    trial's ``model`` artifact is loadable and can become the champion. Files the trainer left there are
    kept; an earlier save_model's files are replaced.

    Requirements are pinned from the installed versions (MLflow would otherwise infer them in a
    subprocess: seconds per trial). A scikit-learn model's skops file trusts the scikit-learn, NumPy
    and SciPy types it holds; any other type must be named in ``trusted_types`` (``module.Class``).
    MLflow is imported here, so a trainer that never saves never pays for it.
    """
    model_dir = Path(model_dir)
    if _is_instance(model, "sklearn", "sklearn.base", "BaseEstimator"):
        save, kwargs = _sklearn_save(model, trusted_types)
    elif _is_instance(model, "torch", "torch.nn", "Module"):
        save, kwargs = _torch_save(model)
    else:
        raise TypeError(f"save_model saves a scikit-learn estimator (mlflow.sklearn) or a torch.nn.Module "
                        f"(mlflow.pytorch), not {type(model).__module__}.{type(model).__qualname__}: save it "
                        f"with its MLflow flavour's save_model into {model_dir} instead")
    model_dir.mkdir(parents=True, exist_ok=True)
    # MLflow saves only into an empty folder: save beside it, then move the files in (same disk: renames).
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        quiet = logging.getLogger("mlflow")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # e.g. mlflow.pytorch's "pickle can run code on load", in every trial log
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "model signature not given"; not useful here
                save(model, str(staging / "model"), **kwargs)
        finally:
            quiet.setLevel(level)
        for entry in (staging / "model").iterdir():
            target = model_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def pinned(*distributions: str) -> list[str]:
    """``name==version`` of each installed distribution, without a local part (``2.5.1+cu121`` is
    published on PyPI as ``2.5.1``): what MLflow records as the model's pip requirements."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in distributions]


def _is_instance(model: Any, package: str, module: str, cls: str) -> bool:
    """isinstance without importing ``package``: a model of it means it is already imported."""
    return package in sys.modules and isinstance(model, getattr(__import__(module, fromlist=[cls]), cls))


def _sklearn_save(model: Any, trusted_types: Sequence[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    import mlflow.sklearn
    import skops.io

    found = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    foreign = sorted(t for t in found if t.split(".")[0] not in SKLEARN_PACKAGES and t not in trusted_types)
    if foreign:
        raise ValueError(f"the model holds types skops does not load unless trusted: {foreign}; if they are "
                         "yours, pass them: ctx.save_model(model, trusted_types=[...])")
    return mlflow.sklearn.save_model, {
        "serialization_format": mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        "skops_trusted_types": sorted(set(found) | set(trusted_types)) or None,
        "pip_requirements": pinned(*SKLEARN_PACKAGES.values(), "skops"),
    }


def _torch_save(model: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    import mlflow.pytorch

    def save(module: Any, path: str, **kwargs: Any) -> None:
        # CPU weights (the champion loads on machines without a GPU); pickle, not MLflow's default pt2:
        # tracing the graph with torch.export costs ~6 s in a fresh trial process (0.1 s for pickle).
        mlflow.pytorch.save_model(module.to("cpu").eval(), path, serialization_format="pickle", **kwargs)

    # cloudpickle: mlflow.pytorch's pickle module, needed to load the model.
    return save, {"pip_requirements": pinned("torch", "cloudpickle")}
