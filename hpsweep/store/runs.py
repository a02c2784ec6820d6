"""hpsweep's runs in MLflow: one experiment per sweep name, a parent run per sweep execution, a
child run per trial. Every state a trial run moves to is checked against ``hpsweep.model``'s
transitions; every search pages and quotes what it is given.

Every write goes through an explicit ``MlflowClient`` (never the fluent API's global active run),
so trial threads cannot step on each other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpsweep.identity import identity_is_dead, process_identity
from hpsweep.model import (HEARTBEAT_S, Hparams, IllegalTransition, Outcome, TrialRow, TrialState, check_transition,
                           run_name)
from hpsweep.store.filters import all_of, run_id_in, tag_equals
from hpsweep.store.tags import (EXPERIMENT_KIND, MAX_TAG_LEN, RUNS_VIEW, TAG_ATTEMPT, TAG_ATTEMPT_LOG, TAG_DURATION,
                                TAG_F1_MISMATCH, TAG_HEARTBEAT, TAG_HEARTBEAT_S, TAG_HPARAMS, TAG_INDEX,
                                TAG_INTERRUPTED, TAG_OWNER, TAG_REASON, TAG_RETRYABLE, TAG_ROLE, TAG_SPEC_HASH,
                                TAG_STATUS, TAG_STOP_REQUEST, TAG_STOPPED_AT, TAG_SWEEP_ID, TAG_TRIAL_KEY,
                                SETTINGS_PARAM_PREFIX, int_tag)

MAX_PARAM_LEN = 6000
PAGE = 1000


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name)
        except MlflowException:  # another sweep created it a moment ago
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    for key, value in {**EXPERIMENT_KIND, **RUNS_VIEW}.items():
        client.set_experiment_tag(exp_id, key, value)
    return exp_id


def search(client: MlflowClient, experiment_ids: list[str], flt: str, order_by: list[str] | None = None,
           limit: int | None = None) -> Iterator[Run]:
    """Every run matching ``flt``, page by page (at most ``limit``)."""
    token, seen = None, 0
    while True:
        page = client.search_runs(experiment_ids, flt, order_by=order_by, page_token=token,
                                  max_results=PAGE if limit is None else min(PAGE, limit - seen))
        for run in page:
            yield run
        seen += len(page)
        token = page.token
        if not token or (limit is not None and seen >= limit):
            return


# ---------------------------------------------------------------- reading a run as a trial


def state_of(run: Run) -> TrialState:
    """A trial run's state, from MLflow's status and hpsweep's tags."""
    status = run.info.status
    if status in ("RUNNING", "SCHEDULED"):
        return TrialState.RUNNING
    if status == "FINISHED" and run.data.tags.get(TAG_STATUS) == "FINISHED" and "f1" in run.data.metrics:
        return TrialState.FINISHED
    if status == "KILLED" and run.data.tags.get(TAG_STATUS) == TrialState.STOPPED.value:
        return TrialState.STOPPED
    if status == "KILLED":
        return TrialState.INTERRUPTED if run.data.tags.get(TAG_INTERRUPTED) else TrialState.KILLED
    return TrialState.FAILED


def trial_row(run: Run) -> TrialRow:
    tags = run.data.tags
    return TrialRow(
        index=int(tags.get(TAG_INDEX, 0)), hparams=json.loads(tags.get(TAG_HPARAMS, "{}")), state=state_of(run),
        run_id=run.info.run_id, run_name=run.info.run_name, key=tags.get(TAG_TRIAL_KEY),
        f1=run.data.metrics.get("f1"), reason=tags.get(TAG_REASON), attempt=int(tags.get(TAG_ATTEMPT, 1)),
        duration_s=float(tags[TAG_DURATION]) if TAG_DURATION in tags else _run_wall_time(run),
        started_at=(run.info.start_time or 0) / 1000,
        heartbeat=float(tags[TAG_HEARTBEAT]) if TAG_HEARTBEAT in tags else None,
        stopped_at_step=int_tag(tags.get(TAG_STOPPED_AT)),
    )


def _run_wall_time(run: Run) -> float | None:
    """An ended run's wall time from MLflow's own clock (a run closed without hpsweep's duration tag)."""
    start, end = run.info.start_time, run.info.end_time
    return max(0.0, (end - start) / 1000) if start and end else None


