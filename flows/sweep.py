"""The `sweep` flow: validate → plan (reuse what is FINISHED, close zombies) → GPU workers under
the quota, one trial task per combination, retried when the machine failed it → report.

Thin composition: validation, keys, ranking and rendering are plain functions in `hpsweep`.
Rerunning the same command after any crash is the resume mechanism.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import task_run as current_task_run
from prefect.utilities.annotations import quote

from hpsweep import plan, progress, store
from hpsweep.config import SweepConfig
from hpsweep.engine.gpus import GpuPool, host_gpus, max_parallel_trials
from hpsweep.inputs import SweepInputs, load_inputs
from hpsweep.engine.launcher import LocalLauncher, TrialJob, TrialLauncher
from hpsweep.engine.outcome import TrialOutcome
from hpsweep.engine.pool import PoolLauncher, check_pool_limit
from hpsweep.dvcdata import data_ref
from hpsweep.engine.process import HEARTBEAT_S, ZOMBIE_AFTER_S
from hpsweep.engine.quota import REPOSSESS_EVERY_S, ensure_quota_limit
from hpsweep.plan import PlannedTrial, plan_trials  # re-exported: the flow's planning is hpsweep.plan's
from hpsweep.report.leaderboard import counts, learning_curves, rank_rows, render_markdown, write_report
from hpsweep.versions import git_commit

# A dead orchestrator's slots come back after this long (Prefect renews it while we live).
SLOT_LEASE_S = 60.0  # the shortest lease Prefect accepts


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep execution shares (plain data plus the launcher)."""

    sweep_id: str
    name: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    inputs: SweepInputs
    work_dir: Path
    quota_limit: str
    launcher: TrialLauncher
    gpu_pool: GpuPool
    max_attempts: int = 3
    holds_quota: bool = True  # local launcher: workers take quota slots; pool: the pool's limit does
    trial_task: Any = None  # run_trial with this sweep's retry settings
    versions: dict[str, str] = field(default_factory=dict)  # spec/data/code versions, tagged on every trial
    run_ids: dict[int, str] = field(default_factory=dict)  # trial index → its MLflow run, across attempts
    data_refs: dict[str, dict[str, Any]] = field(default_factory=dict)  # DVC refs: hosts without the files fetch
    resumable: frozenset[str] = frozenset()  # trial keys with an unfinished run: their checkpoints count


