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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mlflow.tracking import MlflowClient

from hpsweep import store
from hpsweep.datacache import DataCache, DataRef, Remote
from hpsweep.engine.early_stop import best_so_far
from hpsweep.engine.process import CHECKPOINT_SYNC_S, ProcessRunner
from hpsweep.identity import process_identity
from hpsweep.model import AttemptResult, Outcome, TrialJob
from hpsweep.runtime.runner import TrialRequest


class TrialLauncher(Protocol):
    """Runs one attempt of one trial to completion and records it in MLflow.

    Guarantees: the trial's MLflow run exists and is terminal when ``launch`` returns (the engine
    reopens it for a retry); a trainer's failure is an outcome, never an exception. Safe to call
    from several threads at once.
    """

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult: ...

    def interrupt(self, grace_s: float, reason: str) -> None:
        """The sweep is stopping: end the running trials (``grace_s`` to save a checkpoint, 0: at
        once) and start no more; their outcomes are ``interrupted`` with ``reason``."""


def execute_trial(job: TrialJob, gpu_ids: tuple[int, ...], runner: ProcessRunner) -> AttemptResult:
    """Create (or continue) the trial's run, train in a child process, store the outcome.

    hpsweep's own bookkeeping failing (the tracking server down past its patience) is a machine
    failure: a retryable outcome, never an exception. The tracking store refusing a write (a 4xx:
    a param key too long, a value too big for its column) fails the trial for good, with its message.
    """
    store.cap_client_backoff()  # a pool worker's process: before its first request; the trainer inherits it
    client = MlflowClient(job.tracking_uri)
    run_id = job.run_id
    try:
        data = local_data(job)  # the common case: the sweep's own files (a stat(), no I/O)
        if run_id is None:
            run_id = _create_run(client, job, gpu_ids, data)
        data = _prepare_run(client, job, run_id, data)
        request = _request(job, run_id, data, gpu_ids)
        stop_request = (lambda: store.stop_request(client, run_id)) if job.early_stop else None
        outcome = runner.run(request, job.time_limit_s, heartbeat=lambda: store.heartbeat(client, run_id),
                             stop_request=stop_request)
        if outcome.stopped:  # its F1 is its best reported value of the rule's metric
            metric = job.early_stop["metric"]  # type: ignore[index]
            history = store.retrying(lambda: store.runs.metric_history(client, run_id, metric), "reading its metric")
            outcome = replace(outcome, f1=best_so_far(history))
        store.retrying(lambda: store.finish_trial_run(client, run_id, outcome, request.paths.log),
                       "storing the trial's result")
        if outcome.ok:  # its checkpoints are in the artifact store; a finished trial never resumes
            shutil.rmtree(request.paths.checkpoints, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - any bookkeeping error is the machine's, not the trainer's
        now = time.time()
        refused = store.refused_by_store(e)
        why = "the tracking store refused a write for the trial" if refused else "hpsweep could not run the trial"
        outcome = Outcome(False, None, f"{why}: {type(e).__name__}: {e}", retryable=not refused,
                          started_at=now, ended_at=now)
        if run_id is not None:
            _try(lambda: store.mark_failed(client, run_id, outcome.reason, retryable=outcome.retryable))
    return AttemptResult(run_id, outcome)


def _create_run(client: MlflowClient, job: TrialJob, gpu_ids: tuple[int, ...], data: "TrialData | None") -> str:
    """The first attempt's run, created with all its tags in one write, tagged with where its data
    came from when already known. Retried creations find the run an earlier try made (one run per trial)."""
    tags = {**job.versions, store.TAG_GPUS: ",".join(map(str, gpu_ids)) or "cpu", **(data.tags() if data else {})}
    tried = []  # after a failed try, look for the run it may have made before creating one

    def create() -> str:
        look_first = bool(tried)
        tried.append(True)
        return store.open_trial_run(client, job.experiment_id, job.parent_run_id, job.sweep_id, job.index,
                                    job.hparams, job.trial_key, job.attempt, tags=tags, look_first=look_first)

    return store.retrying(create, "creating the trial's run")


def _prepare_run(client: MlflowClient, job: TrialJob, run_id: str, data: "TrialData | None") -> "TrialData":
    """The run ready for this attempt (params logged on the first, reopened on a retry) and the
    attempt's data, tagged with where it came from (staging may fetch: after the run exists, so it shows)."""
    if job.run_id is None:
        store.retrying(lambda: store.log_trial_params(client, run_id, job.hparams, job.settings),
                       "logging the trial's params")
    else:  # a retry continues the same run, perhaps on another host
        store.retrying(lambda: store.reopen_trial_run(client, run_id, job.attempt), "reopening the trial's run")
        if data is not None:
            store.retrying(lambda: store.set_tags(client, run_id, data.tags()), "tagging the run")
    if data is None:
        data = trial_data(job)
        store.retrying(lambda: store.set_tags(client, run_id, data.tags()), "tagging the run")
    return data


def _request(job: TrialJob, run_id: str, data: "TrialData", gpu_ids: tuple[int, ...]) -> TrialRequest:
    trial_dir = Path(job.work_dir) / "trials" / job.trial_key
    trial_dir.mkdir(parents=True, exist_ok=True)
    return TrialRequest(job=job, run_id=run_id, train=str(data.train), val=str(data.val),
                        trial_dir=str(trial_dir.resolve()), gpu_ids=gpu_ids, checkpoint_sync_s=CHECKPOINT_SYNC_S,
                        orchestrator=process_identity())


def _try(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the tracking server is what failed; the next sweep reaps the run
        pass


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
    """The train and validation data (files or folders) this host reads, and where they came from.

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

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult:
        return execute_trial(job, gpu_ids, self._runner)

    def interrupt(self, grace_s: float, reason: str) -> None:
        self._runner.interrupt(grace_s, reason)