def outcome_of(run: Run) -> Outcome:
    """A terminal trial run read back as an outcome (how a pool trial's result comes home)."""
    tags = run.data.tags
    end = (run.info.end_time or 0) / 1000
    start = end - float(tags.get(TAG_DURATION, 0) or 0)
    state = state_of(run)
    if state is TrialState.FINISHED:
        return Outcome(True, run.data.metrics["f1"], started_at=start, ended_at=end)
    if state is TrialState.STOPPED:
        return Outcome(False, run.data.metrics.get("f1"), tags.get(TAG_REASON), killed=True, stopped=True,
                       stopped_at_step=int_tag(tags.get(TAG_STOPPED_AT)), started_at=start, ended_at=end)
    return Outcome(False, None, tags.get(TAG_REASON) or f"run ended {run.info.status}",
                   retryable=tags.get(TAG_RETRYABLE) == "true", killed=run.info.status == "KILLED",
                   interrupted=bool(tags.get(TAG_INTERRUPTED)), started_at=start, ended_at=end)


# ---------------------------------------------------------------- writing: parent and trial runs


def start_parent_run(client: MlflowClient, exp_id: str, sweep_id: str, tags: dict[str, str]) -> str:
    """A sweep's parent run, owned by this process, which beats every HEARTBEAT_S (recorded on it, so
    that `status` can tell a silent sweep by the sweep's own interval)."""
    run = client.create_run(exp_id, run_name=f"sweep {sweep_id}",
                            tags={TAG_SWEEP_ID: sweep_id, TAG_ROLE: "sweep", TAG_OWNER: process_identity(),
                                  TAG_HEARTBEAT: f"{time.time():.0f}", TAG_HEARTBEAT_S: f"{HEARTBEAT_S:g}", **tags})
    return run.info.run_id


def describe_parent_run(client: MlflowClient, parent_run_id: str, tags: dict[str, str],
                        params: dict[str, Any]) -> None:
    """The tags and params of a parent run started before its sweep was planned (each param is
    logged once: MLflow refuses to change one)."""
    client.log_batch(parent_run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def setting_params(settings: dict[str, Any]) -> dict[str, Any]:
    """The spec's settings as MLflow params, prefixed so they can never collide with an hparam."""
    return {f"{SETTINGS_PARAM_PREFIX}{k}": v for k, v in settings.items()}


def start_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, sweep_id: str, index: int,
                    hparams: Hparams, trial_key: str, attempt: int, tags: dict[str, str],
                    settings: dict[str, Any] | None = None) -> str:
    """A new trial run (``create_trial_run``) with its params (``log_trial_params``)."""
    run_id = create_trial_run(client, exp_id, parent_run_id, sweep_id, index, hparams, trial_key, attempt, tags)
    log_trial_params(client, run_id, hparams, settings)
    return run_id


def create_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, sweep_id: str, index: int,
                     hparams: Hparams, trial_key: str, attempt: int, tags: dict[str, str]) -> str:
    """A new trial run, RUNNING, created with all its tags in one write."""
    run = client.create_run(exp_id, run_name=run_name(hparams), tags={
        "mlflow.parentRunId": parent_run_id, TAG_SWEEP_ID: sweep_id, TAG_ROLE: "trial", TAG_TRIAL_KEY: trial_key,
        TAG_HPARAMS: json.dumps(hparams), TAG_INDEX: str(index), TAG_ATTEMPT: str(attempt),
        TAG_STATUS: TrialState.RUNNING.value, TAG_OWNER: process_identity(), TAG_HEARTBEAT: f"{time.time():.0f}",
        **tags})
    return run.info.run_id


def open_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, sweep_id: str, index: int,
                   hparams: Hparams, trial_key: str, attempt: int, tags: dict[str, str],
                   look_first: bool = True) -> str:
    """The attempt's trial run (``create_trial_run``), made once. Idempotent, so safe to retry: a run
    an earlier call created (its answer lost to a timeout after the server made it) is found by
    (sweep id, trial key, attempt) and returned, never created a second time. ``look_first=False``
    skips the search when no earlier call can have made it (a search per trial costs S2's overhead)."""
    existing = find_trial_run(client, exp_id, sweep_id, trial_key, attempt) if look_first else None
    if existing is not None:
        return existing
    return create_trial_run(client, exp_id, parent_run_id, sweep_id, index, hparams, trial_key, attempt, tags)


