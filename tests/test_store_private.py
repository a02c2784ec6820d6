"""Every private MLflow API hpsweep uses (``hpsweep.store.private``) still does what hpsweep relies
on, against the installed MLflow: an upgrade that moves or removes one fails here, loudly, instead
of silently making every trial slower. And if one does vanish, the fork server's preload carries on."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.store import private


def test_cached_tracking_store_is_the_store_every_client_of_the_uri_reuses(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    store = private.cached_tracking_store(uri)
    assert private.cached_tracking_store(uri) is store  # opened (and schema-checked) once per process
    client = MlflowClient(uri)
    assert client._tracking_client.store is store  # what the trial's MlflowClient finds, already open
    exp_id = client.create_experiment("private")  # and it is a working store
    assert store.get_experiment(exp_id).name == "private"


def test_latest_schema_revision_is_worked_out_once_and_used_by_every_new_store(tmp_path: Path):
    from mlflow.store.db import utils as db_utils
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    private.remember_latest_schema_revision()
    private.remember_latest_schema_revision()  # idempotent: one cache, not a cache of a cache
    cached = db_utils._get_latest_schema_revision
    assert cached.cache_info().currsize == 1
    assert not hasattr(cached.__wrapped__, "cache_info")
    hits = cached.cache_info().hits
    SqlAlchemyStore(f"sqlite:///{tmp_path / 'fresh.db'}", str(tmp_path / "artifacts"))
    assert cached.cache_info().hits > hits  # MLflow still checks a new store's schema through it


def test_installed_packages_are_mapped_to_their_modules():
    from mlflow.utils import requirements_utils

    private.scan_installed_packages()
    packages = requirements_utils._PACKAGES_TO_MODULES
    assert isinstance(packages, dict) and packages.get("mlflow") == "mlflow"


def test_the_fork_server_preload_survives_the_private_apis_gone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def gone(*_args):
        raise AttributeError("module 'mlflow' has no attribute '_private'")

    preload = importlib.import_module("hpsweep.runtime._preload")
    for name in ("scan_installed_packages", "remember_latest_schema_revision", "cached_tracking_store"):
        monkeypatch.setattr(private, name, gone)
    monkeypatch.setenv("HPSWEEP_FORKSERVER_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    preload.preload()  # trials only get slower
