"""Start ``mlflow server`` production-shaped and keep it running.

Order: prepare the database (auth database, MLflow schema, tag index) → start
``mlflow server --app-name basic-auth`` (uvicorn, several workers, artifacts proxied to S3)
in a process group of its own → wait for ``/health`` → provision the sweep and trainer accounts →
wait. SIGTERM/SIGINT are passed to the whole group, so no worker outlives the command.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow_server import accounts, database
from mlflow_server.settings import Settings

log = logging.getLogger("mlflow_server")

HEALTH_TIMEOUT_S = 300.0
AUTHORIZATION_FUNCTION = "mlflow_server.artifact_guard:authenticate"
# The folder holding the mlflow_server package: the server's workers import the guard from it.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# Variables the server process must not inherit: it needs none of them.
_NOT_FOR_THE_SERVER = ("HPSWEEP_TRAINER_PASSWORD", "HPSWEEP_SWEEP_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME",
                       "MLFLOW_TRACKING_URI")


def auth_config(settings: Settings) -> str:
    """basic_auth.ini for MLflow's auth app. No secret in it: the admin credentials come from
    MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD and the database password from PGPASSWORD."""
    return "\n".join([
        "[mlflow]",
        f"default_permission = {settings.default_permission}",
        f"database_uri = {settings.auth_database_uri}",
        # MLflow's basic auth, then the artifact guard (artifact_guard.py): the one hook that runs
        # on both the Flask routes and the FastAPI-native artifact upload.
        f"authorization_function = {AUTHORIZATION_FUNCTION}",
        "grant_default_workspace_access = false",
        # Each worker remembers a verified credential this long: without it every request pays
        # one scrypt hash check (tens of ms of CPU, about 1.5 s per request on a loaded 2-core
        # host). The price: a password changed or a user deleted through another worker keeps
        # working here until the entry expires.
        f"auth_cache_ttl_seconds = {settings.auth_cache_ttl_s}",
        "",
    ])


def command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "mlflow_server.hardening", "server", "--app-name", "basic-auth",  # + hardening.py
            "--backend-store-uri", settings.backend_store_uri,
            "--artifacts-destination", settings.artifacts_destination, "--serve-artifacts",
            "--host", settings.host, "--port", str(settings.port), "--workers", str(settings.workers)]


def server_env(settings: Settings, config_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_SERVER}
    env.update({
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_BACKEND_STORE_URI": settings.backend_store_uri,  # without the password, if it had one
        "MLFLOW_AUTH_ADMIN_USERNAME": settings.admin_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": settings.admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": settings.secret_key,
        "MLFLOW_CRYPTO_KEK_PASSPHRASE": settings.kek_passphrase,
    })
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    if settings.db_password:
        env["PGPASSWORD"] = settings.db_password
    # MLflow's job runner (GenAI scoring, trace archival) starts seven extra consumer processes;
    # a tracking server for training runs needs none of them.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy at {url}/health after {timeout:.0f}s")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> int:
    """SIGTERM to the server's whole process group (uvicorn and its workers), then SIGKILL."""
    _signal_group(proc, signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        return proc.wait()


def serve(settings: Settings) -> int:
    created = database.prepare(settings)
    if created:
        log.info("database migration: created %s", ", ".join(created))
    with tempfile.TemporaryDirectory(prefix="mlflow-server-") as tmp:
        config = Path(tmp) / "basic_auth.ini"
        config.write_text(auth_config(settings))
        config.chmod(0o600)
        proc = subprocess.Popen(command(settings), env=server_env(settings, config), start_new_session=True)
        stopping = False

        def on_signal(signum, _frame):
            nonlocal stopping
            stopping = True
            log.info("signal %d: stopping the server", signum)
            _signal_group(proc, signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            wait_healthy(settings.local_url, proc)
            admin = (settings.admin_username, settings.admin_password)
            if settings.trainer_username and settings.trainer_password:
                accounts.provision_trainer(settings.local_url, admin,
                                           (settings.trainer_username, settings.trainer_password))
            if settings.sweep_username and settings.sweep_password:
                accounts.provision_sweep(settings.local_url, admin, (settings.sweep_username, settings.sweep_password))
            log.info("mlflow server ready on %s (%d workers)", settings.local_url, settings.workers)
            print(f"mlflow_server: ready on {settings.local_url}", flush=True)
            code = proc.wait()
        except BaseException:
            if proc.poll() is None:
                stop(proc)
            if stopping:
                return 0
            raise
        finally:
            if proc.poll() is None:
                stop(proc)
        return 0 if stopping else code
