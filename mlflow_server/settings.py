"""The server's settings, read once from the environment into a frozen object.

Nothing here has a default secret and nothing is read from a file: the admin and trainer
passwords, the database password and the Flask secret key come from the environment only
(in ECS, from Secrets Manager through the task definition's ``secrets``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


class SettingsError(ValueError):
    """One or more settings are missing or invalid; ``problems`` names each variable."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    backend_store_uri: str  # postgresql://user@host:port/db, never with a password in it
    auth_database_uri: str  # the auth app's users/roles, a database of their own on the same server
    artifacts_destination: str  # s3://bucket/prefix: the server proxies artifacts there
    admin_username: str
    host: str = "0.0.0.0"
    port: int = 5000
    workers: int = 4
    default_permission: str = "READ"
    auth_cache_ttl_s: int = 60
    trainer_username: str | None = None
    # Secrets: kept out of repr() so they never reach a log line or a traceback.
    db_password: str | None = field(default=None, repr=False)
    admin_password: str = field(default="", repr=False)
    trainer_password: str | None = field(default=None, repr=False)
    secret_key: str = field(default="", repr=False)

    @property
    def local_url(self) -> str:
        """Where this host reaches the server (for provisioning accounts after it starts)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def split_password(uri: str) -> tuple[str, str | None]:
    """``postgresql://u:pw@h/db`` → (``postgresql://u@h/db``, ``pw``). The password then travels
    in ``PGPASSWORD`` (libpq reads it), never on a command line or in a config file."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    if parts.username:
        netloc = f"{quote(unquote(parts.username), safe='')}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


def with_database(uri: str, database: str) -> str:
    return urlunsplit(urlsplit(uri)._replace(path=f"/{database}"))


def database_name(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def load(env: dict[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming each bad variable."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []

    def need(name: str) -> str:
        value = env.get(name, "")
        if not value:
            problems.append(f"{name} is not set")
        return value

    def integer(name: str, default: int, low: int, high: int) -> int:
        raw = env.get(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            problems.append(f"{name}={raw!r} is not an integer")
            return default
        if not low <= value <= high:
            problems.append(f"{name}={value} is outside [{low}, {high}]")
        return value

    backend = need("MLFLOW_BACKEND_STORE_URI")
    db_password = env.get("PGPASSWORD") or None
    if backend:
        if urlsplit(backend).scheme not in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
            problems.append("MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI")
        backend, inline_password = split_password(backend)
        db_password = db_password or inline_password
        if not database_name(backend):
            problems.append("MLFLOW_BACKEND_STORE_URI names no database (postgresql://user@host:port/DB)")
    auth_uri = env.get("MLFLOW_AUTH_DATABASE_URI", "")
    if auth_uri:
        auth_uri, auth_password = split_password(auth_uri)
        if auth_password and auth_password != db_password:
            problems.append("MLFLOW_AUTH_DATABASE_URI must use the same password as the backend store (PGPASSWORD)")
    elif backend and database_name(backend):
        auth_uri = with_database(backend, f"{database_name(backend)}_auth")

    artifacts = need("MLFLOW_ARTIFACTS_DESTINATION")
    if artifacts and not artifacts.startswith("s3://"):
        problems.append("MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI (artifacts are proxied to S3)")

    admin_username = need("MLFLOW_AUTH_ADMIN_USERNAME")
    admin_password = need("MLFLOW_AUTH_ADMIN_PASSWORD")
    secret_key = need("MLFLOW_FLASK_SERVER_SECRET_KEY")
    trainer_username = env.get("HPSWEEP_TRAINER_USERNAME") or None
    trainer_password = env.get("HPSWEEP_TRAINER_PASSWORD") or None
    if bool(trainer_username) != bool(trainer_password):
        problems.append("set both HPSWEEP_TRAINER_USERNAME and HPSWEEP_TRAINER_PASSWORD, or neither")
    for name, value in (("MLFLOW_AUTH_ADMIN_PASSWORD", admin_password), ("HPSWEEP_TRAINER_PASSWORD", trainer_password)):
        if value and len(value) < 12:
            problems.append(f"{name} must be at least 12 characters (MLflow's rule)")
    if trainer_username and trainer_username == admin_username:
        problems.append("HPSWEEP_TRAINER_USERNAME must differ from MLFLOW_AUTH_ADMIN_USERNAME")
    default_permission = env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ").upper()
    if default_permission not in PERMISSIONS:
        problems.append(f"MLFLOW_AUTH_DEFAULT_PERMISSION must be one of {', '.join(PERMISSIONS)}")
    if default_permission in ("EDIT", "MANAGE"):
        problems.append("MLFLOW_AUTH_DEFAULT_PERMISSION must not grant writes to every account (use READ)")

    settings = Settings(
        backend_store_uri=backend,
        auth_database_uri=auth_uri,
        artifacts_destination=artifacts,
        admin_username=admin_username,
        host=env.get("MLFLOW_HOST") or "0.0.0.0",
        port=integer("MLFLOW_PORT", 5000, 1, 65535),
        workers=integer("MLFLOW_WORKERS", 4, 1, 64),
        default_permission=default_permission,
        auth_cache_ttl_s=integer("MLFLOW_AUTH_CACHE_TTL_S", 60, 0, 3600),
        trainer_username=trainer_username,
        db_password=db_password,
        admin_password=admin_password,
        trainer_password=trainer_password,
        secret_key=secret_key,
    )
    if problems:
        raise SettingsError(problems)
    return settings
