"""The server's settings, read once from the environment into a frozen pydantic-settings model.

Nothing here has a default secret and nothing is read from a file: the admin and trainer
passwords, the database password, the Flask secret key and the passphrase that encrypts
MLflow's stored secrets come from the environment only (in ECS, from Secrets Manager through
the task definition's ``secrets``). Each secret must be long and not guessable (``strength``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


class SettingsError(ValueError):
    """One or more settings are missing or invalid; ``problems`` names each variable."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


# The variables load(env) was given instead of the process environment (tests).
_GIVEN_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("mlflow_server_environment", default=None)


class _GivenEnvironment(EnvSettingsSource):
    """pydantic-settings' environment source, over a mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        super().__init__(settings_cls)
        self.env_vars = {name: value for name, value in environ.items() if value}  # empty = unset, as in os.environ


class _FromEnvironment(BaseSettings):
    """Settings read from the environment only (or from the mapping ``load`` was given)."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, frozen=True, validate_default=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment only: no ``.env`` file, no secrets directory."""
        given = _GIVEN_ENVIRONMENT.get()
        return (init_settings, env_settings if given is None else _GivenEnvironment(settings_cls, given))


class Guards(_FromEnvironment):
    """What each server worker reads for itself (mlflow_server/hardening.py): the login
    rate limit and the health check. Part of ``Settings`` too, so ``check`` validates them."""

    # After this many failed logins within the window, from one address or for one user...
    auth_max_failures: int = Field(10, ge=1, le=10_000, validation_alias="MLFLOW_AUTH_MAX_FAILURES")
    auth_failure_window_s: int = Field(60, ge=1, le=86_400, validation_alias="MLFLOW_AUTH_FAILURE_WINDOW_S")
    # ...requests get 429 for this long.
    auth_lockout_s: int = Field(300, ge=1, le=86_400, validation_alias="MLFLOW_AUTH_LOCKOUT_S")
    # /health fails when PostgreSQL does not answer `SELECT 1` within this.
    health_db_timeout_s: int = Field(3, ge=2, le=30, validation_alias="MLFLOW_HEALTH_DB_TIMEOUT_S")


