"""mlflow_server's hardening: strong secrets, the login rate limit, a health check that asks
PostgreSQL, no AI gateway, and the default experiment's artifacts in the artifact store.

The settings and the app wrapper are tested in-process (no server); then one real server,
started as production starts it (one worker, so the per-process rate limit is deterministic,
and a short lockout so no test sleeps long).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from requests.adapters import HTTPAdapter

from mlflow_server import database
from mlflow_server.hardening import FailureLimiter, HardenedApp, basic_auth_username, database_answers
from mlflow_server.settings import Guards, SettingsError, load
from tests.conftest import PG_DSN, REPO, free_port
from tests.test_mlflow_server import (BASE_ENV, BUCKET, PREFIX, S3, AuthServer, _drop_databases, client, logged_in,
                                      s3_endpoint, server_env, started)

__all__ = ["s3_endpoint"]  # the module fixture, shared with test_mlflow_server.py


# ---------------------------------------------------------------- secrets (no server)

@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "aaaaaaaaaaaa", "at least 16 characters"),  # accepted before
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "aaaaaaaaaaaaaaaa", "at least 8 different characters"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "Password1234!!!!", "well-known password"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "computercomputer", "well-known password"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "1234567890123456", "well-known password"),
    ("HPSWEEP_TRAINER_PASSWORD", "password1234", "at least 16 characters"),  # accepted before
    ("HPSWEEP_TRAINER_PASSWORD", "qwertyuiopasdfgh", "well-known password"),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "k", "at least 32 random bytes"),  # accepted before
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "0123456789abcdef0123456789abcde", "at least 32 random bytes"),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 40, "at least 32 random bytes"),
    ("MLFLOW_CRYPTO_KEK_PASSPHRASE", "Administrator2024!", "well-known password"),
])
def test_weak_secrets_are_refused_naming_the_variable(variable: str, value: str, message: str):
    env = {**BASE_ENV, "HPSWEEP_TRAINER_USERNAME": "trainer", "HPSWEEP_TRAINER_PASSWORD": "trainer-pw-Qe5Ub1Ho9Cs"}
    with pytest.raises(SettingsError) as e:
        load({**env, variable: value})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{variable} ")
    assert message in e.value.problems[0] and value not in str(e.value)


def test_the_kek_passphrase_is_required():
    env = {k: v for k, v in BASE_ENV.items() if k != "MLFLOW_CRYPTO_KEK_PASSPHRASE"}
    with pytest.raises(SettingsError) as e:
        load(env)
    assert e.value.problems == ["MLFLOW_CRYPTO_KEK_PASSPHRASE is not set"]
    assert BASE_ENV["MLFLOW_CRYPTO_KEK_PASSPHRASE"] not in repr(load(BASE_ENV))  # never printed


def test_random_secrets_pass():
    for _ in range(50):
        load({**BASE_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(18),
              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
              "MLFLOW_CRYPTO_KEK_PASSPHRASE": base64.b64encode(os.urandom(18)).decode()})


def test_check_refuses_weak_settings_with_exit_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HPSWEEP_", "PGPASSWORD"))}
    env.update(BASE_ENV, MLFLOW_AUTH_ADMIN_PASSWORD="aaaaaaaaaaaa", MLFLOW_FLASK_SERVER_SECRET_KEY="k",
               PYTHONPATH=str(REPO))
    env.pop("MLFLOW_CRYPTO_KEK_PASSPHRASE")
    result = subprocess.run([sys.executable, "-m", "mlflow_server", "check"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: MLFLOW_AUTH_ADMIN_PASSWORD must be at least 16 characters (e.g. `openssl rand -base64 18`)",
        "error: MLFLOW_FLASK_SERVER_SECRET_KEY must be at least 32 random bytes (e.g. `openssl rand -hex 32`)",
        "error: MLFLOW_CRYPTO_KEK_PASSPHRASE is not set"]


def test_rate_limit_settings_are_validated():
    with pytest.raises(SettingsError) as e:
        load({"MLFLOW_AUTH_MAX_FAILURES": "0", "MLFLOW_AUTH_LOCKOUT_S": "soon"}, model=Guards)
    assert e.value.problems == ["MLFLOW_AUTH_MAX_FAILURES=0 is outside [1, 10000]",
                                "MLFLOW_AUTH_LOCKOUT_S='soon' is not an integer"]
    assert load({}, model=Guards).auth_max_failures == 10


# ---------------------------------------------------------------- the app wrapper (in-process)

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_locks_an_address_and_a_user_then_forgets():
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    for _ in range(2):
        limiter.record_failure("10.0.0.1", "admin")
    assert limiter.retry_after("10.0.0.1", "admin") == 0
    limiter.record_failure("10.0.0.1", "admin")
    assert limiter.retry_after("10.0.0.1", "admin") == 30
    assert limiter.retry_after("10.0.0.1", "someone-else") == 30  # the address is locked
    assert limiter.retry_after("10.0.0.2", "admin") == 0  # a clean address still logs the user in
    limiter.record_failure("10.0.0.3", "admin")  # but one that failed for it too does not
    assert limiter.retry_after("10.0.0.3", "admin") == 30
    clock.now += 30
    assert limiter.retry_after("10.0.0.1", "admin") == 0 and limiter.retry_after("10.0.0.3", "admin") == 0


def test_limiter_counts_only_failures_within_the_window():
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    for _ in range(10):
        limiter.record_failure("10.0.0.1", None)
        clock.now += 6  # 2 failures in any 10 s
    assert limiter.retry_after("10.0.0.1", None) == 0


def test_username_is_read_from_basic_auth_only():
    header = base64.b64encode(b"admin:pw:with:colons")
    assert basic_auth_username({"headers": [(b"authorization", b"Basic " + header)]}) == "admin"
    assert basic_auth_username({"headers": [(b"authorization", b"Basic !!not-base64")]}) is None
    assert basic_auth_username({"headers": [(b"authorization", b"Bearer xyz")]}) is None


async def _password_app(scope, receive, send):
    """Stands in for MLflow: 200 for admin:right, 401 otherwise."""
    ok = (b"authorization", b"Basic " + base64.b64encode(b"admin:right")) in scope["headers"]
    await send({"type": "http.response.start", "status": 200 if ok else 401, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _get(app, path: str, source: str, auth: tuple[str, str] | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=(source, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mlflow") as c:
            return await c.get(path, auth=auth)
    return asyncio.run(go())


def test_wrapper_answers_429_with_retry_after_then_lets_through_again():
    clock = FakeClock()
    guards = load({"MLFLOW_AUTH_MAX_FAILURES": "5", "MLFLOW_AUTH_LOCKOUT_S": "120"}, model=Guards)
    app = HardenedApp(_password_app, guards, database_check=lambda: True, clock=clock)
    codes = [_get(app, "/api", "10.0.0.9", ("admin", f"guess-{i}")).status_code for i in range(200)]
    assert codes == [401] * 5 + [429] * 195
    refused = _get(app, "/api", "10.0.0.9", ("admin", "right"))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "120"
    assert _get(app, "/api", "10.0.0.10", ("admin", "right")).status_code == 200
    assert _get(app, "/api", "10.0.0.11").status_code == 401  # anonymous: no credential tried...
    assert [_get(app, "/api", "10.0.0.11").status_code for _ in range(10)] == [401] * 10  # ...none counted
    clock.now += 120
    assert _get(app, "/api", "10.0.0.9", ("admin", "right")).status_code == 200


def test_health_answers_503_when_the_database_does_not():
    guards = load({}, model=Guards)
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/mlflow"
    assert not database_answers(closed, None, timeout_s=2)
    assert database_answers(f"{PG_DSN}/postgres", None, timeout_s=2)
    down = HardenedApp(_password_app, guards, lambda: database_answers(closed, None, 2))
    up = HardenedApp(_password_app, guards, lambda: database_answers(f"{PG_DSN}/postgres", None, 2))
    assert _get(down, "/health", "10.0.0.1").status_code == 503
    assert (_get(up, "/health", "10.0.0.1").status_code, _get(up, "/health", "10.0.0.1").text) == (200, "OK")


# ---------------------------------------------------------------- the default experiment's artifacts

@pytest.mark.slow
def test_default_experiment_left_on_the_placeholder_root_is_moved_to_the_artifact_store():
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = f"hpsweep_default_{uuid.uuid4().hex[:8]}"
    uri = f"{PG_DSN}/{db}"
    settings = load({**BASE_ENV, "MLFLOW_BACKEND_STORE_URI": uri})
    database.ensure_database(uri, None)
    try:
        store = SqlAlchemyStore(uri, "file:///nonexistent-unused")  # as earlier versions created it
        run = store.create_run("0", "someone", 0, [], "old")
        assert run.info.artifact_uri.startswith("file:///nonexistent-unused/0/")
        store.engine.dispose()
        database.prepare(settings)
        store = SqlAlchemyStore(uri, "mlflow-artifacts:/")
        assert store.get_experiment("0").artifact_location == "mlflow-artifacts:/0"
        assert store.get_run(run.info.run_id).info.artifact_uri == f"mlflow-artifacts:/0/{run.info.run_id}/artifacts"
        store.engine.dispose()
    finally:
        _drop_databases(db, f"{db}_auth")


# ---------------------------------------------------------------- the real server

MAX_FAILURES = 5
LOCKOUT_S = 3


class _From(HTTPAdapter):
    """Connect from another loopback address (Linux routes all of 127.0.0.0/8 to lo)."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **{**kwargs, "source_address": (self.source, 0)})


