"""Imported once by the trial fork server, never by trials themselves: everything a trial
would otherwise import on its own, at seconds per trial (MLflow's stores, SQLAlchemy's
mapper set-up, model serialisers). Forked trials inherit it already loaded.

All of it is best effort: what fails here (an optional backend not installed, a private MLflow
API an upgrade removed) only leaves trials to do that work themselves, more slowly.
"""

import functools
import gc
import importlib
import json
import logging
import os
import sys
import threading
from typing import Callable

from hpsweep.runtime import forkserver

log = logging.getLogger("hpsweep.trial")

# What a trial imports on its way: MLflow's stores and artifact repositories, SQLite's dialect
# and MLflow's migration scripts (each trial opens a tracking store), and the entrypoint resolver.
PRELOAD = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.artifact.local_artifact_repo",
    "mlflow.store.artifact.s3_artifact_repo",
    "sqlalchemy.dialects.sqlite",
    "alembic.script",
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.utils.search_logged_model_utils",
    "mlflow.artifacts",
    "hpsweep.inputs",
)

# What ``ctx.save_model`` needs for a model of a library the trainer's modules loaded. A trainer
# that uses neither library does not wait for them: skops.io alone imports all of scikit-learn
# and, through its array-API support, torch (2.5 s of a 4.7 s preload here, before the first
# trial can fork).
SERIALISERS = {"sklearn": ("mlflow.sklearn", "skops.io"), "torch": ("mlflow.pytorch",)}


def serialisers(loaded: set[str] | dict[str, object]) -> list[str]:
    """The serialiser modules worth preloading, given the top-level modules loaded (``sys.modules``)."""
    return [name for library, names in SERIALISERS.items() if library in loaded for name in names]


def _best_effort(what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - trials only get slower; an upgrade must not break them
        log.debug("preload: %s skipped: %s: %s", what, type(e).__name__, e)


def _open_trials_store(uri: str) -> None:
    """Open the tracking store the trials will log to (engine built, tables and schema checked)
    and empty its connection pool, so no connection crosses a fork; each trial's MlflowClient
    then finds the store in MLflow's per-process cache."""
    from hpsweep.store import private

    engine = getattr(private.cached_tracking_store(uri), "engine", None)
    if engine is not None:
        engine.dispose()


def _exit_with_the_sweep() -> Callable[[], None]:
    """Until its preload is done, the fork server cannot notice that its sweep has ended (it watches
    for that only in its serving loop), and a sweep that trained nothing (every trial reused) ends
    before a slow preload (skops imports torch here) does: the fork server then held the sweep's
    stdout open for seconds (`hpsweep run | tee`). Exit as soon as the sweep is gone; the function
    returned ends the watch (before any trial is forked)."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if os.getppid() != parent:
                os._exit(0)

    watcher = threading.Thread(target=watch, name="hpsweep-preload-watch", daemon=True)
    watcher.start()
    return lambda: (done.set(), watcher.join())


def _adopt_the_sweeps_main() -> None:
    """Run the sweep's main module once here, as multiprocessing would in every trial: a forked child
    whose __main__ is not the sweep's runs it before its target (64 ms of hpsweep/cli.py per trial
    under `python -m hpsweep.cli`). Python 3.11's fork server is meant to preload it ("__main__" in
    its preload list) but never does: it looks for a "main_path" key its own data never has."""
    from multiprocessing import spawn

    main = json.loads(os.environ.get(forkserver.MAIN_ENV) or "{}")
    if "init_main_from_name" in main:
        spawn._fixup_main_from_name(main["init_main_from_name"])
    elif "init_main_from_path" in main:
        spawn._fixup_main_from_path(main["init_main_from_path"])


def _prepare_trials_environment() -> None:
    """What `hpsweep run` does to its own environment before its first tracking request: credentials
    moved out of MLFLOW_TRACKING_URI, MLflow's HTTP back-off bounded. The fork server starts before
    that (hpsweep.runtime.forkserver), so it does the same for the trials it forks."""
    from hpsweep.store.retry import cap_client_backoff
    from hpsweep.store.uri import credentials_to_environment

    credentials_to_environment(None)
    cap_client_backoff()


def preload() -> None:
    stop_watching = _exit_with_the_sweep()
    _prepare_trials_environment()
    _best_effort("the sweep's main module", _adopt_the_sweeps_main)
    for name in filter(None, os.environ.get(forkserver.MODULES_ENV, "").split(",")):
        _best_effort(f"import {name}", functools.partial(importlib.import_module, name))  # the trainer's: torch...
    for name in (*PRELOAD, *serialisers(sys.modules)):
        _best_effort(f"import {name}", functools.partial(importlib.import_module, name))

    def configure_mappers() -> None:
        from sqlalchemy.orm import configure_mappers as configure

        configure()

    _best_effort("SQLAlchemy's mapper set-up", configure_mappers)

    from hpsweep.store import private

    if serialisers(sys.modules):  # MLflow maps every installed package to its modules on a first save_model (1.6 s)
        _best_effort("the installed-package scan", private.scan_installed_packages)
    # A store checks its database against the latest schema revision; working that out re-reads
    # ~70 migration files (0.4 s per trial here).
    _best_effort("the schema revision", private.remember_latest_schema_revision)
    uri = forkserver.tracking_uri()  # the sweep hands it over once it has checked the store
    if uri:
        _best_effort("the trials' tracking store", lambda: _open_trials_store(uri))
    stop_watching()


preload()
# Python's advice for a process that forks without exec: the preloaded heap moves out of the
# collector's reach, so trials' collections never walk (and copy) it, and the fork server's
# own exit skips collecting it (seconds, while it held a piped `hpsweep run`'s output open).
gc.freeze()