class Settings(Guards):
    """Every setting, validated; each field reads the environment variable named by its alias.

    Fields are validated in order, so a check that involves two variables sits on the later one.
    """

    backend_store_uri: str = Field(validation_alias="MLFLOW_BACKEND_STORE_URI")  # never with a password in it
    # Secrets: kept out of repr() so they never reach a log line or a traceback.
    db_password: str | None = Field(None, validation_alias="PGPASSWORD", repr=False)
    # The auth app's users/roles: a database of their own on the same server.
    auth_database_uri: str = Field("", validation_alias="MLFLOW_AUTH_DATABASE_URI")
    artifacts_destination: str = Field(validation_alias="MLFLOW_ARTIFACTS_DESTINATION")  # the server proxies to S3
    admin_username: str = Field(validation_alias="MLFLOW_AUTH_ADMIN_USERNAME")
    admin_password: str = Field(validation_alias="MLFLOW_AUTH_ADMIN_PASSWORD", repr=False)
    secret_key: str = Field(validation_alias="MLFLOW_FLASK_SERVER_SECRET_KEY", repr=False)
    # MLflow encrypts the secrets it stores (AI-gateway keys) with a key derived from this; unset,
    # it uses a passphrase published in its source.
    kek_passphrase: str = Field(validation_alias="MLFLOW_CRYPTO_KEK_PASSPHRASE", repr=False)
    trainer_username: str | None = Field(None, validation_alias="HPSWEEP_TRAINER_USERNAME")
    trainer_password: str | None = Field(None, validation_alias="HPSWEEP_TRAINER_PASSWORD", repr=False)
    # The sweep identity: creates a sweep's experiment and parent run, registers the champion.
    sweep_username: str | None = Field(None, validation_alias="HPSWEEP_SWEEP_USERNAME")
    sweep_password: str | None = Field(None, validation_alias="HPSWEEP_SWEEP_PASSWORD", repr=False)
    # An account sees nothing it was not granted (READ stays accepted as an explicit choice).
    default_permission: str = Field("NO_PERMISSIONS", validation_alias="MLFLOW_AUTH_DEFAULT_PERMISSION")
    host: str = Field("0.0.0.0", validation_alias="MLFLOW_HOST")
    port: int = Field(5000, ge=1, le=65535, validation_alias="MLFLOW_PORT")
    workers: int = Field(4, ge=1, le=64, validation_alias="MLFLOW_WORKERS")
    auth_cache_ttl_s: int = Field(60, ge=0, le=3600, validation_alias="MLFLOW_AUTH_CACHE_TTL_S")

    @model_validator(mode="before")
    @classmethod
    def _password_out_of_the_uri(cls, data: Any) -> Any:
        """A password in MLFLOW_BACKEND_STORE_URI becomes the database password (unless PGPASSWORD is set)."""
        uri = data.get("MLFLOW_BACKEND_STORE_URI") if isinstance(data, dict) else None
        if not isinstance(uri, str):
            return data
        bare, password = split_password(uri)
        return {**data, "MLFLOW_BACKEND_STORE_URI": bare, "PGPASSWORD": data.get("PGPASSWORD") or password}

    @field_validator("backend_store_uri")
    @classmethod
    def _postgresql_with_a_database(cls, uri: str) -> str:
        if urlsplit(uri).scheme not in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
            raise ValueError("MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI")
        if not database_name(uri):
            raise ValueError("MLFLOW_BACKEND_STORE_URI names no database (postgresql://user@host:port/DB)")
        return uri

    @field_validator("auth_database_uri")
    @classmethod
    def _auth_database(cls, uri: str, info: ValidationInfo) -> str:
        """Without a password of its own, or the backend's; default: ``<backend db>_auth`` on the same server."""
        if uri:
            uri, password = split_password(uri)
            if password and password != info.data.get("db_password"):
                raise ValueError("MLFLOW_AUTH_DATABASE_URI must use the same password as the backend store "
                                 "(PGPASSWORD)")
            return uri
        backend = info.data.get("backend_store_uri")
        return with_database(backend, f"{database_name(backend)}_auth") if backend else ""

    @field_validator("artifacts_destination")
    @classmethod
    def _s3(cls, uri: str) -> str:
        if not uri.startswith("s3://"):
            raise ValueError("MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI (artifacts are proxied to S3)")
        return uri

    @field_validator("admin_password")
    @classmethod
    def _admin_password_strong(cls, password: str) -> str:
        return strong_password("MLFLOW_AUTH_ADMIN_PASSWORD", password)

    @field_validator("secret_key")
    @classmethod
    def _secret_key_long_enough(cls, key: str) -> str:
        # It signs the UI's CSRF tokens: a short key can be brute-forced from one signed token.
        if len(key.encode()) < MIN_SECRET_KEY_BYTES or len(set(key)) == 1:
            raise ValueError(f"MLFLOW_FLASK_SERVER_SECRET_KEY must be at least {MIN_SECRET_KEY_BYTES} random bytes "
                             "(e.g. `openssl rand -hex 32`)")
        return key

    @field_validator("kek_passphrase")
    @classmethod
    def _kek_passphrase_strong(cls, passphrase: str) -> str:
        return strong_password("MLFLOW_CRYPTO_KEK_PASSPHRASE", passphrase)

    @field_validator("trainer_username")
    @classmethod
    def _trainer_is_not_the_admin(cls, username: str | None, info: ValidationInfo) -> str | None:
        if username and username == info.data.get("admin_username"):
            raise ValueError("HPSWEEP_TRAINER_USERNAME must differ from MLFLOW_AUTH_ADMIN_USERNAME")
        return username

    @field_validator("trainer_password")
    @classmethod
    def _trainer_account_complete(cls, password: str | None, info: ValidationInfo) -> str | None:
        # A username that failed its own check was set all the same.
        has_username = "trainer_username" not in info.data or bool(info.data["trainer_username"])
        if has_username != bool(password):
            raise ValueError("set both HPSWEEP_TRAINER_USERNAME and HPSWEEP_TRAINER_PASSWORD, or neither")
        return strong_password("HPSWEEP_TRAINER_PASSWORD", password) if password else password

    @field_validator("sweep_username")
    @classmethod
    def _sweep_is_its_own_account(cls, username: str | None, info: ValidationInfo) -> str | None:
        if username and username in (info.data.get("admin_username"), info.data.get("trainer_username")):
            raise ValueError("HPSWEEP_SWEEP_USERNAME must differ from MLFLOW_AUTH_ADMIN_USERNAME and "
                             "HPSWEEP_TRAINER_USERNAME")
        return username

    @field_validator("sweep_password")
    @classmethod
    def _sweep_account_complete(cls, password: str | None, info: ValidationInfo) -> str | None:
        has_username = "sweep_username" not in info.data or bool(info.data["sweep_username"])
        if has_username != bool(password):
            raise ValueError("set both HPSWEEP_SWEEP_USERNAME and HPSWEEP_SWEEP_PASSWORD, or neither")
        return strong_password("HPSWEEP_SWEEP_PASSWORD", password) if password else password

    @field_validator("default_permission")
    @classmethod
    def _read_only_by_default(cls, permission: str) -> str:
        permission = permission.upper()
        if permission not in PERMISSIONS:
            raise ValueError(f"MLFLOW_AUTH_DEFAULT_PERMISSION must be one of {', '.join(PERMISSIONS)}")
        if permission in ("EDIT", "MANAGE"):
            raise ValueError("MLFLOW_AUTH_DEFAULT_PERMISSION must not grant writes to every account (use READ)")
        return permission

    def __str__(self) -> str:  # `python -m mlflow_server check` prints Settings(...), secrets omitted
        return repr(self)

    @property
    def local_url(self) -> str:
        """Where this host reaches the server (for provisioning accounts after it starts)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


MIN_PASSWORD_CHARS = 16
MIN_DISTINCT_CHARS = 8
MIN_SECRET_KEY_BYTES = 32
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common_passwords.txt")


@cache
def common_passwords() -> frozenset[str]:
    """Well-known passwords (lower case), from the list shipped with the package."""
    lines = COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def strong_password(name: str, password: str) -> str:
    """At least 16 characters, at least 8 different ones (no `aaaa…`, `abababab…`), and not a
    well-known password, alone, repeated or with digits or symbols around it."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"{name} must be at least {MIN_PASSWORD_CHARS} characters (e.g. `openssl rand -base64 18`)")
    if len(set(password)) < MIN_DISTINCT_CHARS:
        raise ValueError(f"{name} must use at least {MIN_DISTINCT_CHARS} different characters")
    if _is_common(password):
        raise ValueError(f"{name} is a well-known password: use a random one (e.g. `openssl rand -base64 18`)")
    return password


