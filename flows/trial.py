"""The `train-trial` flow: one attempt of one combination, on a work pool's worker.

Deployed on the GPU work pool (see prefect.yaml); the sweep launches it with
`run_deployment` (hpsweep.engine.pool.PoolLauncher). It records the trial in MLflow itself, so
the sweep reads the result back from the tracking server wherever the trial ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from hpsweep.engine.gpus import GpuPool, host_gpus
from hpsweep.engine.launcher import execute_trial
from hpsweep.engine.process import ProcessRunner
from hpsweep.engine.stopping import DEFAULT_GRACE_S, StopRequest, stop_on_signals
from hpsweep.model import TrialJob, interrupted_reason


@flow(name="train-trial", persist_result=False, log_prints=True)
def train_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Train one combination and log it to MLflow; returns the run id, F1 and reason."""
    # The sweep's folder, when this worker shares its disk; else the worker's own.
    cwd = job.get("cwd") if Path(job.get("cwd", "")).is_dir() else os.getcwd()
    # A relative work dir is the sweep's (under its folder), not this flow run's working directory's.
    work_dir = os.environ.get("HPSWEEP_WORK_DIR") or str(Path(cwd) / job["work_dir"])
    trial = TrialJob(**{**job, "cwd": cwd, "work_dir": work_dir})
    # The GPUs this worker's container (or host) was given are the trial's. A process worker
    # runs several flow runs on one host: the pool's host-wide locks give each its own GPUs
    # (waiting while others hold them); an ECS container sees only its own anyway.
    host = host_gpus()
    gpus = GpuPool(host)
    gpu_ids = gpus.take(min(trial.gpus, len(host)))
    # One trial per flow run: fork it straight from this process, which has imported
    # MLflow already (a fork server would pay those imports a second time).
    runner = ProcessRunner(start_method="fork")
    stop = StopRequest(grace_s=float(os.environ.get("HPSWEEP_GRACE_S", DEFAULT_GRACE_S)))
    # ECS stops the task (or Prefect cancels the flow run) with SIGTERM: the trial gets it too,
    # and the grace to save a checkpoint, instead of dying with this process.
    stop.listen(lambda force: runner.interrupt(0.0 if force else stop.grace_s, interrupted_reason(stop.signal_name)))
    try:
        with stop_on_signals(stop):
            result = execute_trial(trial, gpu_ids, runner)
    finally:
        gpus.give_back(gpu_ids)
    return {"run_id": result.run_id, "ok": result.outcome.ok, "f1": result.outcome.f1,
            "reason": result.outcome.reason}
