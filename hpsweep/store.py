"""hpsweep's layout in MLflow: one experiment per sweep name, a parent run per sweep
execution, a child run per trial, the best trial's model registered as ``champion``.

Every write goes through an explicit ``MlflowClient`` (never the fluent API's global
active run), so trial threads cannot step on each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpsweep.engine.outcome import TrialOutcome
from hpsweep.runtime.durable import identity_is_dead, process_identity

TAG_SWEEP_ID = "hpsweep.sweep_id"
TAG_ROLE = "hpsweep.role"  # "sweep" or "trial"
TAG_TRIAL_KEY = "hpsweep.trial_key"
TAG_HPARAMS = "hpsweep.hparams"  # canonical JSON: typed hparams (MLflow params are strings)
TAG_INDEX = "hpsweep.index"  # the combination's row number in the file order
TAG_ATTEMPT = "hpsweep.attempt"
TAG_STATUS = "hpsweep.report.status"
TAG_REASON = "hpsweep.reason"
TAG_DURATION = "hpsweep.duration_s"
TAG_RETRYABLE = "hpsweep.retryable"  # "true" when the machine, not the trainer, failed the attempt
CHAMPION_ALIAS = "champion"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The user's MLflow tracking URI, else MLflow's own default: ./mlflow.db next to ./mlruns,
    so a plain `mlflow ui` in the same folder shows the sweep. A SQLite store is ready to use
    when this returns (WAL on, MLflow's tables created)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        _prepare_sqlite_store(uri)
    return uri


def redact_uri(uri: str) -> str:
    """The URI without a `user:password@` part: safe to print, tag and write into reports."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _prepare_sqlite_store(uri: str) -> None:
    """Turn on WAL and let MLflow create its tables, one process at a time.

    WAL: trainer processes log metrics while the sweep writes tags; it lets readers and one
    writer proceed together instead of failing with "database is locked" (it persists in the file).
    The lock: MLflow creates and migrates a new database's tables on first use with no lock
    between processes. A sweep starting while `hpsweep status` polled ran the migrations twice
    and died on "duplicate column name" (seen in CI). The lock file is in the temp folder, never
    the database itself: closing any descriptor of the database file drops the SQLite locks
    this process's connections hold on it.
    """
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.md5(str(db).encode(), usedforsecurity=False).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"hpsweep-store-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        # MLflow keeps the store for this process, so MlflowClient(uri) later reuses it.
        from mlflow.tracking._tracking_service.utils import _get_store

        _get_store(uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name)
        except MlflowException:  # another sweep created it a moment ago
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    # Without this, MLflow 3's UI opens the experiment on its GenAI pages, not the runs table.
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


def run_name(hparams: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in hparams.items())[:250]


