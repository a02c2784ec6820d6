"""The pool launcher: each trial attempt is a flow run of the `train-trial` deployment on a
Prefect work pool whose concurrency limit is the GPU quota (a process pool in tests, an ECS
GPU pool in AWS). The pool's limit, not code in the sweep, decides how many trials run, so
the pool never starts more GPU containers than the quota allows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from uuid import UUID

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from hpsweep import store
from hpsweep.inputs import Problem, SweepInputError
from hpsweep.model import AttemptResult, Outcome, TrialJob
from hpsweep.store.filters import all_of, tag_equals

log = logging.getLogger("hpsweep")


def check_pool_limit(pool: str | None, quota: int) -> int:
    """The pool's concurrency limit, if it is set and at most the quota; else an input error."""
    if not pool:
        raise SweepInputError([Problem("--pool", "required with --launcher pool")])
    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise SweepInputError([Problem("--pool", f"work pool '{pool}' does not exist: create it with "
                                           f"`prefect work-pool create {pool} --type process` (or ecs)")]) from None
    limit = work_pool.concurrency_limit
    fix = f"run `prefect work-pool set-concurrency-limit {pool} {quota}`"
    if limit is None:
        raise SweepInputError([Problem("--pool", f"work pool '{pool}' has no concurrency limit, so it could "
                                       f"start more trials than the quota of {quota} GPUs: {fix}")])
    if limit > quota:
        raise SweepInputError([Problem("--pool", f"work pool '{pool}' allows {limit} runs at once, more than "
                                       f"the quota of {quota} GPUs: {fix}")])
    return limit


def idempotency_key(job: TrialJob, salt: str = "") -> str:
    """One flow run per trial key and attempt: a rerun of the sweep (or a retried API call)
    gets the existing flow run back instead of launching the trial again. ``salt`` (the sweep
    id under --retrain) asks for new flow runs on purpose."""
    return f"hpsweep:{job.trial_key}:attempt-{job.attempt}{':' + salt if salt else ''}"


class PoolLauncher:
    """Launches `train-trial` flow runs and reads each trial's outcome back from MLflow."""

    def __init__(self, deployment: str, poll_interval_s: float = 1.0, salt: str = ""):
        self.deployment = deployment
        self.poll_interval_s = poll_interval_s
        self.salt = salt
        self._in_flight: set[UUID] = set()
        self._stopped_by: str | None = None
        self._lock = threading.Lock()

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult:
        if self._stopped_by is not None:
            now = time.time()
            return AttemptResult(job.run_id, Outcome(False, None, f"not started: {self._stopped_by}", killed=True,
                                                     interrupted=True, started_at=now, ended_at=now))
        flow_run = run_deployment(
            self.deployment, parameters={"job": job.as_dict()}, idempotency_key=idempotency_key(job, self.salt),
            # Named like the trial's MLflow run (its hparams), not Prefect's random two words.
            flow_run_name=job.display_name,
            timeout=0, as_subflow=True, tags=["hpsweep", f"sweep:{job.sweep_id}"],
            # The ECS template's GPU request per trial (a string: ECS takes the count as one).
            job_variables={"gpus": str(job.gpus)},
        )
        with self._lock:
            self._in_flight.add(flow_run.id)
        if self._stopped_by is not None:
            self._cancel([flow_run.id])
        try:
            flow_run = self._wait(flow_run.id)
        finally:
            with self._lock:
                self._in_flight.discard(flow_run.id)
        result = self._result(job, flow_run)
        if self._stopped_by is not None and not result.outcome.ok:
            return AttemptResult(result.run_id, replace(result.outcome, reason=self._stopped_by, retryable=False,
                                                        killed=True, interrupted=True))
        return result

    def interrupt(self, grace_s: float, reason: str) -> None:
        """Cancel every trial flow run in flight: Prefect's worker stops its process (or ECS task)
        with SIGTERM, then kills it after the worker's own grace; none starts from now on."""
        with self._lock:
            self._stopped_by = reason
            in_flight = list(self._in_flight)
        self._cancel(in_flight)

    def _cancel(self, flow_run_ids: list[UUID]) -> None:
        with get_client(sync_client=True) as client:
            for flow_run_id in flow_run_ids:
                try:
                    client.set_flow_run_state(flow_run_id, Cancelling(message=self._stopped_by), force=True)
                except Exception as e:  # noqa: BLE001 - the others still get theirs
                    log.warning("could not cancel trial flow run %s: %s", flow_run_id, e)

    def _wait(self, flow_run_id: UUID):
        """The flow run, once its state is final."""
        with get_client(sync_client=True) as client:
            while True:
                flow_run = client.read_flow_run(flow_run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    return flow_run
                time.sleep(self.poll_interval_s)

    def _result(self, job: TrialJob, flow_run) -> AttemptResult:
        client = MlflowClient(job.tracking_uri)
        launched = flow_run.parameters.get("job", {})
        flt = all_of(tag_equals(store.TAG_TRIAL_KEY, job.trial_key),
                     tag_equals(store.TAG_SWEEP_ID, launched.get("sweep_id", job.sweep_id)))
        runs = list(store.runs.search(client, [job.experiment_id], flt, order_by=["attributes.start_time DESC"],
                                      limit=1))
        if not runs or runs[0].info.status == "RUNNING":
            state = flow_run.state
            reason = f"pool flow run '{flow_run.name}' ended {state.type.value if state else 'without a state'}"
            if state is not None and state.message:
                reason += f": {state.message}"
            now = time.time()
            if runs:  # its worker died mid-trial: close the run, so a retry may reopen it
                store.mark_failed(client, runs[0].info.run_id, reason, killed=True)
            return AttemptResult(runs[0].info.run_id if runs else None,
                                 Outcome(False, None, reason, retryable=True, killed=True, started_at=now, ended_at=now))
        run = runs[0]
        if launched.get("sweep_id") != job.sweep_id:  # an earlier sweep launched it: this sweep adopts it
            store.set_tags(client, run.info.run_id, {store.TAG_SWEEP_ID: job.sweep_id,
                                                     store.TAG_ADOPTED_FROM: launched.get("sweep_id", "")})
        return AttemptResult(run.info.run_id, store.outcome_of(run))