def find_trial_run(client: MlflowClient, exp_id: str, sweep_id: str, trial_key: str, attempt: int) -> str | None:
    """The run of this sweep's attempt ``attempt`` at trial ``trial_key``, if one exists."""
    flt = all_of(tag_equals(TAG_SWEEP_ID, sweep_id), tag_equals(TAG_ROLE, "trial"),
                 tag_equals(TAG_TRIAL_KEY, trial_key), tag_equals(TAG_ATTEMPT, str(attempt)))
    run = next(search(client, [exp_id], flt, limit=1), None)
    return run.info.run_id if run is not None else None


def log_trial_params(client: MlflowClient, run_id: str, hparams: Hparams,
                     settings: dict[str, Any] | None = None) -> None:
    """The hparams and the spec's settings (``settings.<name>``) as the run's params. Idempotent
    (MLflow accepts a param logged again with the same value)."""
    params = {**hparams, **setting_params(settings or {})}
    client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()])


def _move(client: MlflowClient, run_id: str, new: TrialState) -> Run:
    """The run, after checking that its trial may move to ``new`` (IllegalTransition if not)."""
    run = client.get_run(run_id)
    check_transition(state_of(run), new, f"trial run {run_id}")
    return run


def finish_trial_run(client: MlflowClient, run_id: str, outcome: Outcome, log_path: Path | None = None) -> None:
    """RUNNING → FINISHED, FAILED, KILLED or STOPPED, with the trial log. The F1 is stored before the
    status: a FINISHED run always has one (a STOPPED one has its best reported value, when it reported)."""
    _move(client, run_id, outcome.state)
    if log_path is not None and log_path.is_file():
        client.log_artifact(run_id, str(log_path))
    status_tag = "FINISHED" if outcome.ok else TrialState.STOPPED.value if outcome.stopped else "FAILED"
    tags = [RunTag(TAG_STATUS, status_tag), RunTag(TAG_DURATION, f"{outcome.duration_s:.3f}")]
    if outcome.reason:
        tags.append(RunTag(TAG_REASON, outcome.reason[:MAX_TAG_LEN]))
    if not outcome.ok:
        tags.append(RunTag(TAG_RETRYABLE, str(outcome.retryable).lower()))
    if outcome.interrupted:
        tags.append(RunTag(TAG_INTERRUPTED, "true"))
    if outcome.stopped and outcome.stopped_at_step is not None:
        tags.append(RunTag(TAG_STOPPED_AT, str(outcome.stopped_at_step)))
    metrics = [Metric("f1", outcome.f1, int(time.time() * 1000), 0)] if outcome.f1 is not None else []
    client.log_batch(run_id, metrics=metrics, tags=tags)
    # MLflow has neither INTERRUPTED nor STOPPED: such a run is KILLED, and its tags say why.
    status = "KILLED" if outcome.state in (TrialState.INTERRUPTED, TrialState.STOPPED) else outcome.state.value
    client.set_terminated(run_id, status, end_time=int(outcome.ended_at * 1000) or None)


def reopen_trial_run(client: MlflowClient, run_id: str, attempt: int) -> None:
    """FAILED/KILLED → RUNNING for attempt ``attempt``, in the same run (one run per combination, its
    metric history continuing across attempts); the attempt log keeps why the last one failed.
    A FINISHED run is never reopened (IllegalTransition)."""
    run = _move(client, run_id, TrialState.RUNNING)
    tags = run.data.tags
    line = f"attempt {attempt - 1}: {tags.get(TAG_REASON)}"
    log = (tags.get(TAG_ATTEMPT_LOG, "") + "\n" + line).strip()[-MAX_TAG_LEN:]
    set_tags(client, run_id, {TAG_ATTEMPT: str(attempt), TAG_STATUS: "RUNNING", TAG_ATTEMPT_LOG: log,
                              TAG_OWNER: process_identity(), TAG_HEARTBEAT: f"{time.time():.0f}"})
    client.update_run(run_id, status="RUNNING")


def mark_failed(client: MlflowClient, run_id: str, reason: str | None, killed: bool = False,
                retryable: bool | None = None) -> None:
    """RUNNING → FAILED (or KILLED) with a reason, for a trial whose outcome could not be stored;
    with ``retryable`` recorded when given (a pool reads the outcome back from the run)."""
    state = TrialState.KILLED if killed else TrialState.FAILED
    _move(client, run_id, state)
    tags = [RunTag(TAG_STATUS, "FAILED"), RunTag(TAG_REASON, (reason or "unknown")[:MAX_TAG_LEN])]
    if retryable is not None:
        tags.append(RunTag(TAG_RETRYABLE, str(retryable).lower()))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, state.value)


