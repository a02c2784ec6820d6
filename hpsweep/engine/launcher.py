"""Where a trial runs: one interface, two implementations.

- ``LocalLauncher``: the trial runs as a process on this host (the embedded default).
- ``hpsweep.engine.pool.PoolLauncher``: the trial runs as a flow run of the `train-trial`
  deployment on a Prefect work pool (a process pool in tests, an ECS GPU pool in AWS).

Both execute the same ``execute_trial`` (here, or on the pool's worker), so a trial is
recorded in MLflow the same way wherever it ran.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from hpsweep import store
from hpsweep.datacache import DataCache, DataRef, Remote
from hpsweep.engine.outcome import TrialOutcome
from hpsweep.engine.process import CHECKPOINT_SYNC_S, ProcessRunner
from hpsweep.runtime.durable import retry
from hpsweep.runtime.runner import TrialRequest

# How long bookkeeping calls keep retrying while the tracking server is unreachable.
TRACKING_PATIENCE_S = 900.0


@dataclass(frozen=True)
class TrialJob:
    """One attempt of one combination, as plain JSON-able data (it travels to a pool worker)."""

    sweep_id: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    index: int
    hparams: dict[str, Any]
    trial_key: str
    attempt: int
    settings: dict[str, Any]
    train: str
    val: str
    entrypoint: str | None = None
    command: list[str] | None = None
    time_limit_s: float | None = None
    gpus: int = 1
    run_id: str | None = None  # set from the second attempt on: retries continue the same run
    work_dir: str = ".hpsweep"
    versions: dict[str, str] = field(default_factory=dict)  # spec hash, data and code versions (tags)
    # DataRef dicts ("train", "val"): how a host without the sweep's files fetches them (DVC remote).
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    cwd: str = field(default_factory=lambda: str(Path.cwd()))
    # False: no unfinished attempt of this trial exists (its earlier runs, if any, FINISHED, as
    # under --retrain), so it starts from scratch (TrialRequest.resume).
    resume: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialResult:
    run_id: str | None
    outcome: TrialOutcome


class TrialLauncher(Protocol):
    """Runs one attempt of one trial to completion and records it in MLflow.

    Guarantees: the trial's MLflow run exists and is terminal (or reopened by the caller
    for a retry) when ``launch`` returns; a trainer's failure is an outcome, never an
    exception. Safe to call from several threads at once.
    """

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> TrialResult: ...


def execute_trial(job: TrialJob, gpu_ids: tuple[int, ...], runner: ProcessRunner) -> TrialResult:
    """Create (or continue) the trial's run, train in a child process, store the outcome."""
    client = MlflowClient(job.tracking_uri)
    run_id = job.run_id
    try:
        data = local_data(job)  # the common case: the sweep's own files (a stat(), no I/O)
        if run_id is None:
            # One write creates the run with all its tags (each write is ~20 ms on a trial's critical path).
            tags = {**job.versions, "hpsweep.engine.gpus": ",".join(map(str, gpu_ids)) or "cpu",
                    **(data.tags() if data else {})}
            run_id = retry(lambda: store.start_trial_run(
                client, job.experiment_id, job.parent_run_id, job.sweep_id, job.index, job.hparams,
                job.trial_key, job.attempt, tags=tags,
            ), TRACKING_PATIENCE_S, "creating the trial's run")
        elif data is not None:  # a retry, perhaps on another host: say where this attempt's data came from
            retry(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in data.tags().items()]),
                  TRACKING_PATIENCE_S, "tagging the run")
        if data is None:  # staging may fetch from the DVC remote: after the run exists, so it shows
            data = trial_data(job)
            retry(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in data.tags().items()]),
                  TRACKING_PATIENCE_S, "tagging the run")
        trial_dir = Path(job.work_dir) / "trials" / job.trial_key
        trial_dir.mkdir(parents=True, exist_ok=True)
        request = TrialRequest(
            run_id=run_id, tracking_uri=job.tracking_uri, hparams=job.hparams, settings=dict(job.settings),
            train=str(data.train), val=str(data.val),
            trial_dir=str(trial_dir.resolve()), cwd=job.cwd, entrypoint=job.entrypoint, command=job.command,
            gpu_ids=gpu_ids, experiment_id=job.experiment_id, trial_key=job.trial_key,
            checkpoint_sync_s=CHECKPOINT_SYNC_S, orchestrator=store.owner_id(), resume=job.resume,
        )
        outcome = runner.run(request, job.time_limit_s, heartbeat=lambda: store.heartbeat(client, run_id))
        retry(lambda: store.finish_trial_run(client, run_id, outcome, request.paths.log),
              TRACKING_PATIENCE_S, "storing the trial's result")
        if outcome.ok:  # its checkpoints are in the artifact store; a finished trial never resumes
            shutil.rmtree(request.paths.checkpoints, ignore_errors=True)
    except Exception as e:  # hpsweep's bookkeeping failed (tracking down for too long): a machine failure
        outcome = TrialOutcome(False, None, f"hpsweep could not run the trial: {type(e).__name__}: {e}",
                               retryable=True, started_at=time.time(), ended_at=time.time())
        if run_id is not None:
            store.try_mark_failed(client, run_id, outcome.reason)
    return TrialResult(run_id, outcome)


