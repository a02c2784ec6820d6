"""Where a sweep stands, read from MLflow (and Prefect when its API is reachable): what is
running, done, failed, queued, and an ETA. Works on a sweep running in another terminal (the
embedded SQLite store is in WAL mode: readers never block the sweep's writes) and on past sweeps.

``summarize`` is pure over ``TrialRow``s; the reads go through ``hpsweep.store``.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from hpsweep.model import HEARTBEAT_S, TrialRow, TrialState, run_name
from hpsweep.plan import list_schedule

if TYPE_CHECKING:
    from mlflow.entities import Run

    from hpsweep.store import SweepStore
# hpsweep.store (so MLflow) is imported where needed: `hpsweep plan` with no store never pays for it.

PARENT_STATES = {"FINISHED": "finished", "FAILED": "finished with failures", "KILLED": "killed"}
# A KILLED parent run with a `hpsweep.interrupted` tag was stopped by a signal: "interrupted (SIGINT)".
# A FAILED parent run with a `hpsweep.reason` tag is a sweep that crashed: "crashed: <reason>".
# The words `hpsweep status` shows for each trial state (a RUNNING trial with no recent heartbeat is "stale").
INTERRUPTED = "interrupted"  # counted only in a sweep stopped by a signal: other sweeps' counts keep their keys
STATE_WORDS = {TrialState.PLANNED: "queued", TrialState.RUNNING: "running", TrialState.FINISHED: "done",
               TrialState.FAILED: "failed", TrialState.KILLED: "failed", TrialState.REUSED: "reused",
               TrialState.NEVER_STARTED: "never started", TrialState.INTERRUPTED: INTERRUPTED,
               TrialState.STOPPED: "stopped"}
OPTIONAL_WORDS = (INTERRUPTED, "stopped")  # counted only when some trial is: other sweeps' counts keep their keys
STALE = "stale"
STARTING = "starting"  # the parent run exists; Prefect and the trial plan are not ready yet
# A sweep's parent run beats every heartbeat interval from its first second; silent for this many
# intervals, its process is taken for dead (a kill -9, a lost host).
SILENT_BEATS = 2
WORDS = ("running", STALE, "queued", "done", "failed", "reused", "never started")  # the order of the counts


class SweepNotFound(Exception):
    """No such sweep (or no MLflow store at all): the user named something that is not there."""


@dataclass(frozen=True)
class SweepRecord:
    """A sweep execution as MLflow holds it: its experiment, its parent run's tags and params."""

    name: str
    experiment_id: str
    sweep_id: str
    parent_run_id: str
    parent_status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    started_at: float
    ended_at: float | None
    tags: dict[str, str]
    params: dict[str, str]


# ---------------------------------------------------------------- reads


def existing_tracking_uri(explicit: str | None) -> str:
    """The tracking URI a sweep here would use, refusing to create an empty SQLite store to read from."""
    from hpsweep.store.uri import credentials_to_environment

    uri = credentials_to_environment(explicit) or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SweepNotFound(f"no MLflow store at {uri.removeprefix('sqlite:///')} (no sweep has run here; "
                            "set MLFLOW_TRACKING_URI or --tracking-uri)")
    from hpsweep import store

    return store.resolve_tracking_uri(uri)


def find_sweep(store: SweepStore, sweep: str) -> SweepRecord:
    """``sweep`` is a sweep name (its latest execution) or a sweep id. Either is quoted into the
    search, so a quote in it can neither break nor widen the query."""
    from hpsweep.store import redact_uri

    where = redact_uri(store.tracking_uri)
    exp_id = store.experiment_id(sweep)
    if exp_id is not None:
        run = store.latest_parent_run([exp_id])
        if run is None:
            raise SweepNotFound(f"sweep '{sweep}' has no executions in {where}")
        return _record(sweep, run)
    # A sweep id is '<name>-<date>-<time>-<hex>': try its experiment first, then every experiment.
    guess = sweep.rsplit("-", 3)[0] if sweep.count("-") >= 3 else None
    guess_id = store.experiment_id(guess) if guess else None
    names = {guess_id: guess} if guess_id is not None else store.experiment_names()
    ids = list(names)
    for i in range(0, len(ids), 100):
        try:
            run = store.latest_parent_run(ids[i:i + 100], sweep_id=sweep)
        except ValueError:  # both kinds of quote: MLflow cannot search for it, and no sweep id has them
            break
        if run is not None:
            return _record(names[run.info.experiment_id], run)
    raise SweepNotFound(f"no sweep named or with id '{sweep}' in {where}")


def _record(name: str, run: Run) -> SweepRecord:
    from hpsweep.store import TAG_SWEEP_ID

    info = run.info
    return SweepRecord(name=name, experiment_id=info.experiment_id, sweep_id=run.data.tags[TAG_SWEEP_ID],
                       parent_run_id=info.run_id, parent_status=info.status, started_at=info.start_time / 1000,
                       ended_at=info.end_time / 1000 if info.end_time else None, tags=dict(run.data.tags),
                       params=dict(run.data.params))