def session_from(source: str) -> requests.Session:
    s = requests.Session()
    s.mount("http://", _From(source))
    return s


@pytest.fixture(scope="module")
def hardened_server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: S3) -> Iterator[AuthServer]:
    root = tmp_path_factory.mktemp("hardened-server")
    db = f"hpsweep_hard_{uuid.uuid4().hex[:8]}"
    port = free_port()
    admin = ("admin", secrets.token_urlsafe(18))
    trainer = ("hpsweep-trainer", secrets.token_urlsafe(18))
    env = server_env(db, port, s3_endpoint, admin, trainer, workers=1, extra={
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32), "MLFLOW_CRYPTO_KEK_PASSPHRASE": secrets.token_urlsafe(24),
        "MLFLOW_AUTH_MAX_FAILURES": str(MAX_FAILURES), "MLFLOW_AUTH_LOCKOUT_S": str(LOCKOUT_S)})
    with started(env, root, db) as (proc, log):
        yield AuthServer(f"http://127.0.0.1:{port}", f"{PG_DSN}/{db}", admin, trainer, ("", ""), [], proc, log)


@pytest.mark.slow
def test_server_uses_the_stacks_passphrase_and_has_no_gateway(hardened_server: AuthServer):
    info = requests.get(f"{hardened_server.url}/api/3.0/mlflow/server-info", timeout=30).json()
    assert info["features_enabled"]["gateway"] is False
    secret = {"secret_name": f"s-{uuid.uuid4().hex[:6]}", "secret_value": {"api_key": "sk-test"}, "provider": "openai"}
    for user in (hardened_server.trainer, hardened_server.admin):
        r = requests.post(f"{hardened_server.url}/api/3.0/mlflow/gateway/secrets/create", json=secret, auth=user,
                          timeout=30)
        assert r.status_code in (403, 501), (user[0], r.status_code, r.text[:300])
    assert b"SECURITY RISK" not in hardened_server.log.read_bytes()  # MLflow's warning about its default passphrase


