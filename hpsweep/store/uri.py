"""Which tracking store a sweep uses, and getting the embedded SQLite default ready for many processes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from pathlib import Path

from filelock import FileLock

from hpsweep.store import private


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

    WAL lets trainers log metrics while the sweep writes tags (readers and one writer together).
    The lock: MLflow creates a new database's tables with no lock between processes, and two
    processes migrating at once die on "duplicate column name". The lock file lives in the temp
    folder, never beside the database: closing any descriptor of the database file would drop
    the SQLite locks this process holds on it.
    """
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.md5(str(db).encode(), usedforsecurity=False).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"hpsweep-store-{key}.lock"):
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        private.cached_tracking_store(uri)
