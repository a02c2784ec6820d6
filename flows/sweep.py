"""The `sweep` flow: Prefect around hpsweep's engine.

Prefect's parts: the GPU quota is a Prefect concurrency limit (or a work pool's), each attempt of
each trial is a task run, and the leaderboard is published as artifacts. The logic (planning,
retries, ranking) is the engine's (``hpsweep.engine``), which knows nothing of Prefect.
"""

from __future__ import annotations

from contextlib import chdir, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from hpsweep.config import SweepConfig, SweepOverrides, build_config, check_tie_break
from hpsweep.engine import sweep as engine
from hpsweep.engine.callbacks import LogCallback, SweepCallback, observers
from hpsweep.engine.controller import RetryPolicy, SweepEngine
from hpsweep.engine.gpus import GpuPool, host_gpus, max_parallel_trials
from hpsweep.engine.launcher import LocalLauncher, TrialLauncher
from hpsweep.engine.pool import PoolLauncher, check_pool_limit
from hpsweep.engine.quota import REPOSSESS_EVERY_S, SLOT_LEASE_S, ensure_quota_limit
from hpsweep.engine.quota import hold_slot as hold_quota_slot
from hpsweep.engine.stopping import StopRequest, stop_on_signals
from hpsweep.inputs import load_inputs
from hpsweep.model import AttemptResult, TrialJob, TrialRow
from hpsweep.plan import describe_reuse
from hpsweep.report.cells import short_text
from hpsweep.report.leaderboard import TIED, interval_text, render_markdown
from hpsweep.report.links import mlflow_ui_note, run_url
from hpsweep.store import SweepStore, resolve_tracking_uri


# Named like the trial's MLflow run (its hparams), not Prefect's random two words.
@task(name="trial", persist_result=False, cache_policy=NO_CACHE, task_run_name="{job.display_name}")
def trial_attempt(job: TrialJob, gpu_ids: tuple[int, ...], launcher: TrialLauncher) -> AttemptResult:
    """One attempt of one combination, wherever the launcher runs it (a failure is an outcome)."""
    return launcher.launch(job, gpu_ids)


class PrefectArtifacts(SweepCallback):
    """The leaderboard as a markdown (each run linked to the MLflow UI) and a table artifact of the flow run."""

    def on_report(self, header: dict[str, Any], rows: list[TrialRow]) -> None:
        key = "".join(ch if ch.isalnum() else "-" for ch in header["name"].lower()).strip("-") or "sweep"
        uri, experiment = header["tracking_uri"], header["experiment_id"]
        board = render_markdown(header, rows, run_link=lambda run_id: run_url(uri, experiment, run_id))
        create_markdown_artifact(f"{board}\n{mlflow_ui_note(uri, experiment)}\n", key=f"{key}-leaderboard",
                                 description=f"Leaderboard of sweep {header['sweep_id']}")
        shown = lambda v: v if isinstance(v, (int, float)) else short_text(v)  # noqa: E731 - numbers stay numbers
        create_table_artifact([{"rank": r.rank, **{k: shown(v) for k, v in r.hparams.items()},
                                "f1": r.leaderboard()["f1"], **_interval(r), "status": r.report_status,
                                "attempts": r.attempt,
                                "reason": short_text(r.reason or "") if not r.has_f1 else ""} for r in rows],
                              key=f"{key}-table", description=f"Trials of sweep {header['sweep_id']}")


def _interval(row: TrialRow) -> dict[str, str]:
    """The F1's 95% bootstrap interval and the tie mark (≈: statistically tied with the best)."""
    sig = row.significance
    return {"f1_95%_ci": interval_text(sig.ci_low, sig.ci_high) if sig else "",
            "tied_with_best": TIED if sig and sig.tied_with_best else ""}


@flow(name="sweep", persist_result=False, log_prints=True)
def sweep(config: SweepOverrides | None = None, project_dir: Path | None = None,
          params: Path | None = Path("params.yaml"), started: engine.StartedSweep | None = None) -> dict[str, Any]:
    """Train every combination once, at most quota/gpus at a time, and report them ranked by F1.

    ``started``: the parent run `hpsweep run` wrote (STARTING) before Prefect started, and keeps
    beating; None (a deployment's run): the flow starts one and beats it itself.
    Idempotent: a rerun reuses every trial that has a FINISHED run with the same trial key.
    Returns the leaderboard summary: sweep id, counts, report paths, champion.

    Args:
        config: any of `hpsweep run`'s settings (combinations, spec, train, val, quota, launcher, pool, ...);
            what it leaves out comes from the `sweep:` section of `params`, as for `hpsweep run`.
        project_dir: the folder relative paths (`params` too) are read in, and where the MLflow store, the
            reports and the trial folders go by default; default: the flow run's working directory (a
            deployment's is prefect.yaml's $HPSWEEP_HOME, as it was at `prefect deploy`).
        params: the YAML file whose `sweep:` section gives the defaults; null: none.
    """
    with chdir(project_dir) if project_dir else nullcontext():
        settings = build_config((config or SweepOverrides()).model_dump(), params, named=lambda k: f"config.{k}")
        with stop_on_signals(StopRequest(settings.grace_s)) as stop:
            return _sweep(settings, stop, started)