@pytest.mark.slow
def test_server_rate_limits_failed_logins_per_address_and_user(hardened_server: AuthServer):
    api = f"{hardened_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    attacker, admin_desk, other = session_from("127.0.0.5"), session_from("127.0.0.6"), session_from("127.0.0.7")
    user = hardened_server.admin[0]
    codes = [attacker.get(api, auth=(user, f"guess-{i}"), timeout=30).status_code for i in range(200)]
    assert codes == [401] * MAX_FAILURES + [429] * (200 - MAX_FAILURES)
    refused = attacker.get(api, auth=hardened_server.admin, timeout=30)
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= LOCKOUT_S
    # The admin's own address has no failure: it logs in. One that failed for the admin does not.
    assert admin_desk.get(api, auth=hardened_server.admin, timeout=30).status_code == 200
    assert other.get(api, auth=(user, "one-guess"), timeout=30).status_code == 401
    assert other.get(api, auth=hardened_server.admin, timeout=30).status_code == 429
    assert requests.get(f"{hardened_server.url}/health", timeout=30).status_code == 200  # never limited
    for _ in range(5):  # after the lockout (Retry-After), the right password works from there again
        time.sleep(int(refused.headers["Retry-After"]))
        refused = attacker.get(api, auth=hardened_server.admin, timeout=30)
        if refused.status_code != 429:
            break
    assert refused.status_code == 200


@pytest.mark.slow
def test_default_experiment_artifacts_go_to_the_artifact_store(hardened_server: AuthServer, s3_endpoint: S3,
                                                                tmp_path: Path):
    with logged_in(hardened_server.admin):
        c = client(hardened_server)
        assert c.get_experiment("0").artifact_location == "mlflow-artifacts:/0"
        run = c.create_run("0")
        assert run.info.artifact_uri == f"mlflow-artifacts:/0/{run.info.run_id}/artifacts"
        (tmp_path / "w.txt").write_text("w")
        c.log_artifact(run.info.run_id, str(tmp_path / "w.txt"))
    assert f"{PREFIX}/0/{run.info.run_id}/artifacts/w.txt" in s3_endpoint.keys(f"{PREFIX}/0/")


@pytest.mark.slow
def test_health_fails_when_the_database_is_gone(hardened_server: AuthServer):
    """Last in this file (its tests run in order on one worker): it drops the server's database."""
    assert requests.get(f"{hardened_server.url}/health", timeout=30).status_code == 200
    _drop_databases(hardened_server.db_uri.rsplit("/", 1)[1])
    r = requests.get(f"{hardened_server.url}/health", timeout=30)
    assert (r.status_code, r.text) == (503, "database unavailable")
