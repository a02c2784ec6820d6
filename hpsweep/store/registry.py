"""The model registry: a model per sweep name, ``@champion`` on its best loadable version.

Which run deserves the alias is decided in ``hpsweep.report.assemble.decide_champion`` (pure); this
module only reads what that rule compares and moves the alias.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpsweep.store.filters import all_of, quote
from hpsweep.store.tags import CHAMPION_ALIAS, MAX_TAG_LEN, TAG_DATA_VERSION, TAG_HPARAMS, TAG_SWEEP_ID

MODEL_ARTIFACT = "model"
MLMODEL_FILE = f"{MODEL_ARTIFACT}/MLmodel"  # what makes the artifact loadable by mlflow.pyfunc.load_model
# A model-version tag per sweep that pointed @champion at the version: its value says why.
MOVED_BY_PREFIX = "hpsweep.moved_by."
VERSION_TAG_F1 = "f1"  # beside hpsweep.sweep_id and hpsweep.hparams: what the version's run measured
# Answers that mean "no such model / alias / version"; any other error propagates (a blip is never "no champion").
NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version and what its run measured: what the champion rule compares."""

    version: str
    run_id: str
    f1: float | None = None
    data_version: str | None = None  # the run's hpsweep.data_version: "<train md5>/<val md5>"
    sweep_id: str | None = None  # the sweep that trained the run
    moved_by: Mapping[str, str] = field(default_factory=dict)  # sweep id → why it pointed @champion here


def has_model(client: MlflowClient, run_id: str) -> bool:
    """The run's ``model`` artifact is an MLflow model (``model/MLmodel``), so the registry can serve it."""
    return any(f.path == MLMODEL_FILE for f in client.list_artifacts(run_id, MODEL_ARTIFACT))


def champion(client: MlflowClient, model_name: str) -> RegisteredVersion | None:
    """The version ``@champion`` points at; None when there is no such model or alias."""
    if not model_exists(client, model_name):
        return None  # asked first: an MLflow server with auth answers 403, not 404, for an absent model
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as e:
        if e.error_code not in NOT_FOUND:
            raise
        return None
    return _describe(client, current)


def model_exists(client: MlflowClient, model_name: str) -> bool:
    """A registered model of that name exists (a search: readable by every account that may read it)."""
    return bool(client.search_registered_models(filter_string=f"name = {quote(model_name)}", max_results=1))


def version_of(client: MlflowClient, model_name: str, run_id: str) -> RegisteredVersion | None:
    """The (first) version registered from ``run_id``; None when the run was never registered."""
    try:
        found = client.search_model_versions(all_of(f"name = {quote(model_name)}", f"run_id = {quote(run_id)}"))
    except MlflowException as e:
        if e.error_code not in NOT_FOUND:
            raise
        return None
    return _describe(client, min(found, key=lambda v: int(v.version))) if found else None


def register_champion(client: MlflowClient, model_name: str, run_id: str, sweep_id: str, note: str) -> str:
    """Point ``@champion`` at the run's model version, registering one only when the run has none;
    the version keeps ``note`` (why ``sweep_id`` moved the alias). Returns the version."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = version_of(client, model_name, run_id)
    version = existing.version if existing is not None else str(
        client.create_model_version(model_name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id).version)
    _describe_version(client, model_name, version, client.get_run(run_id))
    client.set_model_version_tag(model_name, version, f"{MOVED_BY_PREFIX}{sweep_id}", note[:MAX_TAG_LEN])
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    return version


def _describe_version(client: MlflowClient, model_name: str, version: str, run: Run) -> None:
    """What the registry's pages show of a version: its F1, the sweep that trained it and its hparams,
    as a description and as tags (set again on every move: a version an older hpsweep registered has none)."""
    f1, tags = run.data.metrics.get("f1"), run.data.tags
    hparams = json.loads(tags.get(TAG_HPARAMS) or "{}")
    shown = " ".join(f"{k}={v}" for k, v in hparams.items()) or "no hparams"
    client.update_model_version(model_name, version, description=(
        f"F1 {'unknown' if f1 is None else f'{f1:.4f}'} on the validation data, trial {run.info.run_name} of sweep "
        f"{tags.get(TAG_SWEEP_ID, 'unknown')}: {shown}")[:MAX_TAG_LEN])
    for key, value in {VERSION_TAG_F1: None if f1 is None else repr(f1), TAG_SWEEP_ID: tags.get(TAG_SWEEP_ID),
                       TAG_HPARAMS: tags.get(TAG_HPARAMS)}.items():
        if value is not None:
            client.set_model_version_tag(model_name, version, key, value[:MAX_TAG_LEN])


def champion_uri(model_name: str, version: str, run_id: str) -> str:
    return f"models:/{model_name}@{CHAMPION_ALIAS} (version {version}, run {run_id})"


def _describe(client: MlflowClient, mv: ModelVersion) -> RegisteredVersion:
    """The version with its run's F1, data version and sweep (unknown when the run is gone)."""
    moved_by = {k[len(MOVED_BY_PREFIX):]: v for k, v in (mv.tags or {}).items() if k.startswith(MOVED_BY_PREFIX)}
    base = RegisteredVersion(str(mv.version), mv.run_id or "", moved_by=moved_by)
    if not mv.run_id:
        return base
    try:
        run = client.get_run(mv.run_id)
    except MlflowException as e:
        if e.error_code not in NOT_FOUND:
            raise
        return base
    return RegisteredVersion(base.version, base.run_id, run.data.metrics.get("f1"),
                             run.data.tags.get(TAG_DATA_VERSION), run.data.tags.get(TAG_SWEEP_ID), moved_by)
