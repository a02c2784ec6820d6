"""Database steps the server applies before it starts: the auth database, MLflow's schema,
and hpsweep's index on run tags. Each is idempotent and safe for replicas starting together
(one PostgreSQL advisory lock serialises them).

Why the index: hpsweep finds a sweep's runs with ``search_runs`` filtered on
``tags.`hpsweep.sweep_id` = '<id>'``, which MLflow turns into
``tags.key = $1 AND tags.value = $2``. MLflow's ``tags`` table has a primary key on
``(key, run_uuid)`` and an index on ``run_uuid`` only, so the lookup reads every row of that
key (one per run ever tagged with a sweep id) and filters on the value. ``value`` is
``varchar(8000)``: a btree on it would reject any tag whose value does not fit a btree entry
(about 2.7 kB after compression), so the index is a hash index, which stores a 4-byte hash
per row, has no size limit, answers ``value = $2`` whatever the key, and works with generic
(prepared) plans. bench/bench_tag_index.py measures it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from mlflow_server.settings import Settings, database_name, with_database

log = logging.getLogger("mlflow_server")

# An arbitrary constant: every replica takes this lock around the startup steps.
ADVISORY_LOCK_KEY = 0x6870737765657001


@dataclass(frozen=True)
class IndexSpec:
    name: str
    table: str
    method: str
    columns: str

    def create_sql(self) -> sql.Composed:
        # CONCURRENTLY: building it on a live, large tags table does not block MLflow's writes.
        return sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({})").format(
            sql.Identifier(self.name), sql.Identifier(self.table), sql.SQL(self.method), sql.SQL(self.columns))


TAG_VALUE_INDEX = IndexSpec(name="hpsweep_tags_value_hash", table="tags", method="hash", columns="value")
INDEXES = (TAG_VALUE_INDEX,)


def libpq_uri(uri: str) -> str:
    """SQLAlchemy's ``postgresql+psycopg://`` → libpq's ``postgresql://``."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(scheme="postgresql"))


def connect(uri: str, password: str | None, **kwargs) -> psycopg.Connection:
    return psycopg.connect(libpq_uri(uri), password=password, autocommit=True, connect_timeout=10, **kwargs)


def database_exists(uri: str, password: str | None, timeout_s: float = 120.0) -> bool:
    """Connect to the database ``uri`` names: True if it exists, False if the server says it
    does not. Waits up to ``timeout_s`` for the server itself (a task can start during an RDS
    failover)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with connect(uri, password):
                return True
        except psycopg.OperationalError as e:
            if f'database "{database_name(uri)}" does not exist' in str(e):
                return False
            if "authentication failed" in str(e) or time.monotonic() > deadline:
                raise
            log.warning("PostgreSQL not reachable yet (%s); retrying", str(e).strip().splitlines()[0])
            time.sleep(3)


def ensure_database(uri: str, password: str | None) -> bool:
    """Create the database ``uri`` names if it does not exist (needs CREATEDB and CONNECT on the
    ``postgres`` database, which RDS's master user has). True if it was created."""
    if database_exists(uri, password):
        return False
    name = database_name(uri)
    with connect(with_database(uri, "postgres"), password) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            return False  # another replica created it a moment ago
        log.info("created database %s", name)
        return True


# The proxied artifact store's root: the default experiment (id 0), which MLflow creates with
# the schema, keeps its artifacts there like every other experiment.
PROXIED_ARTIFACT_ROOT = "mlflow-artifacts:/"
# What earlier versions of this module gave the default experiment (and its runs).
_OLD_PLACEHOLDER_ROOT = "file:///nonexistent-unused"


def init_tracking_schema(uri: str, password: str | None) -> None:
    """Create MLflow's tables in an empty database, or check they are at this MLflow's version.

    An out-of-date schema (after an MLflow upgrade) fails here with MLflow's own message;
    upgrade it deliberately with ``python -m mlflow_server migrate --upgrade`` after a snapshot.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(_with_password(uri, password), PROXIED_ARTIFACT_ROOT)


def repoint_placeholder_artifacts(conn: psycopg.Connection) -> int:
    """Move the default experiment and its runs off the placeholder root earlier versions gave
    them onto the artifact store (nothing was ever stored there). Returns the rows changed."""
    old, new = _OLD_PLACEHOLDER_ROOT, PROXIED_ARTIFACT_ROOT.rstrip("/")  # keeps the "/0/…" that follows
    changed = 0
    for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
        changed += conn.execute(
            sql.SQL("UPDATE {t} SET {c} = %s || substr({c}, %s) WHERE experiment_id = 0 AND {c} LIKE %s").format(
                t=sql.Identifier(table), c=sql.Identifier(column)),
            (new, len(old) + 1, old + "/%")).rowcount
    return changed


def upgrade_tracking_schema(uri: str, password: str | None) -> None:
    """``mlflow db upgrade``: run MLflow's alembic migrations on an existing database."""
    from mlflow.store.db.utils import _upgrade_db, create_sqlalchemy_engine_with_retry

    engine = create_sqlalchemy_engine_with_retry(_with_password(uri, password))
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()


def _with_password(uri: str, password: str | None) -> str:
    # Only inside this process (SQLAlchemy needs it in the URL or in PGPASSWORD); never logged.
    if not password:
        return uri
    from urllib.parse import quote

    parts = urlsplit(uri)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(password, safe='')}@{host}" if user else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))


def apply_indexes(conn: psycopg.Connection, indexes: tuple[IndexSpec, ...] = INDEXES) -> list[str]:
    """Create each missing index; rebuild one a failed concurrent build left invalid.
    Returns the names it created."""
    created = []
    for index in indexes:
        row = conn.execute(
            "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
            "WHERE c.relname = %s AND c.relnamespace = to_regnamespace(current_schema())::oid",
            (index.name,)).fetchone()
        if row is not None and row[0]:
            continue
        if row is not None:  # an interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index behind
            log.warning("index %s is invalid (an earlier build was interrupted): rebuilding it", index.name)
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index.name)))
        conn.execute(index.create_sql())
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(index.table)))
        log.info("created index %s on %s", index.name, index.table)
        created.append(index.name)
    return created


def prepare(settings: Settings, upgrade: bool = False) -> list[str]:
    """Everything the server needs from the database before it starts (idempotent)."""
    ensure_database(settings.backend_store_uri, settings.db_password)
    ensure_database(settings.auth_database_uri, settings.db_password)
    with connect(settings.backend_store_uri, settings.db_password) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            if upgrade:
                upgrade_tracking_schema(settings.backend_store_uri, settings.db_password)
            init_tracking_schema(settings.backend_store_uri, settings.db_password)
            if repoint_placeholder_artifacts(conn):
                log.info("database migration: the default experiment's artifacts now go to %s", PROXIED_ARTIFACT_ROOT)
            return apply_indexes(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