def _sweep(config: SweepConfig, stop: StopRequest, started: engine.StartedSweep | None) -> dict[str, Any]:
    logger = get_run_logger()
    local = config.launcher == "local"
    host = host_gpus() if local else ()
    inputs = load_inputs(config.combinations, config.spec, config.train, config.val, config.quota, host)
    check_tie_break(config, inputs)
    store = SweepStore.at(resolve_tracking_uri(config.tracking_uri))
    gpus = inputs.spec.resources.gpus
    if local:
        shared = ensure_quota_limit(config.quota_limit, config.quota, gpus)
        if shared.active and shared.active_slots:
            logger.warning("%d of the %d slots of quota limit %r are taken: trials wait for them. Another sweep "
                           "holds them, or one that died: its slots come back within %.0f s.", shared.active_slots,
                           shared.limit, config.quota_limit, SLOT_LEASE_S + REPOSSESS_EVERY_S)
        capacity = depth = max_parallel_trials(shared.usable(config.quota), gpus, host, len(inputs.combinations))
    else:
        capacity = check_pool_limit(config.pool, config.quota)
        depth = 2 * capacity + 2  # enough flow runs waiting in the pool that a freed slot is taken at once
    if started is None:  # a deployment's flow run: it starts its own parent run, beats it and closes it on a crash
        started = engine.start_sweep(config, inputs, store)
        guard = engine.kept_alive(store, started)
    else:  # `hpsweep run` started it before Prefect and keeps it alive: a crash here closes it at once
        guard = engine.closed_on_crash(store, started.experiment_id, started.sweep_id, started.parent_run_id)
    with guard:
        opened = engine.open_sweep(config, inputs, store, capacity, depth,
                                   {"hpsweep.flow_run_id": str(flow_run.id)} if flow_run.id else {}, started)
        if opened.zombies:
            logger.warning("closed %d zombie run(s) left RUNNING by a dead process: %s", len(opened.zombies),
                           opened.zombies)
        where = (f"{gpus} GPU(s) per trial, host GPUs {list(host)}" if host else
                 "CPU only: no GPU on this host" if local else f"{gpus} GPU(s) per trial on pool {config.pool}")
        logger.info("sweep %s: %d combinations, %s, %d at once (quota %d; %s), %s", opened.run.sweep_id,
                    len(opened.trials), describe_reuse(len(opened.to_train), len(opened.reused),
                                                       opened.why_not_reused),
                    opened.parallel, config.quota, where, opened.order)
        launcher = _launcher(config, opened)
        trials = SweepEngine(
            opened.run, launcher, RetryPolicy(config.max_attempts, config.retry_delay_s),
            callbacks=[LogCallback(logger), *observers()], gpu_pool=GpuPool(host),
            hold_slot=(lambda: hold_quota_slot(config.quota_limit, gpus, flow_run.id, stop.event)) if local
            else nullcontext,
            run_attempt=lambda job, gpu_ids: trial_attempt(job, gpu_ids, quote(launcher)), stop=stop,
            max_failures=config.max_failures)
        with engine.early_stopper(store, opened):
            trials.run(opened.to_train, opened.parallel)
        if stop.requested:
            logger.warning("stopped by %s: reporting what finished", stop.signal_name)
        return engine.close_sweep(opened, store, config.report_dir, [PrefectArtifacts(), *observers()],
                                  register=config.register, stopped_by=stop.signal_name or None,
                                  never_started_reason=f"NOT STARTED (stopped after {trials.failed} failures)"
                                  if trials.stopped_after_failures else None)


def _launcher(config: SweepConfig, opened: engine.OpenedSweep) -> TrialLauncher:
    if config.launcher == "pool":
        return PoolLauncher(config.trial_deployment, salt=opened.run.sweep_id if config.retrain else "")
    entry_module = (opened.run.entrypoint or "").partition(":")[0]
    return LocalLauncher(preload=[entry_module] if entry_module else [])