class RetryableTrialFailure(Exception):
    """The machine failed the trial (signal, lost host, tracking down): Prefect retries the task."""

    def __init__(self, outcome: TrialOutcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


def _is_retryable(task, task_run, state) -> bool:
    try:
        state.result()
    except RetryableTrialFailure:
        return True
    except Exception:
        return False
    return False


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@task(name="trial", persist_result=False, cache_policy=NO_CACHE, retry_condition_fn=_is_retryable,
      task_run_name="trial {trial.index}: " + "{trial.key}")
def run_trial(trial: PlannedTrial, ctx: SweepContext, gpu_ids: tuple[int, ...]) -> TrialOutcome:
    """One attempt of one combination, wherever the launcher runs it.

    A trainer's own failure is returned as an outcome (never retried); a machine failure
    raises RetryableTrialFailure so Prefect retries the task, resuming from the checkpoint.
    """
    attempt = current_task_run.run_count or 1
    name = store.run_name(trial.hparams)
    if attempt == 1:
        progress.current().trial_started(name)
    spec = ctx.inputs.spec
    job = TrialJob(
        sweep_id=ctx.sweep_id, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
        tracking_uri=ctx.tracking_uri, index=trial.index, hparams=trial.hparams, trial_key=trial.key,
        attempt=attempt, settings=dict(spec.settings), train=str(ctx.inputs.train.resolve()), val=str(ctx.inputs.val.resolve()),
        data=ctx.data_refs,
        entrypoint=spec.trainer.entrypoint, command=spec.trainer.command, time_limit_s=spec.time_limit_s,
        gpus=spec.resources.gpus, run_id=ctx.run_ids.get(trial.index), work_dir=str(ctx.work_dir),
        versions=ctx.versions, resume=attempt > 1 or trial.key in ctx.resumable,
    )
    result = ctx.launcher.launch(job, gpu_ids)
    outcome = result.outcome
    if result.run_id:
        ctx.run_ids[trial.index] = result.run_id
    if not outcome.ok and outcome.retryable and attempt < ctx.max_attempts:
        get_run_logger().warning("trial %d (%s): attempt %d failed: %s; retrying", trial.index, name, attempt,
                                 outcome.reason)
        if result.run_id:
            try:
                store.reopen_trial_run(MlflowClient(ctx.tracking_uri), result.run_id, attempt + 1,
                                          outcome.reason)
            except Exception:
                pass  # the next attempt finds the run as it is; its tags are rewritten then
        raise RetryableTrialFailure(outcome)
    detail = f"F1 {outcome.f1:.4f}" if outcome.ok else outcome.reason
    if not outcome.ok and attempt > 1:
        detail = f"after {attempt} attempts: {detail}"
    progress.current().trial_ended(name, outcome.ok, outcome.ended_at - outcome.started_at, detail)
    return outcome


@task(name="trial-worker", persist_result=False, cache_policy=NO_CACHE, task_run_name="trial-worker {worker}")
def trial_worker(worker: int, queue: "Queue[PlannedTrial]", ctx: SweepContext, gpu_ids: tuple[int, ...]) -> int:
    """Runs queued trials back to back on its GPUs; returns how many it ran."""
    return _drain(queue, ctx, gpu_ids)


def _gpu_worker(worker: int, queue: "Queue[PlannedTrial]", ctx: SweepContext) -> int:
    """One slot of the quota: hold it (and its GPUs) for the worker's whole life, run trials in it.

    Local launcher: the slot is taken from the Prefect concurrency limit once per worker, not
    per trial, so a freed slot goes to the next trial at once. It is taken *before* the
    worker's task run exists: Prefect serialises slot requests per limit, and once task runs
    write their states the temporary (SQLite) server answered each one in up to 2 s, so the
    8th worker of S2 started 14 s late. The lease is renewed while the worker lives and
    expires SLOT_LEASE_S after its process dies, so a crash never lowers the quota for long.
    Pool launcher: the work pool's own concurrency limit is the quota; the worker only waits.
    """
    if not ctx.holds_quota:
        return trial_worker(worker, queue, quote(ctx), ())
    gpus = ctx.inputs.spec.resources.gpus
    with concurrency(ctx.quota_limit, occupy=gpus, strict=True, lease_duration=SLOT_LEASE_S):
        gpu_ids = ctx.gpu_pool.take(gpus)
        try:
            return trial_worker(worker, queue, quote(ctx), gpu_ids)
        finally:
            ctx.gpu_pool.give_back(gpu_ids)


def _drain(queue: "Queue[PlannedTrial]", ctx: SweepContext, gpu_ids: tuple[int, ...]) -> int:
    ran = 0
    while True:
        try:
            trial = queue.get_nowait()
        except Empty:
            return ran
        try:
            # quote: Prefect must not walk ctx (its run_ids grow in other threads meanwhile:
            # "dictionary changed size during iteration" killed workers; and the walk is per trial).
            ctx.trial_task(trial, quote(ctx), gpu_ids)
        except RetryableTrialFailure as e:  # out of attempts: the run holds the reason
            progress.current().trial_ended(store.run_name(trial.hparams), False, 0.0,
                                           f"after {ctx.max_attempts} attempts: {e}")
        ran += 1


class Heartbeat:
    """Keeps the parent run visibly alive while the sweep runs (so no other sweep reaps it)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client, run_id), daemon=True)
        self._thread.start()

    def _beat(self, client: MlflowClient, run_id: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.heartbeat(client, run_id)
            except Exception:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@flow(name="sweep", persist_result=False, log_prints=True)
def sweep(config: SweepConfig) -> dict[str, Any]:
    """Train every combination once, at most quota/gpus at a time, and report them ranked by F1.

    Idempotent: a rerun reuses every trial that has a FINISHED run with the same trial key.
    Returns the leaderboard summary: sweep id, counts, report paths, champion.
    """
    logger = get_run_logger()
    host = host_gpus()
    inputs = load_inputs(config.combinations, config.spec, config.train, config.val, config.quota,
                         host if config.launcher == "local" else ())
    name = config.name or inputs.spec.name or config.spec.stem
    trials, versions = plan_trials(inputs)
    tracking_uri = store.resolve_tracking_uri(config.tracking_uri)
    client = MlflowClient(tracking_uri)
    sweep_id = new_sweep_id(name)
    gpus = inputs.spec.resources.gpus
    if config.launcher == "local":
        taken = ensure_quota_limit(config.quota_limit, config.quota)
        if taken:
            logger.warning("%d of the %d slots of quota limit %r are taken: trials wait for them. Another sweep "
                           "holds them, or one that died: its slots come back within %.0f s.", taken, config.quota,
                           config.quota_limit, SLOT_LEASE_S + REPOSSESS_EVERY_S)

    experiment_id = store.ensure_experiment(client, name)
    zombies = store.reap_zombies(client, experiment_id, ZOMBIE_AFTER_S)
    if zombies:
        logger.warning("closed %d zombie run(s) left RUNNING by a dead process: %s", len(zombies), zombies)
    reused = plan.reusable_runs(client, experiment_id, trials, versions, config.retrain)
    to_train = plan.trials_to_train(trials, reused)
    resumable = store.unfinished_trial_keys(client, experiment_id, {t.key for t in to_train}, versions)
    pooled = config.launcher == "pool"
    if pooled:
        pool_limit = check_pool_limit(config.pool, config.quota)
        # Enough flow runs waiting in the pool that a freed slot is taken at once.
        parallel = max(1, min(len(to_train), 2 * pool_limit + 2))
        slots = max(1, min(len(to_train), pool_limit))  # trials that actually run at once
    else:
        parallel = slots = max_parallel_trials(config.quota, gpus, host, max(1, len(to_train)))
    to_train, estimates, order = _dispatch(client, experiment_id, inputs, versions, to_train, slots)

    provenance = {**versions, "hpsweep.git_commit": git_commit(), "hpsweep.engine.quota": str(config.quota)}
    parent_run_id = store.start_parent_run(
        client, experiment_id, sweep_id,
        {**provenance, plan.TAG_DISPATCH: order, **_flow_run_tag()},
        params={"combinations": config.combinations, "spec": config.spec, "train": config.train,
                "val": config.val, "quota": config.quota, "gpus_per_trial": gpus, "trials": len(trials),
                "reused": len(reused), "max_attempts": config.max_attempts, "slots": slots},
    )
    # What `hpsweep report` and `hpsweep status` re-read later: every trial, its estimate, its turn.
    est = {t.index: e for t, e in zip(to_train, estimates)}
    turn = {t.index: i for i, t in enumerate(to_train, start=1)}
    plan_rows = [{"index": t.index, "key": t.key, "hparams": t.hparams,
             "reused_run_id": reused[t.key]["run_id"] if t.key in reused else None,
             "expected_duration_s": est[t.index].seconds if t.index in est else None,
             "duration_source": est[t.index].source if t.index in est else None,
             "dispatch_position": turn.get(t.index)} for t in trials]
    client.log_text(parent_run_id, json.dumps(plan_rows, indent=1), "plan.json")
    beat = Heartbeat(client, parent_run_id)

    entry_module = (inputs.spec.trainer.entrypoint or "").partition(":")[0]
    ctx = SweepContext(
        sweep_id=sweep_id, name=name, experiment_id=experiment_id, parent_run_id=parent_run_id,
        tracking_uri=tracking_uri, inputs=inputs, work_dir=config.work_dir, quota_limit=config.quota_limit,
        launcher=_launcher(config, entry_module, sweep_id) if to_train else None,
        gpu_pool=GpuPool(host), max_attempts=config.max_attempts, holds_quota=not pooled,
        versions={**versions, "hpsweep.git_commit": provenance["hpsweep.git_commit"]},  # trial provenance
        data_refs={"train": data_ref(inputs.train).as_dict(), "val": data_ref(inputs.val).as_dict()},
        resumable=frozenset(resumable),
        trial_task=run_trial.with_options(
            retries=config.max_attempts - 1,
            retry_delay_seconds=[config.retry_delay_s * 4**i for i in range(max(1, config.max_attempts - 1))]),
    )
    logger.info("sweep %s: %d combinations, %d reused, %d to train, %d at once (quota %d, %d GPU(s) per "
                "trial, host GPUs %s), %s", sweep_id, len(trials), len(reused), len(to_train), parallel,
                config.quota, gpus, list(host) or "none", order)
    progress.current().begin(len(to_train), parallel)
    try:
        _train_all(to_train, ctx, parallel, logger)
    finally:
        progress.current().close()
        beat.stop()
    return finish_sweep(client, config, name, sweep_id, experiment_id, parent_run_id, tracking_uri, provenance,
                        trials, reused)


def _dispatch(client: MlflowClient, experiment_id: str, inputs: SweepInputs, versions: dict[str, str],
              to_train: list[PlannedTrial], slots: int
              ) -> tuple[list[PlannedTrial], list[plan.Estimate], str]:
    """The trials in the order to start them, their estimates, and that order's description.

    The order only matters when trials wait for a slot; only then is the duration history read.
    """
    waits = len(to_train) > slots
    history = plan.duration_history(client, experiment_id, versions["hpsweep.spec_hash"]) if waits \
        else plan.DurationHistory()
    estimates = plan.estimate_durations(to_train, inputs.spec.expected_duration_s, history)
    if not waits:
        return to_train, estimates, f"{plan.FILE_ORDER} (every trial starts at once)"
    ordered, ordered_est, order = plan.dispatch_order(to_train, estimates)
    return ordered, ordered_est, plan.describe_order(order, ordered_est)


def _flow_run_tag() -> dict[str, str]:
    """The Prefect flow run of this sweep, so `hpsweep status` can ask Prefect for its state."""
    from prefect.runtime import flow_run

    return {"hpsweep.flow_run_id": str(flow_run.id)} if flow_run.id else {}


def _launcher(config: SweepConfig, entry_module: str, sweep_id: str) -> TrialLauncher:
    if config.launcher == "pool":
        return PoolLauncher(config.trial_deployment, salt=sweep_id if config.retrain else "")
    return LocalLauncher(preload=[entry_module] if entry_module else [])


def _train_all(to_train: list[PlannedTrial], ctx: SweepContext, parallel: int, logger) -> None:
    if not to_train:
        return
    queue: Queue[PlannedTrial] = Queue()
    for t in to_train:
        queue.put(t)
    # Plain threads, each in a copy of the flow's context, so a worker's task run (and its
    # trials') belong to this flow run while its quota slot is taken outside any task run.
    contexts = [contextvars.copy_context() for _ in range(parallel)]
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="gpu-worker") as threads:
        workers = [threads.submit(contexts[w - 1].run, _gpu_worker, w, queue, ctx) for w in range(1, parallel + 1)]
        for w in workers:
            try:
                w.result()
            except Exception as e:  # the other workers go on draining the queue
                logger.error("a GPU worker failed: %s: %s", type(e).__name__, e)


def never_started(trials: list[PlannedTrial], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for combinations with no run in MLflow, so every combination appears in the report."""
    seen = {r["index"] for r in runs}
    return [{"run_id": "", "run_name": store.run_name(t.hparams), "status": "FAILED", "hparams": t.hparams,
             "f1": None, "reason": "never started (see the sweep's log)", "index": t.index, "attempt": 0,
             "trial_key": t.key, "duration_s": None} for t in trials if t.index not in seen]


def reused_rows(trials: list[PlannedTrial], reused: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Reused trials keep the original run's id and F1, and take this sweep's file order."""
    return [{**reused[t.key], "status": "REUSED", "index": t.index, "hparams": t.hparams}
            for t in trials if t.key in reused]


def sweep_meta(sweep_id: str, name: str, experiment_id: str, parent_run_id: str, tracking_uri: str,
               provenance: dict[str, str], quota: int | str | None) -> dict[str, Any]:
    """The report's header (leaderboard.json's top-level keys, but for the champion)."""
    return {
        "sweep_id": sweep_id, "name": name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "tracking_uri": store.redact_uri(tracking_uri), "spec_hash": provenance.get("hpsweep.spec_hash"),
        "data_version": provenance.get("hpsweep.data_version"), "git_commit": provenance.get("hpsweep.git_commit"),
        "quota": int(quota) if quota is not None else None, "champion": None,
    }


def report_sweep(client: MlflowClient, meta: dict[str, Any], trials: list[PlannedTrial],
                 reused: dict[str, dict[str, Any]], report_dir: Path, register: bool
                 ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Path]]:
    """Read a sweep's trials back from MLflow (the source of truth), rank them, write the report.

    ``register``: point the model's ``champion`` alias at the best trial (the sweep does); else only
    name the current champion when it is this sweep's best (`hpsweep report` changes nothing in MLflow).
    Returns the ranked rows, the header written and every file written.
    """
    runs = store.sweep_runs(client, meta["experiment_id"], meta["sweep_id"]) + reused_rows(trials, reused)
    rows = rank_rows(runs + never_started(trials, runs))
    best = next((r for r in rows if r["f1"] is not None), None)
    meta = {**meta, "champion": _champion(client, meta["name"], best, register)}
    curves = learning_curves(client, rows)
    paths = write_report(report_dir, meta, rows, curves=curves)
    return rows, meta, paths


def _champion(client: MlflowClient, name: str, best: dict[str, Any] | None, register: bool) -> str | None:
    if best is None:
        return None
    if register:
        if not store.has_model(client, best["run_id"]):
            return None
        version = store.register_champion(client, name, best["run_id"])
    else:
        try:
            current = client.get_model_version_by_alias(name, store.CHAMPION_ALIAS)
        except Exception:  # no registered model or no alias: nothing to name
            return None
        if current.run_id != best["run_id"]:
            return None
        version = current.version
    return f"models:/{name}@{store.CHAMPION_ALIAS} (version {version}, run {best['run_id']})"


def finish_sweep(client: MlflowClient, config: SweepConfig, name: str, sweep_id: str, experiment_id: str,
                 parent_run_id: str, tracking_uri: str, provenance: dict[str, str],
                 trials: list[PlannedTrial], reused: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Report (read, rank, register, write), log the report to the parent run, close it, publish to Prefect."""
    report_dir = config.report_dir or Path("reports") / name
    meta = sweep_meta(sweep_id, name, experiment_id, parent_run_id, tracking_uri, provenance, config.quota)
    rows, header, paths = report_sweep(client, meta, trials, reused, report_dir, register=True)
    best = next((r for r in rows if r["f1"] is not None), None)
    for path in paths.values():
        client.log_artifact(parent_run_id, str(path), "report")
    c = counts(rows)
    for key, value in c.items():
        client.log_metric(parent_run_id, f"trials_{key}", value)
    if best is not None:
        client.log_metric(parent_run_id, "best_f1", best["f1"])
    client.set_terminated(parent_run_id, "FINISHED" if c["failed"] == 0 else "FAILED")

    artifact_key = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "sweep"
    create_markdown_artifact(render_markdown(header, rows), key=f"{artifact_key}-leaderboard",
                             description=f"Leaderboard of sweep {sweep_id}")
    create_table_artifact([{"rank": r["rank"], **r["hparams"], "f1": r["f1"], "status": r["status"],
                            "attempts": r["attempts"], "reason": r.get("reason", "")} for r in rows],
                          key=f"{artifact_key}-table", description=f"Trials of sweep {sweep_id}")
    return {**header, "counts": c, "report_dir": str(report_dir),
            "top": rows[:3], "report_files": {k: str(v) for k, v in paths.items()}}
