"""How long a trial spends saving its model (issue 16): ``ctx.save_model`` against a bare
``mlflow.sklearn.save_model`` that leaves MLflow to infer the requirements. One table.

    .venv/bin/python bench/save_model_bench.py [--repeat 3]

Imports are timed apart: the sweep's fork server imports mlflow.sklearn and skops.io once
(hpsweep/runtime/_preload.py), so a trial pays only the save.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    imports = {name: timed(lambda: __import__(name)) for name in ("mlflow.sklearn", "skops.io")}
    import mlflow.sklearn
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier

    from trainer.contract import TrainContext

    X, y = load_digits(return_X_y=True)
    models = {"MLP (reference trainer)": MLPClassifier(hidden_layer_sizes=(64,), max_iter=50, random_state=0),
              "RandomForest (100 trees)": RandomForestClassifier(n_estimators=100, random_state=0)}
    root = Path(tempfile.mkdtemp(prefix="hpsweep-save-bench-"))
    rows = []
    try:
        for label, model in models.items():
            model.fit(X, y)
            ours, bare = [], []
            for i in range(args.repeat):
                ctx = TrainContext(checkpoint_dir=root / "ckpt", model_dir=root / f"ours-{label[:3]}-{i}")
                ours.append(timed(lambda: ctx.save_model(model)))
                bare_dir = str(root / f"bare-{label[:3]}-{i}")
                try:
                    # What a trainer wrote before: no pip_requirements (a forest needs trusted types too).
                    trusted = ["sklearn.tree._tree.Tree",
                               "sklearn.neural_network._stochastic_optimizers.AdamOptimizer"]
                    bare.append(timed(lambda: mlflow.sklearn.save_model(model, bare_dir,
                                                                        skops_trusted_types=trusted)))
                except Exception as e:  # noqa: BLE001  (reported in the table)
                    bare.append(float("nan"))
                    print(f"bare save of {label} failed: {e}", file=sys.stderr)
            rows.append((label, statistics.median(ours), max(ours), statistics.median(bare)))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"imports (once per sweep, in the fork server): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))
    print(f"| model | ctx.save_model median (max) of {args.repeat} | save_model without pip_requirements |")
    print("| --- | --- | --- |")
    for label, median, worst, bare in rows:
        print(f"| {label} | {median:.3f} s ({worst:.3f} s) | {bare:.2f} s |")


if __name__ == "__main__":
    main()
