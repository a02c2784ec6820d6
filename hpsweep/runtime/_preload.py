"""Imported once by the trial fork server, never by trials themselves: everything a trial
would otherwise import on its own, at seconds per trial (MLflow's stores, SQLAlchemy's
mapper set-up, model serialisers). Forked trials inherit it already loaded."""

import importlib
import os

for _name in (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.artifact.local_artifact_repo",
    "mlflow.store.artifact.s3_artifact_repo",
    "mlflow.sklearn",
    "skops.io",
):
    try:
        importlib.import_module(_name)
    except ImportError:  # optional backends (e.g. skops) may be absent
        pass

from sqlalchemy.orm import configure_mappers  # noqa: E402

configure_mappers()

try:
    # MLflow maps every installed package to its modules on a process's first save_model
    # (1.6 s here). Private API, so best effort: if it moves, trials are only slower.
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()
except Exception:
    pass

# Every trial opens its own tracking store. Import what that needs here, once (SQLite's
# dialect, MLflow's migration scripts), and compute MLflow's latest schema revision once:
# a store checks the database against it, and working it out re-reads ~70 migration files
# (0.4 s per trial here). It is a constant of the installed MLflow. Private API: best effort.
for _name in (
    "sqlalchemy.dialects.sqlite",
    "alembic.script",
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.utils.search_logged_model_utils",
    "mlflow.artifacts",
    "hpsweep.inputs",
):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass

try:
    import functools

    from mlflow.store.db import utils as _db_utils

    if not hasattr(_db_utils._get_latest_schema_revision, "cache_info"):
        _db_utils._get_latest_schema_revision = functools.lru_cache(maxsize=1)(_db_utils._get_latest_schema_revision)
    _db_utils._get_latest_schema_revision()
except Exception:
    pass

# The tracking store the trials will log to (hpsweep.engine.process.start_fork_server): opened here
# once (engine built, tables and schema checked), its connection pool emptied so that no
# connection crosses a fork; each trial's MlflowClient then finds it in MLflow's store cache.
_uri = os.environ.get("HPSWEEP_FORKSERVER_TRACKING_URI")
if _uri:
    try:
        from mlflow.tracking._tracking_service.utils import _get_store

        _engine = getattr(_get_store(_uri), "engine", None)
        if _engine is not None:
            _engine.dispose()
    except Exception:  # trials open their own store, as without this
        pass
