"""The model registry: the best trial's model registered under the sweep's name, ``@champion`` on it."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpsweep.store.tags import CHAMPION_ALIAS


def has_model(client: MlflowClient, run_id: str) -> bool:
    return any(f.path == "model" for f in client.list_artifacts(run_id))


def champion(client: MlflowClient, model_name: str) -> tuple[str, str] | None:
    """(version, run id) the ``champion`` alias points at; None when there is no such model or alias."""
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return str(current.version), current.run_id


def register_champion(client: MlflowClient, model_name: str, run_id: str) -> str:
    """Register the run's `model` artifact as a new version and point the `champion` alias at it."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    current = champion(client, model_name)
    if current is not None and current[1] == run_id:  # a rerun that reused the winner: no new version
        return current[0]
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)


def champion_uri(model_name: str, version: str, run_id: str) -> str:
    return f"models:/{model_name}@{CHAMPION_ALIAS} (version {version}, run {run_id})"