def close_sweep_runs(client: MlflowClient, exp_id: str, sweep_id: str, parent_run_id: str, reason: str) -> list[str]:
    """Close what a sweep that crashed left open: each of its RUNNING trial runs becomes FAILED (a checked
    transition) and its parent run FAILED, all with ``reason`` as `hpsweep.reason` (so `hpsweep status`
    says it crashed, and why). A run that ended meanwhile keeps its end. Returns the run ids closed."""
    closed = []
    flt = all_of(tag_equals(TAG_SWEEP_ID, sweep_id), tag_equals(TAG_ROLE, "trial"), "attributes.status = 'RUNNING'")
    for run in list(search(client, [exp_id], flt)):  # every page first: closing shifts a RUNNING-only search
        try:
            mark_failed(client, run.info.run_id, reason)
        except IllegalTransition:  # it finished between the search and now
            continue
        closed.append(run.info.run_id)
    if client.get_run(parent_run_id).info.status == "RUNNING":
        client.log_batch(parent_run_id, tags=[RunTag(TAG_REASON, reason[:MAX_TAG_LEN]), RunTag(TAG_STATUS, "FAILED")])
        client.set_terminated(parent_run_id, "FAILED")
        closed.append(parent_run_id)
    return closed


def request_stop(client: MlflowClient, run_id: str, step: int, reason: str) -> None:
    """The sweep's early-stopping decision on a running trial run: the trial's host polls for it
    (``stop_request``), tells the trainer (its stop file) and ends it after the grace."""
    client.log_batch(run_id, tags=[RunTag(TAG_STOPPED_AT, str(step)), RunTag(TAG_STOP_REQUEST, reason[:MAX_TAG_LEN])])


def stop_request(client: MlflowClient, run_id: str) -> tuple[int, str] | None:
    """(step, reason) when the sweep asked this trial run to stop, else None."""
    tags = client.get_run(run_id).data.tags
    if TAG_STOP_REQUEST not in tags:
        return None
    return int_tag(tags.get(TAG_STOPPED_AT)) or 0, tags[TAG_STOP_REQUEST]


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def heartbeat(client: MlflowClient, run_id: str) -> None:
    client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")


def reap_zombies(client: MlflowClient, exp_id: str, stale_after_s: float) -> list[str]:
    """Close runs left RUNNING by a process that died without reporting.

    A run is a zombie when its owner process is known dead (same host) or its heartbeat is older
    than ``stale_after_s`` (any host). It becomes KILLED with the reason, so the MLflow UI and
    reports stop showing it as running, and its trial is trained again (resuming its checkpoints).
    """
    reaped, now = [], time.time()
    # Read every page before closing any run: closing shifts the pages of a RUNNING-only search.
    for run in list(search(client, [exp_id], "attributes.status = 'RUNNING'")):
        tags = run.data.tags
        if TAG_ROLE not in tags:
            continue
        last_seen = float(tags.get(TAG_HEARTBEAT, run.info.start_time / 1000))
        dead = identity_is_dead(tags.get(TAG_OWNER))
        if not dead and now - last_seen <= stale_after_s:
            continue
        why = "its process died" if dead else f"no heartbeat for {now - last_seen:.0f}s"
        client.log_batch(run.info.run_id, tags=[RunTag(TAG_STATUS, "FAILED"), RunTag(
            TAG_REASON, f"zombie: {why} without reporting (host lost or orchestrator killed); closed by a later sweep")])
        client.set_terminated(run.info.run_id, TrialState.KILLED.value)
        reaped.append(run.info.run_id)
    return reaped


# ---------------------------------------------------------------- reading: a sweep's trials


def sweep_trials(client: MlflowClient, exp_id: str, sweep_id: str) -> list[TrialRow]:
    """The sweep's trial runs, one row per run."""
    flt = all_of(tag_equals(TAG_SWEEP_ID, sweep_id), tag_equals(TAG_ROLE, "trial"))
    return [trial_row(run) for run in search(client, [exp_id], flt)]


