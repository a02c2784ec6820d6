"""Every private MLflow API hpsweep uses, each behind one function.

They buy speed only (a store opened once per process, a schema check and a package scan done
once per fork server): when an MLflow upgrade removes one, ``tests/test_store_private.py``
fails loudly, and callers fall back to the slower public path.
"""

from __future__ import annotations

import functools
from typing import Any


def cached_tracking_store(uri: str) -> Any:
    """MLflow's per-process tracking store for ``uri`` (created and schema-checked on first use);
    ``MlflowClient(uri)`` later reuses it."""
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(uri)


def remember_latest_schema_revision() -> None:
    """Compute MLflow's latest database schema revision once for this process and its forks
    (a constant of the installed MLflow; working it out re-reads ~70 migration files per store)."""
    from mlflow.store.db import utils as db_utils

    if not hasattr(db_utils._get_latest_schema_revision, "cache_info"):
        db_utils._get_latest_schema_revision = functools.lru_cache(maxsize=1)(db_utils._get_latest_schema_revision)
    db_utils._get_latest_schema_revision()


def scan_installed_packages() -> None:
    """Map installed packages to their modules now (MLflow does it on a process's first save_model)."""
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()
