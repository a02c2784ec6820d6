"""Shared fixtures: real servers on loopback (prefect server, mlflow server on PostgreSQL),
an isolated project folder per test, and a helper that runs the real `hpsweep` CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PG_DSN = os.environ.get("HPSWEEP_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout}s: {log.read_text()[-3000:] if log else ''}")


def alive(pid: int) -> bool:
    """Running or sleeping; a killed process not yet reaped by init ('Z') counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (servers and workers shut down cleanly on it), then kill."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A local Prefect server that a test's sweep left (hpsweep.engine.localserver) stops this soon.
TEST_SERVER_IDLE_S = "60"


@pytest.fixture(scope="session", autouse=True)
def isolated_prefect_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep tests away from the user's ~/.prefect (profiles, database) and local Prefect server."""
    from hpsweep.engine import localserver

    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", localserver.IDLE_ENV, localserver.DIR_ENV)}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ[localserver.IDLE_ENV] = TEST_SERVER_IDLE_S
    os.environ.pop(localserver.DIR_ENV, None)
    os.environ.pop("PREFECT_API_URL", None)
    yield home
    localserver.stop_local_server(force=True)  # the session home's, if a test started one there
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("digits")
    prepare(out)
    return out


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, isolated_prefect_home) -> str:
    """A real `prefect server` on loopback; yields its API URL."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-server")
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def postgres_db() -> str:
    """A fresh PostgreSQL database for this test session (dropped at the end)."""
    import psycopg

    name = f"hpsweep_test_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(f"{PG_DSN}/postgres", autocommit=True)
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    cmd: list[str]
    log: Path

    def restart(self, down_s: float = 0.0) -> None:
        stop(self.proc)
        time.sleep(down_s)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/health", 120, self.proc, self.log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, postgres_db: str) -> MlflowServer:
    """A real `mlflow server` with PostgreSQL as its backend store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_db,
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "2"]
    log = root / "server.log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, cmd, log)
    try:
        wait_http(f"{server.url}/health", 180, proc, log)
        yield server
    finally:
        stop(server.proc)


@dataclass
class Project:
    """A user's project folder: inputs under params/, data under data/, state written here."""

    root: Path
    env: dict[str, str]

    def write(self, relpath: str, text: str) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def hpsweep(self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
        """Run the real CLI in a child process, as a user would."""
        return subprocess.run([sys.executable, "-m", "hpsweep.cli", *args], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    def state_written(self) -> list[str]:
        """Anything a sweep would write: MLflow store, artifacts, reports, trial folders."""
        names = ("mlflow.db", "mlruns", "mlartifacts", "reports", ".hpsweep")
        return [n for n in names if (self.root / n).exists()]


@pytest.fixture
def project(tmp_path: Path, demo_data: Path):
    """A project whose sweeps start their own local Prefect server (stopped after the test)."""
    from hpsweep.engine import localserver

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    for name in ("train.csv", "val.csv"):
        shutil.copy(demo_data / name, root / "data" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "HPSWEEP_"))}
    # The tests' own trainers (tests/trainers.py) are importable as `tests.trainers`.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env["HPSWEEP_GPU_LOCK_DIR"] = str(tmp_path / "gpu-locks")  # fake GPUs: never shared with another run's
    env[localserver.DIR_ENV] = str(tmp_path / "prefect-server")
    env[localserver.IDLE_ENV] = TEST_SERVER_IDLE_S
    yield Project(root, env)
    localserver.stop_local_server(force=True, folder=Path(env[localserver.DIR_ENV]))


@pytest.fixture
def served_project(project: Project, prefect_server: str) -> Project:
    """A project whose sweeps use the session's real `prefect server` (not the ephemeral API)."""
    project.env["PREFECT_API_URL"] = prefect_server
    return project


@dataclass
class WorkPool:
    name: str
    limit: int | None
    api_url: str


def prefect_cli(api_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PREFECT_API_URL": api_url, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=full_env, capture_output=True,
                            text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, f"prefect {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def gpu_pool(prefect_server: str, tmp_path_factory: pytest.TempPathFactory):
    """A real `process` work pool with concurrency limit 2 (the quota), the train-trial and sweep
    deployments from prefect.yaml, and real workers polling it (stopped with SIGINT)."""
    gpu, cpu = "test-gpu", "test-cpu"
    prefect_cli(prefect_server, "work-pool", "create", gpu, "--type", "process")
    prefect_cli(prefect_server, "work-pool", "set-concurrency-limit", gpu, "2")
    prefect_cli(prefect_server, "work-pool", "create", cpu, "--type", "process")
    deploy_env = {"HPSWEEP_HOME": str(REPO), "HPSWEEP_GPU_POOL": gpu, "HPSWEEP_CPU_POOL": cpu}
    prefect_cli(prefect_server, "--no-prompt", "deploy", "--all", env=deploy_env)
    logs = tmp_path_factory.mktemp("workers")
    # Not this test process's MLflow settings: an earlier test's mlflow.set_tracking_uri() writes
    # MLFLOW_TRACKING_URI into os.environ, and a deployed sweep would then write to that store.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    worker_env = {**clean, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
                  "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                  "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                  "HPSWEEP_HEARTBEAT_S": "2"}
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                 "--type", "process"], env=worker_env, cwd=REPO,
                                stdout=(logs / f"{pool}.log").open("wb"), stderr=subprocess.STDOUT)
               for pool in (gpu, cpu)]
    try:
        yield WorkPool(gpu, 2, prefect_server)
    finally:
        for w in workers:
            stop(w)


@dataclass
class S3Endpoint:
    """moto in server mode on loopback: an S3-compatible endpoint for DVC remotes and the data cache."""

    url: str
    env: dict[str, str]  # credentials and endpoint for subprocesses (dvc, hpsweep, workers)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def bucket(self) -> str:
        name = f"hpsweep-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": url}
    # This process's boto3 (the data cache) gets moto's credentials; never the endpoint itself, which
    # would also redirect other tests' in-process moto mocks (test_infra) to this server.
    credentials = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL_S3"}
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    try:
        wait_http(f"{url}/moto-api/", 60, proc, log)
        yield S3Endpoint(url, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(proc)