def trials_by_run_id(client: MlflowClient, exp_id: str, run_ids: list[str]) -> dict[str, TrialRow]:
    """Trial rows for the given run ids (one search per 100 ids, not one request per run)."""
    found: dict[str, TrialRow] = {}
    for i in range(0, len(run_ids), 100):
        for run in search(client, [exp_id], run_id_in(run_ids[i:i + 100])):
            found[run.info.run_id] = trial_row(run)
    return found


def _trial_runs(client: MlflowClient, exp_id: str, flt: str, versions: dict[str, str] | None) -> Iterator[Run]:
    """Trial runs matching ``flt``, newest first. ``versions`` (spec hash, data and code versions,
    which every trial key includes) narrow the search to runs that could match a key."""
    clauses = [tag_equals(TAG_ROLE, "trial"), flt, *(tag_equals(t, v) for t, v in (versions or {}).items())]
    return search(client, [exp_id], all_of(*clauses), order_by=["attributes.start_time DESC"])


def finished_trials_by_key(client: MlflowClient, exp_id: str, keys: set[str],
                           versions: dict[str, str] | None = None) -> dict[str, TrialRow]:
    """The newest FINISHED trial run (with its F1 stored) for each of ``keys`` in the experiment."""
    found: dict[str, TrialRow] = {}
    flt = f"{tag_equals(TAG_STATUS, 'FINISHED')} and attributes.status = 'FINISHED'"
    for run in _trial_runs(client, exp_id, flt, versions):
        key = run.data.tags.get(TAG_TRIAL_KEY)
        if key in keys and key not in found and "f1" in run.data.metrics:
            found[key] = trial_row(run)
    return found


def unfinished_trial_keys(client: MlflowClient, exp_id: str, keys: set[str],
                          versions: dict[str, str] | None = None) -> set[str]:
    """Those of ``keys`` with a trial run that did not finish (killed, failed, a reaped zombie):
    the only runs whose checkpoints a new attempt should resume from."""
    runs = _trial_runs(client, exp_id, "attributes.status != 'FINISHED'", versions)
    return {key for key in (run.data.tags.get(TAG_TRIAL_KEY) for run in runs) if key in keys}


def finished_trial_durations(client: MlflowClient, exp_id: str, spec_hash: str | None = None,
                             limit: int = 1000) -> list[tuple[Hparams, float]]:
    """(hparams, measured duration) of the newest ``limit`` FINISHED trials of the experiment, newest
    first; only those trained under ``spec_hash`` when given."""
    flt = all_of(tag_equals(TAG_ROLE, "trial"), tag_equals(TAG_STATUS, "FINISHED"), "attributes.status = 'FINISHED'",
                 tag_equals(TAG_SPEC_HASH, spec_hash) if spec_hash else None)
    runs = search(client, [exp_id], flt, order_by=["attributes.start_time DESC"], limit=limit)
    return [(json.loads(r.data.tags.get(TAG_HPARAMS, "{}")), float(r.data.tags[TAG_DURATION]))
            for r in runs if TAG_DURATION in r.data.tags]


def latest_trial_tags(client: MlflowClient, exp_id: str, names: list[str]) -> dict[str, str] | None:
    """Those of tags ``names`` that the experiment's newest FINISHED trial run has (the versions a new
    sweep compares with, to say why nothing is reused); None when it has no finished trial."""
    flt = all_of(tag_equals(TAG_ROLE, "trial"), tag_equals(TAG_STATUS, "FINISHED"), "attributes.status = 'FINISHED'")
    run = next(search(client, [exp_id], flt, order_by=["attributes.start_time DESC"], limit=1), None)
    return None if run is None else {n: run.data.tags[n] for n in names if n in run.data.tags}


def latest_parent_run(client: MlflowClient, experiment_ids: list[str], sweep_id: str | None = None) -> Run | None:
    """The newest parent run of the experiments (of ``sweep_id`` when given)."""
    flt = all_of(tag_equals(TAG_ROLE, "sweep"), tag_equals(TAG_SWEEP_ID, sweep_id) if sweep_id else None)
    return next(search(client, experiment_ids, flt, order_by=["attributes.start_time DESC"], limit=1), None)


def parent_runs(client: MlflowClient, experiment_ids: list[str], limit: int) -> list[Run]:
    """The newest ``limit`` parent runs (sweep executions) of the experiments, newest first."""
    return list(search(client, experiment_ids, tag_equals(TAG_ROLE, "sweep"),
                       order_by=["attributes.start_time DESC"], limit=limit))


