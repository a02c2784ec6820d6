"""Which tracking store a sweep uses, and getting the embedded SQLite default ready for many processes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import psutil

from hpsweep.identity import identity_is_dead, process_identity
from hpsweep.inputs import Problem, SweepInputError
from hpsweep.store import private
from hpsweep.store.retry import cap_client_backoff
from hpsweep.store.tags import RUNS_VIEW_KEY

log = logging.getLogger("hpsweep.store")
# How long a process waits for the store's lock before it says who holds it.
LOCK_NOTICE_S = 2.0
LOCK_POLL_S = 0.05
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The user's MLflow tracking URI, else MLflow's own default: ./mlflow.db next to ./mlruns,
    so a plain `mlflow ui` in the same folder shows the sweep. A SQLite store is ready to use
    when this returns (WAL on, MLflow's tables created); one that exists but is empty, damaged or
    not MLflow's raises SweepInputError, untouched. MLflow's HTTP back-off is bounded from here on."""
    cap_client_backoff()
    explicit = credentials_to_environment(explicit)
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        _prepare_sqlite_store(uri)
    return uri


def credentials_to_environment(uri: str | None) -> str | None:
    """``uri`` without its ``user:password@`` part, which goes where MLflow reads credentials from:
    the environment (MLFLOW_TRACKING_USERNAME/PASSWORD for a tracking server, PGPASSWORD for
    PostgreSQL). A URI with credentials is printed by MLflow ("View run at …"), stored as a Prefect
    parameter and tagged; the environment is none of these. The process's own MLFLOW_TRACKING_URI
    is cleaned the same way, so trials and Prefect never see the credentials either."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri and "@" in env_uri:
        os.environ["MLFLOW_TRACKING_URI"] = _move_credentials(env_uri)
    return _move_credentials(uri) if uri and "@" in uri else uri


def _move_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    if parts.scheme in ("http", "https"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    else:  # a database URI: libpq (and so MLflow's SQL store) reads PGPASSWORD; the user stays in the URI
        if parts.password:
            os.environ["PGPASSWORD"] = unquote(parts.password)
        netloc = f"{parts.username}@{netloc}" if parts.username else netloc
    return urlunsplit(parts._replace(netloc=netloc))


def is_tracking_server(uri: str) -> bool:
    """An MLflow tracking server (it serves its own UI), not a database or a folder."""
    return uri.startswith(("http://", "https://"))


def ui_base(tracking_uri: str) -> str:
    """Where the store's MLflow UI is: the tracking server itself (without credentials), else what
    `mlflow ui` started on the store serves by default."""
    return redact_uri(tracking_uri).rstrip("/") if is_tracking_server(tracking_uri) else DEFAULT_UI


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """Where the MLflow UI shows the experiment's runs table with the trials' f1. MLflow 3.17 opens an
    experiment on its GenAI pages unless the URL asks for the machine-learning view;
    ``viewStateShareKey`` picks the columns stored on the experiment (hpsweep.store.tags.RUNS_VIEW)."""
    return (f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
            "&workflowType=machine_learning")


def redact_uri(uri: str) -> str:
    """The URI without a `user:password@` part: safe to print, tag and write into reports."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _prepare_sqlite_store(uri: str) -> None:
    """Check the file, turn on WAL and let MLflow create its tables, one process at a time.

    WAL lets trainers log metrics while the sweep writes tags (readers and one writer together).
    The lock: MLflow creates a new database's tables with no lock between processes, and two
    processes migrating at once die on "duplicate column name".
    """
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(db):
        _refuse_unusable(db)
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        private.cached_tracking_store(uri)


def _refuse_unusable(db: Path) -> None:
    """A missing file, or a SQLite database with no tables yet (what a creation interrupted before
    MLflow's tables leaves), is a new store. Anything else that is not MLflow's is refused untouched:
    MLflow would silently create its tables over it (an emptied store's history lost without a word)."""
    if not db.exists():
        return
    if db.stat().st_size == 0:
        raise _unusable(db, "is empty (0 bytes: its history is gone)")
    try:  # reads the header and the schema; writes nothing
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:
        raise  # locked or unreadable: not damage
    except sqlite3.DatabaseError as e:
        raise _unusable(db, f"is damaged ({e})") from e
    if tables and "experiments" not in tables:
        raise _unusable(db, "is damaged (a SQLite database without MLflow's tables)")


def _unusable(db: Path, what: str) -> SweepInputError:
    return SweepInputError([Problem(str(db), f"the tracking store {what}: restore it or move it away")])


# ---------------------------------------------------------------- the store's lock


def lock_path(db: Path) -> Path:
    """The store's lock: a hidden file beside the database, `.mlflow.db.hpsweep-lock`, that exists
    only while a process prepares the store (so nothing is left in /tmp, nor in the user's git tree).

    Beside the database: processes of every user and every temp folder that open the same store
    meet on it. A different file from the database: closing any descriptor of the database file
    itself would drop the SQLite locks this process holds on it.
    """
    return db.with_name(f".{db.name}.hpsweep-lock")


@contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """Hold the store's lock; after LOCK_NOTICE_S of waiting, say who holds it (the holder writes
    its host, pid and command into the lock file). The holder removes the file before letting go;
    a waiter that then wins the removed file sees it is no longer the path's and tries again, so
    two processes never hold the lock at once (flock on an unlinked inode locks nothing shared)."""
    path = lock_path(db)
    deadline, noticed = time.monotonic() + LOCK_NOTICE_S, False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if _locked(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not noticed and time.monotonic() > deadline:
            noticed = True
            log.warning("waiting for the tracking store %s: %s holds its lock %s (it is creating or "
                        "upgrading the store; hpsweep goes on once it lets go)", db, _holder(path), path)
        time.sleep(LOCK_POLL_S)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        yield
    finally:
        with suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # closing releases the flock


def _locked(fd: int, path: Path) -> bool:
    """Took the lock on ``fd``, and ``fd`` is still the file at ``path`` (not one its holder removed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _holder_record() -> bytes:
    command = " ".join(psutil.Process().cmdline())[:300]
    return json.dumps({"identity": process_identity(), "pid": os.getpid(), "host": socket.gethostname(),
                       "command": command}).encode()


def _holder(path: Path) -> str:
    """Who holds the lock, as its record says; 'another process' when it has not said (yet)."""
    try:
        record = json.loads(path.read_text())
        if identity_is_dead(record["identity"]):
            return "another process"
        return f"process {record['pid']} on {record['host']} ({record['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
