"""hpsweep's layout in MLflow: one experiment per sweep name, a parent run per sweep
execution, a child run per trial, the best trial's model registered as ``champion``.

Every write goes through an explicit ``MlflowClient`` (never the fluent API's global
active run), so trial threads cannot step on each other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpsweep.launcher import TrialOutcome

TAG_SWEEP_ID = "hpsweep.sweep_id"
TAG_ROLE = "hpsweep.role"  # "sweep" or "trial"
TAG_TRIAL_KEY = "hpsweep.trial_key"
TAG_HPARAMS = "hpsweep.hparams"  # canonical JSON: typed hparams (MLflow params are strings)
TAG_INDEX = "hpsweep.index"  # the combination's row number in the file order
TAG_ATTEMPT = "hpsweep.attempt"
TAG_STATUS = "hpsweep.status"
TAG_REASON = "hpsweep.reason"
TAG_DURATION = "hpsweep.duration_s"
CHAMPION_ALIAS = "champion"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The user's MLFLOW_TRACKING_URI, else MLflow's own default: ./mlflow.db next to ./mlruns,
    so a plain `mlflow ui` in the same folder shows the sweep."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        _enable_wal(Path(uri.removeprefix("sqlite:///")))
    return uri


def _enable_wal(db: Path) -> None:
    # Trainer processes log metrics while the sweep writes tags: WAL lets readers and one
    # writer proceed together instead of failing with "database is locked". It persists in the file.
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


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
                            tags={TAG_SWEEP_ID: sweep_id, TAG_ROLE: "sweep", **tags})
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
    }


def has_model(client: MlflowClient, run_id: str) -> bool:
    return any(f.path == "model" for f in client.list_artifacts(run_id))


def register_champion(client: MlflowClient, model_name: str, run_id: str) -> str:
    """Register the run's `model` artifact as a new version and point the `champion` alias at it."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)