def experiment_names(client: MlflowClient) -> dict[str, str]:
    """experiment id → name of every active experiment, page by page."""
    names: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(max_results=PAGE, page_token=token)
        names.update((e.experiment_id, e.name) for e in page)
        token = page.token
        if not token:
            return names


def checkpoint_runs(client: MlflowClient, exp_id: str, trial_key: str, limit: int = 20) -> list[Run]:
    """The newest unfinished runs of a trial: where a new attempt looks for checkpoints to resume."""
    flt = all_of(tag_equals(TAG_TRIAL_KEY, trial_key), "attributes.status != 'FINISHED'")
    return list(search(client, [exp_id], flt, order_by=["attributes.start_time DESC"], limit=limit))



# ---------------------------------------------------------------- the parent run's files and end

PLAN_FILE = "plan.json"


def log_plan(client: MlflowClient, parent_run_id: str, rows: list[TrialRow]) -> None:
    """Every trial, its estimate and its turn: what `hpsweep status` and `hpsweep report` read back."""
    client.log_text(parent_run_id, json.dumps([r.plan_entry() for r in rows], indent=1), PLAN_FILE)


def load_plan(client: MlflowClient, parent_run_id: str) -> list[TrialRow] | None:
    """The sweep's plan.json; None when it is missing (an older sweep) or unreadable."""
    import mlflow.artifacts

    try:
        text = mlflow.artifacts.load_text(f"{client.get_run(parent_run_id).info.artifact_uri}/{PLAN_FILE}")
        return [TrialRow.from_plan_entry(entry) for entry in json.loads(text)]
    except (MlflowException, OSError, ValueError, KeyError):  # status degrades to counts
        return None


def metric_history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """[(step, value)] ascending; a step logged twice (a resumed retry) keeps its latest value; a run
    that no longer exists has none. Other tracking errors propagate."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        history = client.get_metric_history(run_id, metric)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        history = []
    latest: dict[int, float] = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        latest[int(m.step)] = float(m.value)
    return sorted(latest.items())


def finish_parent_run(client: MlflowClient, parent_run_id: str, counts: dict[str, int], best_f1: float | None,
                      files: list[str], ok: bool, stopped_by: str | None = None,
                      extra_metrics: dict[str, float] | None = None) -> None:
    """Log the report files and the counts to the parent run, then close it: KILLED (tagged with the
    signal) when ``stopped_by`` a signal, else FINISHED, or FAILED when ``ok`` is False."""
    for path in files:
        client.log_artifact(parent_run_id, path, "report")
    metrics = [Metric(f"trials_{k}", v, int(time.time() * 1000), 0) for k, v in counts.items()]
    if best_f1 is not None:
        metrics.append(Metric("best_f1", best_f1, int(time.time() * 1000), 0))
    metrics += [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in (extra_metrics or {}).items()]
    status = "KILLED" if stopped_by else "FINISHED" if ok else "FAILED"
    tags = [RunTag(TAG_INTERRUPTED, stopped_by), RunTag(TAG_REASON, interrupted_note(stopped_by))] if stopped_by else []
    client.log_batch(parent_run_id, metrics=metrics, tags=[*tags, RunTag(TAG_STATUS, status)])
    client.set_terminated(parent_run_id, status)


def log_significance(client: MlflowClient, parent_run_id: str, intervals: dict[str, tuple[float, float]],
                     mismatches: dict[str, str], tied_with_best_count: int) -> None:
    """Each trial run's F1 interval (metrics), the warning tag on trials whose F1 disagrees with their
    predictions, and the parent run's count of trials tied with the best."""
    now = int(time.time() * 1000)
    for run_id, (low, high) in intervals.items():
        tags = [RunTag(TAG_F1_MISMATCH, mismatches[run_id][:MAX_TAG_LEN])] if run_id in mismatches else []
        client.log_batch(run_id, metrics=[Metric("f1_ci_low", low, now, 0), Metric("f1_ci_high", high, now, 0)],
                         tags=tags)
    client.log_batch(parent_run_id, metrics=[Metric("tied_with_best_count", tied_with_best_count, now, 0)])


def interrupted_note(signal_name: str) -> str:
    return f"interrupted by {signal_name}: what finished is reported; a rerun trains the rest"
