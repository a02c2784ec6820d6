"""A trainer that replays recorded learning curves (bench/learning_curves.json): the scikit-learn MLP
reference trainer's per-epoch val_f1, one sleep per epoch, so early stopping is benchmarked on real
curves in seconds. Checkpoints its epoch (a stopped trial resumes) and honours ``ctx.should_stop()``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.contract import DataRefs, TrainContext

CURVES = Path(__file__).with_name("learning_curves.json")


def curve_of(hparams: dict[str, Any]) -> list[float]:
    curves = json.loads(CURVES.read_text())["curves"]
    key = json.dumps(hparams, sort_keys=True)
    return next(c["val_f1"] for c in curves if json.dumps(c["hparams"], sort_keys=True) == key)


def train(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    curve = curve_of(hparams)
    epochs = int(ctx.settings.get("epochs", len(curve)))
    epoch_s = float(ctx.settings.get("epoch_s", 0.2))
    start = json.loads(ctx.resume_from.read_text())["epoch"] + 1 if ctx.resume_from else 1
    f1 = curve[start - 2] if start > 1 else 0.0
    for epoch in range(start, epochs + 1):
        time.sleep(epoch_s)
        f1 = curve[epoch - 1]
        ctx.report(epoch, val_f1=f1)
        tmp = ctx.checkpoint_dir / ".epoch.json.tmp"
        tmp.write_text(json.dumps({"epoch": epoch}))
        os.replace(tmp, ctx.checkpoint_dir / "epoch.json")
        if ctx.should_stop():
            break
    return f1