@dataclass(frozen=True)
class TrialData:
    train: Path
    val: Path
    source: str  # "local": the sweep's own files; "cache": this host's data cache
    fetched_bytes: int = 0  # what this trial downloaded from the DVC remote (0 on a cache hit)

    def tags(self) -> dict[str, str]:
        return {"hpsweep.data_source": self.source, "hpsweep.data_fetched_bytes": str(self.fetched_bytes)}


def local_data(job: TrialJob, environ: dict[str, str] | None = None) -> TrialData | None:
    """The sweep's own train/val paths when this host has them and staging is not forced, else None."""
    env = os.environ if environ is None else environ
    paths = [Path(job.train), Path(job.val)]
    if env.get("HPSWEEP_STAGE_DATA", "auto") != "always" and all(p.exists() for p in paths):
        return TrialData(paths[0].resolve(), paths[1].resolve(), "local")
    return None


def trial_data(job: TrialJob, environ: dict[str, str] | None = None) -> TrialData:
    """The train and validation files this host reads, and where they came from.

    The sweep's own paths when this host has them (the embedded default, a shared disk);
    otherwise, or always with HPSWEEP_STAGE_DATA=always, this host's data cache, filled from
    the DVC remote once per host (hpsweep.datacache): the sweep's default remote, or this
    host's HPSWEEP_DATA_REMOTE when set. Staging errors are machine failures.
    """
    env = os.environ if environ is None else environ
    local = local_data(job, env)
    if local is not None:
        return local
    paths = {name: Path(getattr(job, name)) for name in ("train", "val")}
    missing = [name for name in paths if name not in job.data]
    if missing:
        raise FileNotFoundError(f"{', '.join(str(paths[m]) for m in missing)} not on this host, and the sweep "
                                "sent no DVC reference for it: track the data with DVC and push it to a remote")
    cache = DataCache.from_env(env)
    refs = {name: DataRef.from_dict(job.data[name]) for name in paths}
    if env.get("HPSWEEP_DATA_REMOTE"):  # this host's way to the same DVC objects (e.g. the ECS job template's)
        remote = Remote(env["HPSWEEP_DATA_REMOTE"], env.get("AWS_ENDPOINT_URL_S3"))
        refs = {name: replace(ref, remote=remote) for name, ref in refs.items()}
    staged = {name: cache.stage(ref) for name, ref in refs.items()}
    return TrialData(staged["train"], staged["val"], "cache", cache.stats.bytes_fetched)


class LocalLauncher:
    """Trials run as processes on this host, forked from one preloaded fork server."""

    def __init__(self, preload: list[str] | None = None):
        self._runner = ProcessRunner(preload)

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> TrialResult:
        return execute_trial(job, gpu_ids, self._runner)
