"""The `sweep` flow: validate → plan → one trial task per combination under the GPU quota → report.

Thin composition: validation, keys, ranking and rendering are plain functions in `hpsweep`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner

from hpsweep import progress, tracking
from hpsweep.config import SweepConfig
from hpsweep.gpus import GpuPool, host_gpus, max_parallel_trials
from hpsweep.inputs import Hparams, SweepInputs, load_inputs
from hpsweep.launcher import LocalLauncher, TrialLauncher, TrialOutcome
from hpsweep.quota import ensure_quota_limit
from hpsweep.report import counts, rank_rows, render_markdown, write_report
from hpsweep.versions import code_version, data_version, git_commit, spec_hash, trial_key
from trainer.runner import TrialRequest

# A dead orchestrator's slots come back after this long (Prefect renews it while we live).
SLOT_LEASE_S = 60.0


@dataclass(frozen=True)
class PlannedTrial:
    index: int  # 1-based position in the combinations file
    hparams: Hparams
    key: str


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


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def plan_trials(inputs: SweepInputs) -> tuple[list[PlannedTrial], dict[str, str]]:
    """A trial key per combination, plus the versions it was derived from (provenance tags)."""
    versions = {
        "hpsweep.spec_hash": spec_hash(inputs.spec),
        "hpsweep.data_version": f"{data_version(inputs.train)}/{data_version(inputs.val)}",
        "hpsweep.code_version": code_version(inputs.spec),
    }
    trials = [
        PlannedTrial(i, hp, trial_key(hp, versions["hpsweep.spec_hash"], versions["hpsweep.data_version"],
                                      versions["hpsweep.code_version"]))
        for i, hp in enumerate(inputs.combinations, start=1)
    ]
    return trials, versions


@task(name="trial", persist_result=False, cache_policy=NO_CACHE,
      task_run_name="trial {trial.index}: " + "{trial.key}")
def run_trial(trial: PlannedTrial, ctx: SweepContext, attempt: int = 1) -> TrialOutcome:
    spec = ctx.inputs.spec
    client = MlflowClient(ctx.tracking_uri)
    name = tracking.run_name(trial.hparams)
    with concurrency(ctx.quota_limit, occupy=spec.resources.gpus, strict=True, lease_duration=SLOT_LEASE_S):
        gpu_ids = ctx.gpu_pool.take(spec.resources.gpus)
        run_id = None
        try:
            run_id = tracking.start_trial_run(
                client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id, trial.index, trial.hparams,
                trial.key, attempt, tags={"hpsweep.gpus": ",".join(map(str, gpu_ids)) or "cpu"},
            )
            trial_dir = ctx.work_dir / "trials" / trial.key
            trial_dir.mkdir(parents=True, exist_ok=True)
            request = TrialRequest(
                run_id=run_id, tracking_uri=ctx.tracking_uri, hparams=trial.hparams,
                settings=dict(spec.settings), train=str(ctx.inputs.train.resolve()),
                val=str(ctx.inputs.val.resolve()), trial_dir=str(trial_dir.resolve()), cwd=str(Path.cwd()),
                entrypoint=spec.trainer.entrypoint, command=spec.trainer.command, gpu_ids=gpu_ids,
            )
            progress.current().trial_started(name)
            outcome = ctx.launcher.run(request, spec.time_limit_s)
            tracking.finish_trial_run(client, run_id, outcome, request.paths.log)
        except Exception as e:  # bookkeeping failed (e.g. tracking down): the trial is a failure, not a crash
            outcome = TrialOutcome(False, None, f"hpsweep could not run the trial: {type(e).__name__}: {e}",
                                   retryable=True, started_at=time.time(), ended_at=time.time())
            if run_id is not None:
                _try_mark_failed(client, run_id, outcome.reason)
        finally:
            ctx.gpu_pool.give_back(gpu_ids)
    detail = f"F1 {outcome.f1:.4f}" if outcome.ok else outcome.reason
    progress.current().trial_ended(name, outcome.ok, outcome.ended_at - outcome.started_at, detail)
    return outcome


def _try_mark_failed(client: MlflowClient, run_id: str, reason: str | None) -> None:
    try:
        client.set_tag(run_id, tracking.TAG_STATUS, "FAILED")
        client.set_tag(run_id, tracking.TAG_REASON, reason or "unknown")
        client.set_terminated(run_id, "FAILED")
    except Exception:
        pass  # the tracking server is what failed; the report will show the run as not finished


@flow(name="sweep", persist_result=False, log_prints=True)
def sweep(config: SweepConfig) -> dict[str, Any]:
    """Train every combination once, at most quota/gpus at a time, and report them ranked by F1.

    Returns the leaderboard summary: sweep id, counts, report paths, champion.
    """
    logger = get_run_logger()
    inputs = load_inputs(config.combinations, config.spec, config.train, config.val, config.quota)
    name = config.name or inputs.spec.name or config.spec.stem
    trials, versions = plan_trials(inputs)
    tracking_uri = tracking.resolve_tracking_uri(config.tracking_uri)
    client = MlflowClient(tracking_uri)
    sweep_id = new_sweep_id(name)
    gpus = inputs.spec.resources.gpus
    host = host_gpus()
    parallel = max_parallel_trials(config.quota, gpus, host, len(trials))
    ensure_quota_limit(config.quota_limit, config.quota)

    experiment_id = tracking.ensure_experiment(client, name)
    provenance = {**versions, "hpsweep.git_commit": git_commit(), "hpsweep.quota": str(config.quota)}
    parent_run_id = tracking.start_parent_run(
        client, experiment_id, sweep_id, provenance,
        params={"combinations": config.combinations, "spec": config.spec, "train": config.train,
                "val": config.val, "quota": config.quota, "gpus_per_trial": gpus, "trials": len(trials)},
    )
    entry_module = (inputs.spec.trainer.entrypoint or "").partition(":")[0]
    ctx = SweepContext(
        sweep_id=sweep_id, name=name, experiment_id=experiment_id, parent_run_id=parent_run_id,
        tracking_uri=tracking_uri, inputs=inputs, work_dir=config.work_dir, quota_limit=config.quota_limit,
        launcher=LocalLauncher(preload=[entry_module] if entry_module else []), gpu_pool=GpuPool(host),
    )
    logger.info("sweep %s: %d trials, %d at once (quota %d, %d GPU(s) per trial, host GPUs %s)",
                sweep_id, len(trials), parallel, config.quota, gpus, list(host) or "none")
    progress.current().begin(len(trials), parallel)
    with ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(run_trial, parameters={"trial": t, "ctx": ctx}) for t in trials]
        for f in futures:
            f.wait()
    progress.current().close()
    return finish_sweep(client, config, name, sweep_id, experiment_id, parent_run_id, tracking_uri, provenance)


def finish_sweep(client: MlflowClient, config: SweepConfig, name: str, sweep_id: str, experiment_id: str,
                 parent_run_id: str, tracking_uri: str, provenance: dict[str, str]) -> dict[str, Any]:
    """Read the trials back from MLflow (the source of truth), rank, register, write the report."""
    rows = rank_rows(tracking.sweep_runs(client, experiment_id, sweep_id))
    champion = None
    best = next((r for r in rows if r["f1"] is not None), None)
    if best is not None and tracking.has_model(client, best["run_id"]):
        version = tracking.register_champion(client, name, best["run_id"])
        champion = f"models:/{name}@{tracking.CHAMPION_ALIAS} (version {version}, run {best['run_id']})"
    sweep_meta = {
        "sweep_id": sweep_id, "name": name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri, "spec_hash": provenance["hpsweep.spec_hash"],
        "data_version": provenance["hpsweep.data_version"], "git_commit": provenance["hpsweep.git_commit"],
        "quota": config.quota, "champion": champion,
    }
    report_dir = config.report_dir or Path("reports") / name
    paths = write_report(report_dir, sweep_meta, rows)
    for path in paths.values():
        client.log_artifact(parent_run_id, str(path), "report")
    c = counts(rows)
    client.log_batch(parent_run_id, metrics=[], tags=[])
    for key, value in c.items():
        client.log_metric(parent_run_id, f"trials_{key}", value)
    if best is not None:
        client.log_metric(parent_run_id, "best_f1", best["f1"])
    client.set_terminated(parent_run_id, "FINISHED" if c["failed"] == 0 else "FAILED")

    artifact_key = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "sweep"
    create_markdown_artifact(render_markdown(sweep_meta, rows), key=f"{artifact_key}-leaderboard",
                             description=f"Leaderboard of sweep {sweep_id}")
    create_table_artifact([{"rank": r["rank"], **r["hparams"], "f1": r["f1"], "status": r["status"],
                            "reason": r.get("reason", "")} for r in rows],
                          key=f"{artifact_key}-table", description=f"Trials of sweep {sweep_id}")
    return {**sweep_meta, "counts": c, "report_dir": str(report_dir),
            "top": rows[:3], "report_files": {k: str(v) for k, v in paths.items()}}
