"""The benchmark's synthetic trainer: sleeps for its `duration_s` hparam, so trials cost no CPU
and the 2-core machine measures the orchestration, not the training.

``train`` is a normal hpsweep Python trainer (entry point ``bench.synthetic:train``): it reports
one step metric (``val_f1``) like a real trainer, and appends its own start/end timestamps as one
JSON line to the ``record_path`` setting, from which the benchmark measures makespan and peak
concurrency. ``durations`` draws the heterogeneous (lognormal, fixed seed) durations.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any

from trainer.contract import DataRefs, TrainContext

LOGNORMAL_SIGMA = 0.6  # heterogeneous enough that dispatch order matters (longest ≈ 4-6× the mean)


def durations(n: int, mean_s: float, seed: int) -> list[float]:
    """``n`` lognormal durations with mean ``mean_s`` (µ chosen so E[X] = mean), rounded to 1 ms."""
    rng = random.Random(seed)
    mu = math.log(mean_s) - LOGNORMAL_SIGMA**2 / 2
    return [round(rng.lognormvariate(mu, LOGNORMAL_SIGMA), 3) for _ in range(n)]


def f1_of(hparams: dict[str, Any]) -> float:
    """A deterministic, distinct-enough F1 per combination."""
    return round(0.5 + (int(hparams.get("trial", 0)) * 37 % 100) / 250, 4)


def train(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    start = time.time()
    time.sleep(float(hparams["duration_s"]))
    end = time.time()
    f1 = f1_of(hparams)
    ctx.report(1, val_f1=f1)
    path = ctx.settings.get("record_path")
    if path:
        with open(str(path), "a") as f:  # one short append per line: atomic on Linux
            f.write(json.dumps({"trial": hparams.get("trial"), "start": start, "end": end,
                                "duration_s": hparams["duration_s"], "pid": os.getpid()}) + "\n")
    return f1