def start_parent_run(client: MlflowClient, exp_id: str, sweep_id: str, tags: dict[str, str],
                     params: dict[str, Any]) -> str:
    run = client.create_run(exp_id, run_name=f"sweep {sweep_id}",
                            tags={TAG_SWEEP_ID: sweep_id, TAG_ROLE: "sweep", TAG_OWNER: owner_id(),
                                  TAG_HEARTBEAT: f"{time.time():.0f}", **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def start_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, sweep_id: str, index: int,
                    hparams: dict[str, Any], trial_key: str, attempt: int, tags: dict[str, str]) -> str:
    run = client.create_run(
        exp_id,
        run_name=run_name(hparams),
        tags={
            "mlflow.parentRunId": parent_run_id,
            TAG_SWEEP_ID: sweep_id,
            TAG_ROLE: "trial",
            TAG_TRIAL_KEY: trial_key,
            TAG_HPARAMS: json.dumps(hparams),  # file order, for the report
            TAG_INDEX: str(index),
            TAG_ATTEMPT: str(attempt),
            TAG_STATUS: "RUNNING",
            TAG_OWNER: owner_id(),
            TAG_HEARTBEAT: f"{time.time():.0f}",
            **tags,
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in hparams.items()])
    return run.info.run_id


def finish_trial_run(client: MlflowClient, run_id: str, outcome: TrialOutcome, log_path: Path) -> None:
    """Store the F1 first, then mark the run terminal: a FINISHED run always has its F1."""
    if log_path.is_file():
        client.log_artifact(run_id, str(log_path))
    ts = int(time.time() * 1000)
    duration = max(0.0, outcome.ended_at - outcome.started_at)
    tags = [RunTag(TAG_STATUS, "FINISHED" if outcome.ok else "FAILED"), RunTag(TAG_DURATION, f"{duration:.3f}")]
    if outcome.reason:
        tags.append(RunTag(TAG_REASON, outcome.reason[:5000]))
    if not outcome.ok:
        tags.append(RunTag(TAG_RETRYABLE, str(outcome.retryable).lower()))
    metrics = [Metric("f1", outcome.f1, ts, 0)] if outcome.ok else []
    client.log_batch(run_id, metrics=metrics, tags=tags)
    status = "FINISHED" if outcome.ok else ("KILLED" if outcome.killed else "FAILED")
    client.set_terminated(run_id, status, end_time=int(outcome.ended_at * 1000) or None)


def sweep_runs(client: MlflowClient, exp_id: str, sweep_id: str) -> list[dict[str, Any]]:
    """The sweep's trial runs as plain rows (one per run), read back from MLflow."""
    rows, token = [], None
    flt = f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'trial'"
    while True:
        page = client.search_runs([exp_id], filter_string=flt, max_results=1000, page_token=token)
        rows += [_row(run) for run in page]
        token = page.token
        if not token:
            return rows


def _row(run) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "mlflow_status": run.info.status,
        "status": tags.get(TAG_STATUS, run.info.status),
        "hparams": json.loads(tags.get(TAG_HPARAMS, "{}")),
        "f1": run.data.metrics.get("f1"),
        "reason": tags.get(TAG_REASON),
        "index": int(tags.get(TAG_INDEX, 0)),
        "attempt": int(tags.get(TAG_ATTEMPT, 1)),
        "trial_key": tags.get(TAG_TRIAL_KEY),
        "duration_s": float(tags[TAG_DURATION]) if TAG_DURATION in tags else None,
        "artifact_uri": run.info.artifact_uri,
        "started_at": (run.info.start_time or 0) / 1000,
        "heartbeat": float(tags[TAG_HEARTBEAT]) if TAG_HEARTBEAT in tags else None,
    }


def runs_by_id(client: MlflowClient, exp_id: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Trial rows for the given run ids (one search per 100 ids, not one request per run)."""
    found: dict[str, dict[str, Any]] = {}
    for i in range(0, len(run_ids), 100):
        chunk = ", ".join(f"'{r}'" for r in run_ids[i:i + 100])
        for run in client.search_runs([exp_id], f"attributes.run_id IN ({chunk})", max_results=1000):
            found[run.info.run_id] = _row(run)
    return found


def finished_trial_durations(client: MlflowClient, exp_id: str, spec_hash: str | None = None,
                             limit: int = 1000) -> list[tuple[dict[str, Any], float]]:
    """(hparams, measured duration) of the newest ``limit`` FINISHED trials of the experiment, newest
    first; only those trained under ``spec_hash`` when given. Bounded: planning never reads the whole history."""
    flt = f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STATUS}` = 'FINISHED' and attributes.status = 'FINISHED'"
    if spec_hash:
        flt += f" and tags.`hpsweep.spec_hash` = '{spec_hash}'"
    runs = client.search_runs([exp_id], flt, order_by=["attributes.start_time DESC"], max_results=limit)
    return [(json.loads(r.data.tags.get(TAG_HPARAMS, "{}")), float(r.data.tags[TAG_DURATION]))
            for r in runs if TAG_DURATION in r.data.tags]


def has_model(client: MlflowClient, run_id: str) -> bool:
    return any(f.path == "model" for f in client.list_artifacts(run_id))


def register_champion(client: MlflowClient, model_name: str, run_id: str) -> str:
    """Register the run's `model` artifact as a new version and point the `champion` alias at it."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
        if current.run_id == run_id:  # a rerun that reused the winner: no new version
            return str(current.version)
    except MlflowException:
        pass  # no champion yet
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)


# ---------------------------------------------------------------- crash-proofing

TAG_OWNER = "hpsweep.owner"  # host:pid:start of the process that runs (or ran) this run
TAG_HEARTBEAT = "hpsweep.heartbeat"  # unix time of the owner's last sign of life
TAG_ATTEMPT_LOG = "hpsweep.attempt_log"  # one line per failed attempt: why it was retried


def owner_id() -> str:
    return process_identity()


def heartbeat(client: MlflowClient, run_id: str) -> None:
    client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")


