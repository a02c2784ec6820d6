"""Cost of issue 18's statistics and predictions storage: one command, one table.

    PYTHONPATH=. python bench/significance_bench.py [--quick]

The paired bootstrap (B=2000) for 100 and 1,000 trials × 10,000 validation examples (10 classes,
macro and micro F1), then a 1M-row validation set's predictions: the stored .npz (size, write,
read) and the CSV a command trainer writes (size, read). Targets (issue 18): ≤ 2 s for 100 trials,
≤ 30 s for 1,000, on 2 cores.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hpsweep import predictions
from hpsweep.report.significance import DEFAULT_RESAMPLES, usable_cores, bootstrap_f1


def _preds(n: int, trials: int, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    accuracy = rng.uniform(0.6, 0.95, trials)
    preds = [np.where(rng.random(n) < a, y, rng.integers(0, classes, n)) for a in accuracy]
    return y, preds


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _both(fn) -> str:
    """Wall seconds and CPU seconds of this process (the CPU time stays honest on a busy machine)."""
    cpu = time.process_time()
    wall = _time(fn)
    return f"{wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU"


def main(quick: bool) -> None:
    rows = []
    for trials in ([100] if quick else [100, 1000]):
        y, preds = _preds(10_000, trials)
        for average in ("macro", "micro"):
            rows.append((f"bootstrap B={DEFAULT_RESAMPLES}, {trials} trials × 10,000 examples, {average}",
                         _both(lambda: bootstrap_f1(y, preds, average, resamples=DEFAULT_RESAMPLES, seed=0))))
    n = 1_000_000
    y, (p,) = _preds(n, 1)
    with tempfile.TemporaryDirectory() as tmp:
        stored = Path(tmp) / predictions.STORED_NAME
        rows.append(("1M predictions: write compressed .npz", f"{_time(lambda: predictions.save(stored, y, p)):.2f} s"))
        rows.append(("1M predictions: .npz size", f"{stored.stat().st_size / 1e6:.2f} MB"))
        rows.append(("1M predictions: read .npz", f"{_time(lambda: predictions.load(stored)):.2f} s"))
        csv = Path(tmp) / "predictions.csv"
        with open(csv, "w") as f:
            f.write("y_true,y_pred\n")
            np.savetxt(f, np.column_stack([y, p]), fmt="%d", delimiter=",")
        rows.append(("1M predictions: trainer's CSV size", f"{csv.stat().st_size / 1e6:.2f} MB"))
        rows.append(("1M predictions: read CSV", f"{_time(lambda: predictions.load(csv)):.2f} s"))
        if not quick:
            yy, pp = predictions.load(stored)
            rows.append(("bootstrap B=2000, 1 trial × 1M examples, macro",
                         _both(lambda: bootstrap_f1(yy, [pp], "macro"))))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value   (cores: {usable_cores()}, load: "
          f"{os.getloadavg()[0]:.1f})")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
