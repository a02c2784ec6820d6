"""Where a sweep stands, read from MLflow (and Prefect when its API is reachable): what is
running, done, failed, queued, and an ETA. Works on a sweep running in another terminal (the
embedded SQLite store is in WAL mode: readers never block the sweep's writes) and on past sweeps.

``summarize`` is pure; the reads are small functions over an explicit ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import statistics
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsweep.plan import list_schedule

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
# hpsweep.store (so MLflow) is imported where needed: `hpsweep plan` with no store never pays for it.

PARENT_STATES = {"FINISHED": "finished", "FAILED": "finished with failures", "KILLED": "killed"}


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
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SweepNotFound(f"no MLflow store at {uri.removeprefix('sqlite:///')} (no sweep has run here; "
                            "set MLFLOW_TRACKING_URI or --tracking-uri)")
    from hpsweep import store

    return store.resolve_tracking_uri(uri)


def find_sweep(client: MlflowClient, sweep: str) -> SweepRecord:
    """``sweep`` is a sweep name (its latest execution) or a sweep id."""
    from hpsweep import store

    exp = client.get_experiment_by_name(sweep)
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], f"tags.`{store.TAG_ROLE}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SweepNotFound(f"sweep '{sweep}' has no executions in {store.redact_uri(client.tracking_uri)}")
        return _record(exp.name, runs[0])
    # A sweep id is '<name>-<date>-<time>-<hex>': try its experiment first, then every experiment.
    guess = client.get_experiment_by_name(sweep.rsplit("-", 3)[0]) if sweep.count("-") >= 3 else None
    flt = f"tags.`{store.TAG_SWEEP_ID}` = '{sweep}' and tags.`{store.TAG_ROLE}` = 'sweep'"
    candidates = [guess] if guess is not None else client.search_experiments()
    for i in range(0, len(candidates), 100):
        chunk = candidates[i:i + 100]
        runs = client.search_runs([e.experiment_id for e in chunk], flt, max_results=1)
        if runs:
            name = next(e.name for e in chunk if e.experiment_id == runs[0].info.experiment_id)
            return _record(name, runs[0])
    raise SweepNotFound(f"no sweep named or with id '{sweep}' in {store.redact_uri(client.tracking_uri)}")


def _record(name: str, run) -> SweepRecord:
    from hpsweep import store

    info = run.info
    return SweepRecord(name=name, experiment_id=info.experiment_id, sweep_id=run.data.tags[store.TAG_SWEEP_ID],
                       parent_run_id=info.run_id, parent_status=info.status, started_at=info.start_time / 1000,
                       ended_at=info.end_time / 1000 if info.end_time else None, tags=dict(run.data.tags),
                       params=dict(run.data.params))


def load_plan(client: MlflowClient, parent_run_id: str) -> list[dict[str, Any]] | None:
    """The sweep's plan.json (every trial, reused or not, with its estimate); None when missing."""
    import mlflow.artifacts

    try:
        text = mlflow.artifacts.load_text(f"{client.get_run(parent_run_id).info.artifact_uri}/plan.json")
    except Exception:  # an older sweep, or the artifact store is unreachable: status degrades to counts
        return None
    return json.loads(text)