def reap_zombies(client: MlflowClient, exp_id: str, stale_after_s: float) -> list[str]:
    """Close runs left RUNNING by a process that died without reporting.

    A run is a zombie when its owner process is known dead (same host) or its heartbeat is
    older than ``stale_after_s`` (any host). It is marked KILLED with the reason, so the
    MLflow UI and reports stop showing it as running, and its trial is trained again.
    """
    reaped = []
    now = time.time()
    runs = client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        tags = run.data.tags
        if TAG_ROLE not in tags:
            continue
        last_seen = float(tags.get(TAG_HEARTBEAT, run.info.start_time / 1000))
        dead = identity_is_dead(tags.get(TAG_OWNER))
        if not dead and now - last_seen <= stale_after_s:
            continue
        why = "its process died" if dead else f"no heartbeat for {now - last_seen:.0f}s"
        reason = f"zombie: {why} without reporting (host lost or orchestrator killed); closed by a later sweep"
        client.log_batch(run.info.run_id, tags=[RunTag(TAG_STATUS, "FAILED"), RunTag(TAG_REASON, reason)])
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    return reaped


def _trial_runs(client: MlflowClient, exp_id: str, flt: str, versions: dict[str, str] | None):
    """Every trial run matching ``flt``, newest first, page by page. ``versions`` (spec hash, data and
    code versions, which every trial key includes) narrow the search to runs that could match a key,
    instead of reading the experiment's whole history."""
    flt = f"tags.`{TAG_ROLE}` = 'trial' and {flt}"
    for tag, value in (versions or {}).items():
        flt += f" and tags.`{tag}` = '{value}'"
    token = None
    while True:
        page = client.search_runs([exp_id], flt, order_by=["attributes.start_time DESC"], max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def finished_runs_by_key(client: MlflowClient, exp_id: str, keys: set[str],
                         versions: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The newest FINISHED trial run (with its F1 stored) for each of ``keys`` in the experiment."""
    found: dict[str, dict[str, Any]] = {}
    flt = f"tags.`{TAG_STATUS}` = 'FINISHED' and attributes.status = 'FINISHED'"
    for run in _trial_runs(client, exp_id, flt, versions):
        key = run.data.tags.get(TAG_TRIAL_KEY)
        if key in keys and key not in found and "f1" in run.data.metrics:
            found[key] = _row(run)
    return found


def unfinished_trial_keys(client: MlflowClient, exp_id: str, keys: set[str],
                          versions: dict[str, str] | None = None) -> set[str]:
    """Those of ``keys`` with a trial run that did not finish (killed, failed, a reaped zombie):
    the only runs whose checkpoints a new attempt should resume from. One search per sweep."""
    runs = _trial_runs(client, exp_id, "attributes.status != 'FINISHED'", versions)
    return {key for key in (run.data.tags.get(TAG_TRIAL_KEY) for run in runs) if key in keys}


def reopen_trial_run(client: MlflowClient, run_id: str, attempt: int, previous_reason: str | None) -> None:
    """Retry in the same run: one run per combination, its metric history continuing across attempts."""
    log = client.get_run(run_id).data.tags.get(TAG_ATTEMPT_LOG, "")
    line = f"attempt {attempt - 1}: {previous_reason}"
    client.log_batch(run_id, tags=[RunTag(TAG_ATTEMPT, str(attempt)), RunTag(TAG_STATUS, "RUNNING"),
                                   RunTag(TAG_ATTEMPT_LOG, (log + "\n" + line).strip()[-5000:]),
                                   RunTag(TAG_OWNER, owner_id())])
    client.update_run(run_id, status="RUNNING")


def try_mark_failed(client: MlflowClient, run_id: str, reason: str | None) -> None:
    try:
        client.log_batch(run_id, tags=[RunTag(TAG_STATUS, "FAILED"), RunTag(TAG_REASON, reason or "unknown")])
        client.set_terminated(run_id, "FAILED")
    except Exception:
        pass  # the tracking server is what failed; the next sweep closes the run as a zombie


def outcome_of(run) -> TrialOutcome:
    """Read a terminal trial run back as an outcome (how a pool trial's result comes home)."""
    tags = run.data.tags
    status = tags.get(TAG_STATUS)
    end = (run.info.end_time or 0) / 1000
    start = end - float(tags.get(TAG_DURATION, 0) or 0)
    if status == "FINISHED" and "f1" in run.data.metrics:
        return TrialOutcome(True, run.data.metrics["f1"], started_at=start, ended_at=end)
    return TrialOutcome(False, None, tags.get(TAG_REASON) or f"run ended {run.info.status}",
                        retryable=tags.get(TAG_RETRYABLE) == "true", killed=run.info.status == "KILLED",
                        started_at=start, ended_at=end)