def prefect_state(flow_run_id: str | None, api_url: str | None = None, timeout_s: float = 3.0) -> str:
    """The flow run's state name from the Prefect API (Prefect's own client, one try of at most
    ``timeout_s``), or why it is not known. Never raises: MLflow still answers when Prefect does not."""
    if not flow_run_id:
        return "unknown (the sweep recorded no flow run)"
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectException
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    api_url = api_url or PREFECT_API_URL.value()
    if not api_url:  # never let the client start a temporary API of its own
        return "unknown (PREFECT_API_URL not set and no local Prefect server running)"
    try:
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_CLIENT_MAX_RETRIES: 0}), \
                get_client(httpx_settings={"timeout": timeout_s}, sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except (httpx.HTTPError, PrefectException, OSError, ValueError, RuntimeError) as e:
        return f"unknown (Prefect API at {api_url} not reachable: {type(e).__name__})"
    if state is None:
        return "unknown"
    return str(state.name or state.type.value)


# ---------------------------------------------------------------- the summary (pure)


def trial_word(plan: TrialRow, run: TrialRow | None, over: bool, now: float, stale_after_s: float) -> str:
    """What `hpsweep status` calls a trial: its run's state (a silent RUNNING one is "stale"), else
    its plan's (queued, or never started once the sweep is over)."""
    if run is None:
        state = plan.state
        if state is TrialState.PLANNED and over:
            state = TrialState.NEVER_STARTED
    else:
        state = run.state
    if state is TrialState.RUNNING and run is not None:
        beat = run.heartbeat or run.started_at or now
        if now - beat > stale_after_s:
            return STALE
    return STATE_WORDS[state]


def summarize(record: SweepRecord, plan: list[TrialRow] | None, runs: list[TrialRow],
              now: float, stale_after_s: float, prefect: str | None = None) -> dict[str, Any]:
    """Counts, one line per trial and an ETA. ``plan``: the sweep's plan.json (``store.load_plan``;
    None for an older sweep: its runs alone); ``runs``: its trial runs (``store.sweep_trials``).
    ``stale_after_s``: a trial silent this long is stale; the sweep itself is "not responding"
    after SILENT_BEATS of its own heartbeat intervals (the parent run's ``hpsweep.heartbeat_s``)."""
    from hpsweep.store import TAG_DISPATCH, TAG_HEARTBEAT, TAG_HEARTBEAT_S, TAG_INTERRUPTED, TAG_REASON, TAG_STATUS

    by_index = {r.index: r for r in runs}
    if plan is None:
        plan = [TrialRow(index=r.index, hparams=r.hparams, state=TrialState.PLANNED) for r in runs]
    over = record.parent_status != "RUNNING"
    trials = [_trial(p, by_index.get(p.index), over, now, stale_after_s)
              for p in sorted(plan, key=lambda p: (p.dispatch_position or 10**9, p.index))]
    if over and record.tags.get(TAG_INTERRUPTED):  # a stopped sweep's never-started trials were interrupted
        trials = [{**t, "state": INTERRUPTED} if t["state"] == "never started" else t for t in trials]
    counts = {word: sum(1 for t in trials if t["state"] == word) for word in WORDS + OPTIONAL_WORDS}
    for word in OPTIONAL_WORDS:
        if not counts[word]:
            del counts[word]
    parent_beat = float(record.tags.get(TAG_HEARTBEAT, record.started_at))
    reason = record.tags.get(TAG_REASON) if over else None  # why it ended: a crash, a reaped zombie
    if over and record.tags.get(TAG_INTERRUPTED):
        state = f"interrupted ({record.tags[TAG_INTERRUPTED]})"
    elif over and record.parent_status == "FAILED" and reason:
        state = f"crashed: {_first_line(reason, 300)}"
    elif over:
        state = PARENT_STATES.get(record.parent_status, record.parent_status.lower())
    elif now - parent_beat > SILENT_BEATS * float(record.tags.get(TAG_HEARTBEAT_S, HEARTBEAT_S)):
        state = f"not responding (no heartbeat for {now - parent_beat:.0f} s: orchestrator killed?)"
    elif record.tags.get(TAG_STATUS) == "STARTING":
        state = STARTING
    else:
        state = "running"
    finished = sorted((t for t in trials if t["state"] == "done" and t["f1"] is not None), key=lambda t: -t["f1"])
    return {
        "sweep_id": record.sweep_id, "name": record.name, "parent_run_id": record.parent_run_id,
        "experiment_id": record.experiment_id, "state": state, "prefect": prefect,
        "dispatch_order": record.tags.get(TAG_DISPATCH),
        "started_at": record.started_at, "ended_at": record.ended_at,
        "elapsed_s": (record.ended_at or now) - record.started_at,
        "total": len(trials), "counts": counts,
        "eta_s": None if over or state == STARTING else eta_s(trials, _slots(record)),
        # The best trial, with how many it was ranked against (`index` is its place in the file, not a rank).
        "best": {**finished[0], "ranked": len(finished)} if finished else None,
        "trials": trials, "reason": reason,
    }


def _first_line(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _trial(plan: TrialRow, run: TrialRow | None, over: bool, now: float, stale_after_s: float) -> dict[str, Any]:
    """One trial's line in the summary (the keys of `hpsweep status --json`'s "trials")."""
    word = trial_word(plan, run, over, now, stale_after_s)
    row: dict[str, Any] = {
        "index": plan.index, "hparams": plan.hparams, "run_id": run.run_id if run else plan.reused_run_id,
        "expected_duration_s": plan.expected_duration_s, "attempt": run.attempt if run else None,
        "f1": run.f1 if run else None, "duration_s": run.duration_s if run else None, "reason": None}
    if word in ("running", STALE):
        row["elapsed_s"] = max(0.0, now - (run.started_at or now))  # type: ignore[union-attr]
    if word == "failed":
        row["reason"] = run.reason  # type: ignore[union-attr]
    row["state"] = word
    return row


def _slots(record: SweepRecord) -> int:
    if "slots" in record.params:  # recorded by the sweep: trials that run at once
        return max(1, int(record.params["slots"]))
    quota, gpus = int(record.params.get("quota", 1)), int(record.params.get("gpus_per_trial", 1))
    return max(1, quota // gpus)


def eta_s(trials: list[dict[str, Any]], slots: int) -> float | None:
    """Seconds until the last queued trial ends: list-schedule what is left over the sweep's slots.

    A trial's duration: its plan estimate, else the median of this sweep's finished trials;
    a running one has that minus its elapsed time left. None when nothing predicts a duration.
    """
    measured = [t["duration_s"] for t in trials if t["state"] == "done" and t["duration_s"] is not None]
    fallback = statistics.median(measured) if measured else None

    def expected(t: dict[str, Any]) -> float | None:
        return t["expected_duration_s"] if t["expected_duration_s"] is not None else fallback

    running = [t for t in trials if t["state"] == "running"]
    queued = [t for t in trials if t["state"] == "queued"]
    if not running and not queued:
        return 0.0
    needed = [expected(t) for t in running + queued]
    if any(d is None for d in needed):
        return None
    busy = [max(0.0, expected(t) - t["elapsed_s"]) for t in running]  # type: ignore[operator]
    return list_schedule([expected(t) for t in queued], slots, busy)  # type: ignore[misc]


def render(status: dict[str, Any]) -> str:
    """`hpsweep status`'s text: the sweep, its counts, its best trial, then each running, stale or failed one."""
    from hpsweep.plan import human_duration

    c = status["counts"]
    lines = [f"sweep {status['sweep_id']} ({status['name']}): {status['state']}, "
             f"{human_duration(status['elapsed_s'])} elapsed",
             f"  Prefect     {status['prefect']}" if status["prefect"] else None,
             f"  why         {status['reason'].strip()[:2000]}"  # what the state line could not hold
             if status.get("reason") and status["reason"].strip() not in status["state"] else None,
             "  trials      not planned yet (Prefect and the plan are being set up)" if status["state"] == STARTING
             else f"  trials      {status['total']}: {c['running']} running, {c['queued']} queued, {c['done']} done, "
             f"{c['failed']} failed, {c['reused']} reused"
             + (f", {c['stale']} stale (no heartbeat)" if c["stale"] else "")
             + (f", {c['never started']} never started" if c["never started"] else ""),
             f"  dispatch    {status['dispatch_order']}" if status["dispatch_order"] else None,
             f"  best        F1 {status['best']['f1']:.4f}, rank 1 of {status['best']['ranked']} finished: "
             f"{run_name(status['best']['hparams'])} (combination {status['best']['index']} in the file)"
             if status["best"] else None]
    if status["state"] == "running" or status["state"].startswith("not responding"):
        lines.append(f"  ETA         {human_duration(status['eta_s'])}" if status["eta_s"] is not None
                     else "  ETA         unknown (no trial has finished yet and the plan has no estimates)")
    lines = [line for line in lines if line]
    for t in status["trials"]:
        if t["state"] in ("running", "stale", "failed"):
            hp = run_name(t["hparams"])
            detail = {"running": f"for {human_duration(t.get('elapsed_s'))}, attempt {t['attempt']}",
                      "stale": "no heartbeat: its process may be dead",
                      "failed": (t["reason"] or "")[:160]}[t["state"]]
            lines.append(f"  {t['state']:<8} {hp} (combination {t['index']}): {detail}")
    return "\n".join(lines)

