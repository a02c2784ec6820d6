"""One sweep execution around the controller: start it (its parent run, STARTING, before anything
slow), open it (keys, reuse, zombies, dispatch order, the parent run's tags and its plan.json), run
its trials, close it (report, champion, the parent run's end).

Prefect-free: the `sweep` flow supplies the quota slot, the attempt wrapper and its callbacks.
Rerunning the same sweep after any crash is the resume mechanism: FINISHED trials are reused by key.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

from hpsweep import plan
from hpsweep.config import SweepConfig, early_stop_rule
from hpsweep.engine.early_stop import EarlyStopRule
from hpsweep.engine.stopper import EarlyStopper
from hpsweep.dvcdata import data_ref
from hpsweep.engine.callbacks import Callbacks, SweepCallback
from hpsweep.engine.controller import SweepRun
from hpsweep.inputs import SweepInputError, SweepInputs, resolved_interpreter
from hpsweep.model import HEARTBEAT_S, ZOMBIE_AFTER_S, PlannedTrial, TrialRow, TrialState
from hpsweep.periodic import Periodic
from hpsweep.report import assemble, folders
from hpsweep.store import SweepStore, grants
from hpsweep.store.runs import setting_params
from hpsweep.store.tags import (TAG_DISPATCH, TAG_EARLY_STOP, TAG_GIT_COMMIT, TAG_GPUS_PER_TRIAL, TAG_INTERPRETER,
                                TAG_METRIC, TAG_QUOTA, TAG_SETTINGS, TAG_SPEC_HASH, TAG_STATUS, TAG_TIE_BREAK)
from hpsweep.versions import code_manifest_tag, git_commit

log = logging.getLogger("hpsweep")


@dataclass(frozen=True)
class OpenedSweep:
    """A sweep whose parent run exists and whose trials are planned, in the order to start them."""

    run: SweepRun
    trials: list[PlannedTrial]  # every combination, file order
    reused: dict[str, TrialRow]  # trial key → the FINISHED run standing in for it
    to_train: list[PlannedTrial]  # dispatch order
    parallel: int  # workers (trials in flight at once, a pool's queue included)
    slots: int  # trials that actually run at once
    order: str  # how to_train is ordered, in words
    provenance: dict[str, str]  # versions, git commit, quota: the parent run's tags and the report's header
    zombies: list[str]  # runs of dead processes closed on the way
    why_not_reused: str | None = None  # what changed since the experiment's last trials, when anything did
    early_stop: EarlyStopRule = EarlyStopRule()  # the rule stopping hopeless trials ("none": off)


class StartedSweep(BaseModel):
    """A sweep execution whose parent run exists, STARTING (``start_sweep``): what `hpsweep run`
    hands the `sweep` flow, which opens that same run (a flow parameter: data only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    experiment_id: str
    sweep_id: str
    parent_run_id: str


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def sweep_name(config: SweepConfig, inputs: SweepInputs) -> str:
    return config.name or inputs.spec.name or config.spec.stem


def start_sweep(config: SweepConfig, inputs: SweepInputs, store: SweepStore) -> StartedSweep:
    """The sweep's parent run, STARTING: written first, so that `hpsweep status` sees the sweep from
    its first second (Prefect's start-up and the planning take seconds to minutes). Whoever starts
    it keeps it beating (``parent_heartbeat``) until the sweep ends."""
    name = sweep_name(config, inputs)
    experiment_id = store.ensure_experiment(name)
    sweep_id = new_sweep_id(name)
    parent_run_id = store.start_parent_run(experiment_id, sweep_id, {TAG_STATUS: "STARTING"})
    return StartedSweep(name=name, experiment_id=experiment_id, sweep_id=sweep_id, parent_run_id=parent_run_id)


def open_sweep(config: SweepConfig, inputs: SweepInputs, store: SweepStore, capacity: int, queue_depth: int,
               tags: dict[str, str] | None = None, started: StartedSweep | None = None) -> OpenedSweep:
    """Plan the sweep and describe its parent run (``started``'s, else one started now), which moves
    STARTING → RUNNING. ``capacity``: trials that can run at once (quota, host or pool limit);
    ``queue_depth``: trials kept in flight (a pool's queue: more than run)."""
    started = started or start_sweep(config, inputs, store)
    name, experiment_id, sweep_id, parent_run_id = (started.name, started.experiment_id, started.sweep_id,
                                                    started.parent_run_id)
    with closed_on_crash(store, experiment_id, sweep_id, parent_run_id):
        trials, versions = plan.plan_trials(inputs)
        grants.grant_trainer(store.tracking_uri, experiment_id)  # its trials write as the trainer account
        zombies = store.reap_zombies(experiment_id, ZOMBIE_AFTER_S)
        reused = plan.reusable_runs(store, experiment_id, trials, versions, config.retrain)
        why = plan.why_not_reused(store, experiment_id, inputs.spec, versions, config.retrain)
        to_train = plan.trials_to_train(trials, reused)
        resumable = store.unfinished_trial_keys(experiment_id, {t.key for t in to_train}, versions)
        slots = max(1, min(len(to_train), capacity))
        parallel = max(1, min(len(to_train), queue_depth))
        rule = early_stop_rule(config, dict(inputs.spec.settings))
        to_train, estimates, order = _dispatch(store, experiment_id, inputs, versions, to_train, slots, rule.enabled)

        provenance = {**versions, TAG_GIT_COMMIT: git_commit(), TAG_QUOTA: str(config.quota),
                      TAG_SETTINGS: json.dumps(dict(inputs.spec.settings), sort_keys=True, default=str),
                      TAG_GPUS_PER_TRIAL: str(inputs.spec.resources.gpus),
                      TAG_METRIC: json.dumps(inputs.spec.metric.model_dump(mode="json"), sort_keys=True),
                      **({TAG_TIE_BREAK: config.tie_break} if config.tie_break else {})}
        if rule.enabled:  # the report's header names it and estimates the GPU-hours it saved
            provenance[TAG_EARLY_STOP] = json.dumps(asdict(rule), sort_keys=True)
        data_refs = {"train": data_ref(inputs.train).as_dict(), "val": data_ref(inputs.val).as_dict()}
        gpus = inputs.spec.resources.gpus
        store.describe_parent_run(
            parent_run_id, {**provenance, TAG_DISPATCH: order, **(tags or {}),
                            TAG_INTERPRETER: resolved_interpreter(inputs.spec) or ""},
            params={"combinations": config.combinations, "spec": config.spec, "train": config.train,
                    "val": config.val, "quota": config.quota, "gpus_per_trial": gpus, "trials": len(trials),
                    "reused": len(reused), "max_attempts": config.max_attempts, "slots": slots,
                    **setting_params(inputs.spec.settings)})
        store.log_plan(parent_run_id, plan.plan_rows(trials, reused, to_train, estimates))
        # Last: `status` reads a RUNNING sweep's plan.json.
        store.describe_parent_run(parent_run_id, {TAG_STATUS: "RUNNING"}, params={})
    spec = inputs.spec
    run = SweepRun(
        sweep_id=sweep_id, name=name, experiment_id=experiment_id, parent_run_id=parent_run_id,
        tracking_uri=store.tracking_uri, work_dir=config.work_dir, settings=dict(spec.settings),
        train=str(inputs.train.resolve()), val=str(inputs.val.resolve()), entrypoint=spec.trainer.entrypoint,
        command=spec.trainer.command, time_limit_s=spec.time_limit_s, gpus=gpus,
        # The code manifest goes on trial runs only: a later plan names the files that changed.
        versions={**versions, TAG_GIT_COMMIT: provenance[TAG_GIT_COMMIT], **code_manifest_tag(inputs.spec)},
        data_refs=data_refs,
        resumable=frozenset(resumable),
        early_stop={"metric": rule.metric, "grace_s": config.early_stop_grace_s} if rule.enabled else None)
    return OpenedSweep(run, trials, reused, to_train, parallel, slots, order, provenance, zombies, why, rule)


def _dispatch(store: SweepStore, experiment_id: str, inputs: SweepInputs, versions: dict[str, str],
              to_train: list[PlannedTrial], slots: int, early_stop: bool
              ) -> tuple[list[PlannedTrial], list[plan.Estimate], str]:
    """The trials in the order to start them, their estimates, and that order in words.

    The order only matters when trials wait for a slot; only then is the duration history read.
    """
    waits = len(to_train) > slots
    history = plan.duration_history(store, experiment_id, versions[TAG_SPEC_HASH]) if waits \
        else plan.DurationHistory()
    estimates = plan.estimate_durations(to_train, inputs.spec.expected_duration_s, history)
    if not waits:
        return to_train, estimates, f"{plan.FILE_ORDER} (every trial starts at once)"
    ordered, ordered_est, order = plan.dispatch_order(to_train, estimates, early_stop)
    return ordered, ordered_est, plan.describe_order(order, ordered_est)


@contextmanager
def closed_on_crash(store: SweepStore, experiment_id: str, sweep_id: str, parent_run_id: str) -> Iterator[None]:
    """Whatever ends the sweep early (an error, Ctrl-C), its parent run and every trial run it left
    RUNNING are closed FAILED with the reason, so MLflow and `hpsweep status` never show a crashed
    sweep as running. The error itself goes on up."""
    try:
        yield
    except BaseException as e:
        _close_crashed(store, experiment_id, sweep_id, parent_run_id, e)
        raise


def _close_crashed(store: SweepStore, experiment_id: str, sweep_id: str, parent_run_id: str,
                   error: BaseException) -> None:
    reason = ("interrupted" if isinstance(error, KeyboardInterrupt)
              else f"hpsweep failed: {type(error).__name__}: {error}")
    try:
        closed = store.close_sweep_runs(experiment_id, sweep_id, parent_run_id, reason)
        if closed:  # none: an inner block closed them already
            log.warning("closed %d run(s) of sweep %s: %s", len(closed), sweep_id, reason)
    except Exception:  # noqa: BLE001 - never hide the original error behind the tracking store's
        log.warning("could not close the runs of sweep %s", sweep_id, exc_info=True)


@contextmanager
def kept_alive(store: SweepStore, started: StartedSweep) -> Iterator[None]:
    """Around a started sweep, from its start to its end: its parent run beats, so `status` and
    other sweeps know it is alive. An input error found late (once Prefect is up: a quota limit
    too small for a trial) deletes the run, since invalid input writes nothing (exit 2); anything
    else that ends it early closes it FAILED with the reason (``closed_on_crash``)."""
    with parent_heartbeat(store, started.parent_run_id):
        try:
            yield
        except SweepInputError:
            store.delete_parent_run(started.parent_run_id)
            raise
        except BaseException as e:
            _close_crashed(store, started.experiment_id, started.sweep_id, started.parent_run_id, e)
            raise


def parent_heartbeat(store: SweepStore, parent_run_id: str) -> Periodic:
    """Keeps the parent run visibly alive (so `status` does not call it not responding, and no other
    sweep reaps it as a zombie)."""
    return Periodic(HEARTBEAT_S, lambda: store.heartbeat(parent_run_id), "hpsweep-heartbeat")


def early_stopper(store: SweepStore, opened: OpenedSweep) -> AbstractContextManager[object]:
    """While trials run: the sweep's early-stopping rule, polled in the background (nothing when off)."""
    if not opened.early_stop.enabled:
        return nullcontext()
    return EarlyStopper(store, opened.early_stop, opened.run.experiment_id, opened.run.sweep_id,
                        [r.run_id for r in opened.reused.values()]).periodic()


def close_sweep(opened: OpenedSweep, store: SweepStore, report_dir: Path | None,
                callbacks: list[SweepCallback] = (), register: bool = True,
                stopped_by: str | None = None, never_started_reason: str | None = None) -> dict[str, Any]:
    """Read the trials back from MLflow, rank them, register the champion, write the report, log it
    to the parent run and close that; then ``on_report`` callbacks. ``register``: let this sweep's best
    become the champion (if it beats it); False (``--no-register``) leaves the registry alone. Returns the sweep's summary.

    The trials' results are never lost to the report: ``leaderboard.json`` goes to the parent run
    before any local file, the local files are best-effort (a warning for each left out, the exit
    code still the trials'), and whatever fails here (the registry, the tracking store) closes the
    parent run FAILED with the reason before it goes on up.

    ``report_dir`` None: ``reports/<name>/<sweep_id>/``, and ``reports/<name>/latest`` then points at
    it (``hpsweep.report.folders``); given: the files go exactly there and ``latest`` is left alone.
    """
    run = opened.run
    explicit = report_dir is not None  # --report-dir / sweep.report_dir: exactly there, and no `latest`
    report_dir = report_dir or folders.sweep_report_dir(run.name, run.sweep_id)
    with closed_on_crash(store, run.experiment_id, run.sweep_id, run.parent_run_id):
        meta = assemble.sweep_meta(run.sweep_id, run.name, run.experiment_id, run.parent_run_id, run.tracking_uri,
                                   opened.provenance, opened.provenance.get(TAG_QUOTA))
        meta["interrupted"] = stopped_by  # trials it never started are INTERRUPTED, and the parent run KILLED
        if never_started_reason:  # e.g. --max-failures was reached
            meta["never_started_reason"] = never_started_reason
        rows, header, paths = assemble.build_report(store, meta, opened.trials, opened.reused, report_dir,
                                                    register=register, publish=_publisher(store, run.parent_run_id))
        summary = assemble.sweep_summary(header, rows, report_dir, paths)
        _log_significance(store, run.parent_run_id, header, rows)
        best = next((r for r in rows if r.has_f1), None)
        # Every file written, leaderboard.json again: a publish that failed gets a second chance here.
        store.finish_parent_run(run.parent_run_id, summary["counts"], best.f1 if best else None,
                                [str(p) for p in paths.values()], ok=summary["counts"]["failed"] == 0,
                                stopped_by=stopped_by, extra_metrics=assemble.gpu_hour_metrics(header))
    if assemble.LEADERBOARD_JSON not in paths:
        log.warning("the report of sweep %s is not in %s (see above); its leaderboard.json is on parent run %s in "
                    "MLflow (report/leaderboard.json), and `hpsweep report %s --report-dir DIR` writes it all again",
                    run.sweep_id, report_dir, run.parent_run_id, run.sweep_id)
    elif not explicit:
        assemble.show_as_latest(summary, report_dir)
    Callbacks(list(callbacks)).emit("on_report", header, rows)
    return summary


def _log_significance(store: SweepStore, parent_run_id: str, header: dict[str, Any], rows: list[TrialRow]) -> None:
    """This sweep's trial runs get their F1 interval (and the warning tag when their F1 disagrees with
    their predictions), the parent run the count tied with the best. Reused runs keep what their own
    sweep logged: the same predictions, seed and resamples give them the same interval."""
    significance = header.get("significance")
    if significance is None:
        return
    own = [r for r in rows if r.state is TrialState.FINISHED and r.significance is not None]
    mismatches = {r.run_id: f"the trainer reported F1 {r.f1!r}; its predictions give {r.significance.recomputed_f1!r} "
                            f"(metric average={significance['average']})" for r in own if r.f1_mismatch}
    store.log_significance(parent_run_id, {r.run_id: (r.significance.ci_low, r.significance.ci_high) for r in own},
                           mismatches, significance["tied_with_best_count"])


def _publisher(store: SweepStore, parent_run_id: str) -> assemble.Publish:
    """Logs a report file to the parent run; a failure is a warning: the local copy is logged again at the close."""
    def publish(name: str, text: str) -> None:
        try:
            store.log_report_text(parent_run_id, name, text)
        except Exception as e:  # noqa: BLE001 - the local report comes first; the close retries the upload
            log.warning("could not log %s to parent run %s yet (%s: %s); it is logged with the other report files",
                        name, parent_run_id, type(e).__name__, str(e)[:200])
    return publish
