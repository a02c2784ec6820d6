"""What a trial process sends to and fetches from its MLflow run: metric batches, checkpoint and
model files, and where an earlier attempt's checkpoints and system-metric steps left off.

Each function is one MLflow call (or one small search) without retries of its own: the trial
process decides how long each is worth retrying (``hpsweep.store.retry.retrying``).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from hpsweep.predictions import STORED_NAME
from hpsweep.store.runs import checkpoint_runs

CHECKPOINT_ARTIFACT_DIR = "checkpoints"
MODEL_ARTIFACT_DIR = "model"
PREDICTIONS_ARTIFACT_DIR = "predictions"  # the trial's validation predictions (hpsweep.predictions)

# MLflow draws a tqdm bar for every download (the report reads each trial's predictions): dozens of
# bars cut into the sweep's output, and into CI logs as raw carriage returns. A user's own choice wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """One batch of metrics into the run (an identical re-send is stored once)."""
    client.log_batch(run_id, metrics=metrics)


def upload_file(client: MlflowClient, run_id: str, path: Path | str, artifact_dir: str) -> None:
    client.log_artifact(run_id, str(path), artifact_dir)


def upload_dir(client: MlflowClient, run_id: str, folder: Path | str, artifact_dir: str) -> None:
    """Every file under ``folder`` into the run's ``artifact_dir``."""
    client.log_artifacts(run_id, str(folder), artifact_dir)


def has_files(client: MlflowClient, run_id: str, artifact_dir: str) -> bool:
    return bool(client.list_artifacts(run_id, artifact_dir))


def download_dir(client: MlflowClient, run_id: str, artifact_dir: str, dest: Path) -> Path:
    """The run's ``artifact_dir`` copied under ``dest``; returns the local copy (``dest/artifact_dir``)."""
    return Path(client.download_artifacts(run_id, artifact_dir, str(dest)))


def download_predictions(client: MlflowClient, run_id: str, dest: Path) -> Path | None:
    """The run's stored predictions copied under ``dest``; None when the trial logged none."""
    stored = f"{PREDICTIONS_ARTIFACT_DIR}/{STORED_NAME}"
    if not any(f.path == stored for f in client.list_artifacts(run_id, PREDICTIONS_ARTIFACT_DIR)):
        return None
    return Path(client.download_artifacts(run_id, stored, str(dest)))


def checkpoint_source(client: MlflowClient, experiment_id: str, trial_key: str) -> str | None:
    """The newest unfinished run of the trial that uploaded checkpoints (a FINISHED run's are its
    final state, never resumed from), or None. A run whose artifacts cannot be listed is skipped."""
    for run in checkpoint_runs(client, experiment_id, trial_key):
        try:
            if has_files(client, run.info.run_id, CHECKPOINT_ARTIFACT_DIR):
                return run.info.run_id
        except Exception:  # noqa: BLE001 - its artifact store is gone or unreadable: try an older one
            continue
    return None


def next_step(client: MlflowClient, run_id: str, prefix: str) -> int:
    """One past the highest step logged to the run under any metric key starting with ``prefix``
    (0 when none is): where a retry's series continue after the previous attempt's."""
    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith(prefix)]
    steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
    return max(steps) + 1 if steps else 0