def prefect_state(flow_run_id: str | None, api_url: str | None = None, timeout_s: float = 3.0) -> str:
    """The flow run's state from the Prefect API, or why it is not known (never raises)."""
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not flow_run_id:
        return "unknown (the sweep recorded no flow run)"
    if not api_url:
        return "unknown (PREFECT_API_URL not set: the sweep used a temporary Prefect API)"
    request = urllib.request.Request(f"{api_url.rstrip('/')}/flow_runs/{flow_run_id}")
    if os.environ.get("PREFECT_API_KEY"):
        request.add_header("Authorization", f"Bearer {os.environ['PREFECT_API_KEY']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            state = json.loads(response.read()).get("state") or {}
    except Exception as e:  # unreachable, or another Prefect server: MLflow still answers
        return f"unknown (Prefect API at {api_url} not reachable: {type(e).__name__})"
    return str(state.get("name") or state.get("type") or "unknown")


# ---------------------------------------------------------------- the summary (pure)


def summarize(record: SweepRecord, plan_rows: list[dict[str, Any]] | None, runs: list[dict[str, Any]],
              now: float, stale_after_s: float, prefect: str | None = None) -> dict[str, Any]:
    """Counts, one line per trial and an ETA. ``runs``: the sweep's trial rows (store.sweep_runs)."""
    from hpsweep import store

    by_index = {r["index"]: r for r in runs}
    plan_rows = plan_rows or [{"index": r["index"], "hparams": r["hparams"], "reused_run_id": None,
                               "expected_duration_s": None} for r in runs]
    over = record.parent_status != "RUNNING"
    trials = []
    for p in sorted(plan_rows, key=lambda p: (p.get("dispatch_position") or 10**9, p["index"])):
        run = by_index.get(p["index"])
        row = {"index": p["index"], "hparams": p["hparams"], "run_id": run["run_id"] if run else p.get("reused_run_id"),
               "expected_duration_s": p.get("expected_duration_s"), "attempt": run["attempt"] if run else None,
               "f1": run["f1"] if run else None, "duration_s": run["duration_s"] if run else None, "reason": None}
        if run is None:
            row["state"] = "reused" if p.get("reused_run_id") else ("never started" if over else "queued")
        elif run["mlflow_status"] == "RUNNING":
            beat = run.get("heartbeat") or run.get("started_at") or now
            row["elapsed_s"] = max(0.0, now - (run.get("started_at") or now))
            row["state"] = "stale" if now - beat > stale_after_s else "running"
        elif run["status"] == "FINISHED":
            row["state"] = "done"
        else:
            row["state"] = "failed"
            row["reason"] = run.get("reason")
        trials.append(row)
    counts = {s: sum(1 for t in trials if t["state"] == s)
              for s in ("running", "stale", "queued", "done", "failed", "reused", "never started")}
    parent_beat = float(record.tags.get(store.TAG_HEARTBEAT, record.started_at))
    if over:
        state = PARENT_STATES.get(record.parent_status, record.parent_status.lower())
    elif now - parent_beat > stale_after_s:
        state = f"not responding (no heartbeat for {now - parent_beat:.0f} s: orchestrator killed?)"
    else:
        state = "running"
    return {
        "sweep_id": record.sweep_id, "name": record.name, "parent_run_id": record.parent_run_id,
        "experiment_id": record.experiment_id, "state": state, "prefect": prefect,
        "dispatch_order": record.tags.get("hpsweep.dispatch_order"),
        "started_at": record.started_at, "ended_at": record.ended_at,
        "elapsed_s": (record.ended_at or now) - record.started_at,
        "total": len(trials), "counts": counts, "eta_s": None if over else eta_s(trials, _slots(record)),
        "best": max((t for t in trials if t["state"] == "done" and t["f1"] is not None), key=lambda t: t["f1"],
                    default=None),
        "trials": trials,
    }


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
    from hpsweep import store
    from hpsweep.plan import human_duration

    c = status["counts"]
    lines = [f"sweep {status['sweep_id']} ({status['name']}): {status['state']}, "
             f"{human_duration(status['elapsed_s'])} elapsed",
             f"  Prefect     {status['prefect']}" if status["prefect"] else None,
             f"  trials      {status['total']}: {c['running']} running, {c['queued']} queued, {c['done']} done, "
             f"{c['failed']} failed, {c['reused']} reused"
             + (f", {c['stale']} stale (no heartbeat)" if c["stale"] else "")
             + (f", {c['never started']} never started" if c["never started"] else ""),
             f"  dispatch    {status['dispatch_order']}" if status["dispatch_order"] else None,
             f"  best        F1 {status['best']['f1']:.4f}: #{status['best']['index']} "
             f"{store.run_name(status['best']['hparams'])}" if status["best"] else None]
    if status["state"] == "running" or status["state"].startswith("not responding"):
        lines.append(f"  ETA         {human_duration(status['eta_s'])}" if status["eta_s"] is not None
                     else "  ETA         unknown (no trial has finished yet and the plan has no estimates)")
    lines = [line for line in lines if line]
    for t in status["trials"]:
        if t["state"] in ("running", "stale", "failed"):
            hp = store.run_name(t["hparams"])
            detail = {"running": f"for {human_duration(t.get('elapsed_s'))}, attempt {t['attempt']}",
                      "stale": "no heartbeat: its process may be dead",
                      "failed": (t["reason"] or "")[:160]}[t["state"]]
            lines.append(f"  {t['state']:<8} #{t['index']} {hp}: {detail}")
    return "\n".join(lines)