def _is_common(password: str) -> bool:
    # Only letters, so that "Password1234!!!!" and "passwordpassword" are caught as "password".
    core = "".join(c for c in password.lower() if c.isalpha())
    listed = common_passwords()
    if password.lower() in listed or core in listed:
        return True
    return any(core and len(core) % len(word) == 0 and core == word * (len(core) // len(word))
               for word in listed if word.isalpha())


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


_Model = TypeVar("_Model", bound=_FromEnvironment)


def load(env: Mapping[str, str] | None = None, model: type[_Model] = Settings) -> _Model:
    """Read and validate every setting of ``model`` (all of them by default) from the
    environment (or ``env`` instead of it); raise SettingsError naming each bad variable."""
    token = _GIVEN_ENVIRONMENT.set(None if env is None else dict(env))
    try:
        return model()
    except ValidationError as e:
        raise SettingsError([_problem(error, model) for error in e.errors()]) from None
    finally:
        _GIVEN_ENVIRONMENT.reset(token)


def _problem(error: ErrorDetails, model: type[_FromEnvironment]) -> str:
    """One line per bad variable, in the words the server has always used."""
    name = ".".join(map(str, error["loc"]))
    value = error.get("input")
    if error["type"] == "missing":
        return f"{name} is not set"
    if error["type"].startswith("int_"):
        return f"{name}={value!r} is not an integer"
    if error["type"] in ("greater_than_equal", "less_than_equal"):
        field = next(f for f in model.model_fields.values() if f.validation_alias == name)
        low = next(m.ge for m in field.metadata if hasattr(m, "ge"))
        high = next(m.le for m in field.metadata if hasattr(m, "le"))
        return f"{name}={value} is outside [{low}, {high}]"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"{name}: {error['msg']}"
