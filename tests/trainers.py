"""Trainers for tests: fast, controllable by their hparams, and recording what they were given.

Each writes one JSON line per trial to $HPSWEEP_TEST_RECORD (start/end time, pid, GPUs),
so tests can measure real concurrency from the trainers' own timestamps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import DataRefs, TrainContext


def record(event: dict[str, Any], path: str | None = None) -> None:
    """Append to `path`, else $HPSWEEP_TEST_RECORD (a pool worker's trainers get the path as a setting)."""
    path = path or os.environ.get("HPSWEEP_TEST_RECORD")
    if path:
        with open(path, "a") as f:  # one short append per line: atomic enough on Linux
            f.write(json.dumps(event) + "\n")


def sleepy(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Sleeps `sleep_s` (hparam, else setting) over `epochs` reported steps; F1 from the `f1` hparam.

    `mode: raise` raises like a trainer rejecting its hparams.
    """
    start = time.time()
    where = ctx.settings.get("record_path")
    record({"event": "start", "t": start, "pid": os.getpid(), "hparams": hparams,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "device": ctx.device}, where)
    if hparams.get("mode") == "raise":
        raise ValueError(f"bad hparams: {hparams}")
    epochs = int(ctx.settings.get("epochs", 2))
    # HPSWEEP_TEST_SLEEP_S overrides both without changing the trial key (a quick rerun of slow trials).
    sleep_s = float(os.environ.get("HPSWEEP_TEST_SLEEP_S") or hparams.get("sleep_s", ctx.settings.get("sleep_s", 0.2)))
    for epoch in range(1, epochs + 1):
        time.sleep(sleep_s / epochs)
        ctx.report(epoch, val_f1=float(hparams.get("f1", 0.5)) * epoch / epochs)
    save_loadable_model(ctx.model_dir, hparams)
    record({"event": "end", "t": time.time(), "pid": os.getpid(), "hparams": hparams}, where)
    return float(hparams.get("f1", 0.5))


def command_main() -> int:
    """A command trainer (tests/cmd_trainer.py): honours the documented environment variables."""
    params = json.loads(Path(os.environ["HPSWEEP_HPARAMS"]).read_text())
    assert Path(os.environ["HPSWEEP_TRAIN_DATA"]).exists() and Path(os.environ["HPSWEEP_VAL_DATA"]).exists()
    record({"event": "start", "t": time.time(), "pid": os.getpid(), "hparams": params,
            "run_id": os.environ["MLFLOW_RUN_ID"], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
    print(f"command trainer got {params}")  # kept as the trial log artifact
    mode = params.get("mode", "ok")
    if mode == "exit1":
        print("giving up", file=sys.stderr)
        return 1
    f1 = params.get("f1", 0.5)
    if "acc" in params:  # the F1 of `labelled` predictions, written to $HPSWEEP_PREDICTIONS as CSV unless `predict` is false
        y_true, y_pred, f1 = labelled(params)
    if "acc" in params and params.get("predict", True):
        with open(os.environ["HPSWEEP_PREDICTIONS"], "w") as f:
            f.write("y_true,y_pred\n" + "".join(f"{t},{p}\n" for t, p in zip(y_true, y_pred)))
    import mlflow  # logs into the run hpsweep created for it (MLFLOW_RUN_ID)

    with mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]):
        mlflow.log_metric("val_f1", params.get("f1", 0.5), step=1)
    Path(os.environ["HPSWEEP_MODEL_DIR"], "model.json").write_text(json.dumps(params))
    Path(os.environ["HPSWEEP_RESULT"]).write_text(json.dumps({"f1": f1}))
    return 0


def labelled(hparams: dict[str, Any], n: int = 360, classes: int = 4) -> tuple[list[int], list[int], float]:
    """A validation set of ``n`` examples and predictions right on the first ``acc`` share of them (the
    same ``acc``, the same predictions), and their macro F1 plus the ``lie`` hparam (a trainer whose
    reported F1 is not its predictions')."""
    from sklearn.metrics import f1_score

    y_true = [i % classes for i in range(n)]
    right = round(float(hparams["acc"]) * n)
    y_pred = [t if i < right else (t + 1) % classes for i, t in enumerate(y_true)]
    return y_true, y_pred, float(f1_score(y_true, y_pred, average="macro")) + float(hparams.get("lie", 0.0))


def predicting(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Logs its validation predictions (``labelled``) through ``ctx.log_predictions`` unless the
    ``silent`` hparam is true; saves a loadable model; the F1 is that of its predictions."""
    y_true, y_pred, f1 = labelled(hparams)
    if not hparams.get("silent"):
        ctx.log_predictions(y_true, y_pred)
    save_loadable_model(ctx.model_dir, hparams)
    return f1


def epochs(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Several checkpointed epochs; resumes from the last checkpoint; records every epoch start.

    hparams: `f1` (the result), `mode` ("ok", "raise", "hang"). settings: `epochs`, `epoch_s`.
    """
    n_epochs = int(ctx.settings.get("epochs", 5))
    epoch_s = float(ctx.settings.get("epoch_s", 0.3))
    key = json.dumps(hparams, sort_keys=True)
    done = 0
    if ctx.resume_from is not None:
        done = json.loads(ctx.resume_from.read_text())["epoch"]
    record({"event": "start", "t": time.time(), "pid": os.getpid(), "key": key, "resumed_at": done})
    if hparams.get("mode") == "raise":
        raise ValueError("this trainer rejects its hparams")
    if hparams.get("mode") == "hang":
        time.sleep(3600)
    for epoch in range(done + 1, n_epochs + 1):
        record({"event": "epoch", "t": time.time(), "pid": os.getpid(), "key": key, "epoch": epoch})
        time.sleep(epoch_s)
        ctx.report(epoch, val_f1=float(hparams["f1"]) * epoch / n_epochs)
        tmp = ctx.checkpoint_dir / ".checkpoint.json.tmp"
        tmp.write_text(json.dumps({"epoch": epoch}))
        os.replace(tmp, ctx.checkpoint_dir / "checkpoint.json")
    record({"event": "end", "t": time.time(), "pid": os.getpid(), "key": key})
    return float(hparams["f1"])


def shards(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Folder datasets: reads every shard (file) under `data.train` and `data.val` and records what it
    read (paths, relpaths and line counts); the F1 is the `f1` hparam."""
    read = {}
    for name, folder in (("train", Path(data.train)), ("val", Path(data.val))):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        read[name] = {"path": str(folder), "files": [p.relative_to(folder).as_posix() for p in files],
                      "lines": sum(len(p.read_bytes().splitlines()) for p in files)}
    record({"event": "shards", "pid": os.getpid(), "hparams": hparams, **read}, ctx.settings.get("record_path"))
    f1 = float(hparams.get("f1", 0.5))
    ctx.report(1, val_f1=f1)
    (ctx.model_dir / "weights.txt").write_text(json.dumps(hparams))
    return f1


def strict_depth(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Rejects a `max_depth` below 2 as scikit-learn's trees would; else F1 from the `f1` hparam."""
    print(f"fitting a tree with {hparams}")  # stdout: part of the trial log, not of the reason
    if int(hparams.get("max_depth", 2)) < 2:
        raise ValueError("max_depth must be >= 2")
    return float(hparams.get("f1", 0.5))


def save_loadable_model(model_dir: Path, hparams: dict[str, Any]) -> None:
    """A tiny model `mlflow.pyfunc.load_model` can load (through `_load_pyfunc` below), so the
    registry takes it: `weights.txt` plus an `MLmodel` naming this module as its loader."""
    (model_dir / "weights.txt").write_text(json.dumps(hparams))
    (model_dir / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: tests.trainers\n"
                                       "    data: weights.txt\n")


class _ConstantModel:
    def __init__(self, hparams: dict[str, Any]):
        self.hparams = hparams

    def predict(self, model_input: Any, params: Any = None) -> list[float]:
        return [float(self.hparams.get("f1", 0.5))] * len(model_input)


def _load_pyfunc(path: str) -> _ConstantModel:
    """MLflow's pyfunc loader hook for `save_loadable_model`'s models."""
    return _ConstantModel(json.loads(Path(path).read_text()))


def rewrites_data(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    """Rewrites the file named by the `rewrite_path` setting (else $HPSWEEP_TEST_REWRITE) with other
    bytes, once: the first trial to run edits the data mid-sweep, as a person might. F1 from `f1`."""
    record({"event": "start", "t": time.time(), "pid": os.getpid(), "hparams": hparams}, ctx.settings.get("record_path"))
    target = ctx.settings.get("rewrite_path") or os.environ.get("HPSWEEP_TEST_REWRITE")
    done = Path(f"{target}.rewritten") if target else None
    if done is not None and not done.exists():
        done.touch()
        with open(target, "a") as f:
            f.write("a row added during the sweep\n")
    return float(hparams.get("f1", 0.5))


def curve_command_main() -> int:
    """A command trainer (tests/curve_cmd_trainer.py) that logs `val_f1` = f1·step/steps for `steps`
    steps of `step_s` seconds to its MLflow run, and never looks at HPSWEEP_STOP_FILE."""
    import mlflow

    params = json.loads(Path(os.environ["HPSWEEP_HPARAMS"]).read_text())
    steps, f1, step_s = int(params["steps"]), float(params["f1"]), float(params.get("step_s", 0.2))
    record({"event": "start", "t": time.time(), "pid": os.getpid(), "hparams": params})
    client = mlflow.tracking.MlflowClient()
    for step in range(1, steps + 1):
        client.log_metric(os.environ["MLFLOW_RUN_ID"], "val_f1", f1 * step / steps, step=step)
        record({"event": "step", "step": step, "hparams": params,
                "stop_file": Path(os.environ["HPSWEEP_STOP_FILE"]).exists()})
        time.sleep(step_s)
    Path(os.environ["HPSWEEP_RESULT"]).write_text(json.dumps({"f1": f1}))
    return 0
