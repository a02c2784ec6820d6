"""Reference trainer: a scikit-learn MLP on the digits data, trained epoch by epoch.

It exercises the whole contract: per-epoch metrics via ``ctx.report``, an atomic
checkpoint after every epoch, resuming from ``ctx.resume_from`` after a retry, returning
early when ``ctx.should_stop()`` (early stopping), and an MLflow model left in ``ctx.model_dir``. Runs on CPU whatever ``ctx.device`` says.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score
from sklearn.neural_network import MLPClassifier

from trainer.common import EpochSettings, known_hparams
from trainer.contract import DataRefs, TrainContext
from trainer.prepare import load_xy

CHECKPOINT_NAME = "checkpoint.pkl"
HPARAM_DEFAULTS: dict[str, Any] = {"hidden": 64, "lr": 1e-3, "alpha": 1e-4, "batch_size": 64}


def train(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    hp = known_hparams(hparams, HPARAM_DEFAULTS, ctx.logger)
    settings = EpochSettings.read(ctx.settings)
    epochs, seed, average, sleep_s = settings.epochs, settings.seed, settings.average, settings.sleep_s

    X_tr, y_tr = load_xy(Path(data.train))
    X_val, y_val = load_xy(Path(data.val))
    classes = np.arange(10)  # digits 0..9; partial_fit needs every class on the first call

    model, start = _resume(ctx)
    if model is None:
        model = MLPClassifier(
            hidden_layer_sizes=(int(hp["hidden"]),),
            learning_rate_init=float(hp["lr"]),
            alpha=float(hp["alpha"]),
            batch_size=int(hp["batch_size"]),
            # We shuffle ourselves with an RNG keyed on (seed, epoch), so epoch k sees the
            # same order whether or not the run was interrupted before it.
            shuffle=False,
            random_state=seed,
        )

    f1: float | None = None
    y_pred = None
    for epoch in range(start, epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(y_tr))
        # One partial_fit call is one pass over the data in `batch_size` mini-batches;
        # model.loss_ is then the epoch's mean training loss.
        model.partial_fit(X_tr[order], y_tr[order], classes=classes)
        y_pred = model.predict(X_val)
        f1 = float(f1_score(y_val, y_pred, average=average))
        ctx.report(epoch, val_f1=f1, train_loss=model.loss_)
        _save_checkpoint(ctx.checkpoint_dir, epoch, model)
        if ctx.should_stop():  # stopped early by the sweep: the checkpoint is saved, a later sweep resumes
            ctx.logger.info("stopped early after epoch %d: %s", epoch, ctx.stop_file.read_text().strip())
            return f1
        if sleep_s > 0:
            time.sleep(sleep_s)

    if f1 is None:  # resumed from a checkpoint of the final epoch: nothing left to train
        y_pred = model.predict(X_val)
        f1 = float(f1_score(y_val, y_pred, average=average))
    # The F1 above is from these very predictions: hpsweep bootstraps them for the F1's interval.
    ctx.log_predictions(y_val, y_pred)
    ctx.save_model(model)
    return f1


def _resume(ctx: TrainContext) -> tuple[MLPClassifier | None, int]:
    """The checkpointed model and the epoch to continue at, or (None, 1) on a fresh start."""
    path = ctx.resume_from
    if path is None:
        return None, 1
    with open(path, "rb") as f:
        state = pickle.load(f)
    ctx.logger.info("resumed from epoch %d (%s)", state["epoch"], path)
    return state["model"], state["epoch"] + 1


def _save_checkpoint(checkpoint_dir: Path, epoch: int, model: MLPClassifier) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed temp name: latest_checkpoint() skips it if we die mid-write.
    tmp = checkpoint_dir / f".{CHECKPOINT_NAME}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump({"epoch": epoch, "model": model}, f)
    os.replace(tmp, checkpoint_dir / CHECKPOINT_NAME)
