"""mlflow_server/: the production-shaped tracking server, started for real on loopback.

PostgreSQL (a fresh database per module) is the backend store, a local S3-compatible
endpoint (moto in server mode) receives the artifacts, and MLflow's basic-auth app holds an
admin and the trainer account. Every password is random per run, so a leak is findable.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from mlflow_server import accounts, database, server
from mlflow_server.settings import SettingsError, load, split_password
from tests.conftest import PG_DSN, REPO, Project, free_port

BUCKET = "hpsweep-artifacts"
PREFIX = "mlflow"


# ---------------------------------------------------------------- settings (no server)

BASE_ENV = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow@db.internal:5432/mlflow?sslmode=require",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
    "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-3f9Kq2Lx7Vb",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key-8d1c0e7a6b5f4a3928d7c6b5a4f3e2d1",
    "MLFLOW_CRYPTO_KEK_PASSPHRASE": "kek-pass-Zt4Rw8Ny2Mh6Jd",
}
TRAINER_PW = "trainer-pw-Qe5Ub1Ho9Cs"


def test_settings_come_from_the_environment_with_defaults():
    s = load(BASE_ENV)
    assert (s.host, s.port, s.workers, s.default_permission) == ("0.0.0.0", 5000, 4, "NO_PERMISSIONS")
    assert load({**BASE_ENV, "MLFLOW_AUTH_DEFAULT_PERMISSION": "read"}).default_permission == "READ"  # a choice
    assert s.auth_database_uri == "postgresql://mlflow@db.internal:5432/mlflow_auth?sslmode=require"
    assert s.trainer_username is None


def test_missing_settings_are_each_named():
    with pytest.raises(SettingsError) as e:
        load({"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a",
              "HPSWEEP_TRAINER_USERNAME": "trainer", "MLFLOW_WORKERS": "many"})
    text = "\n".join(e.value.problems)
    for needle in ("must be a postgresql:// URI", "must be an s3:// URI", "MLFLOW_AUTH_ADMIN_USERNAME is not set",
                   "MLFLOW_AUTH_ADMIN_PASSWORD is not set", "MLFLOW_FLASK_SERVER_SECRET_KEY is not set",
                   "HPSWEEP_TRAINER_PASSWORD, or neither", "MLFLOW_WORKERS='many' is not an integer"):
        assert needle in text


def test_bad_values_name_their_variable_without_echoing_secrets():
    with pytest.raises(SettingsError) as e:
        load({**BASE_ENV, "MLFLOW_PORT": "70000", "MLFLOW_AUTH_CACHE_TTL_S": "-1", "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw",
              "HPSWEEP_TRAINER_USERNAME": "admin", "HPSWEEP_TRAINER_PASSWORD": TRAINER_PW})
    assert e.value.problems == [
        "MLFLOW_AUTH_ADMIN_PASSWORD must be at least 16 characters (e.g. `openssl rand -base64 18`)",
        "HPSWEEP_TRAINER_USERNAME must differ from MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_PORT=70000 is outside [1, 65535]", "MLFLOW_AUTH_CACHE_TTL_S=-1 is outside [0, 3600]"]
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no pydantic error (with inputs) chained
    assert "short-pw" not in str(e.value)


def test_settings_read_the_process_environment_unless_given_one(monkeypatch):
    for name, value in {**BASE_ENV, "MLFLOW_WORKERS": "2", "MLFLOW_HOST": "", "PGPASSWORD": "db-secret-123456"}.items():
        monkeypatch.setenv(name, value)
    s = load()
    assert (s.workers, s.host, s.db_password) == (2, "0.0.0.0", "db-secret-123456")  # empty is unset
    assert load(BASE_ENV).db_password is None and load(BASE_ENV).workers == 4  # a given mapping replaces it


def test_write_permission_for_everyone_is_refused():
    with pytest.raises(SettingsError, match="must not grant writes to every account"):
        load({**BASE_ENV, "MLFLOW_AUTH_DEFAULT_PERMISSION": "EDIT"})


def test_a_password_in_the_database_uri_is_moved_out_of_it():
    uri, password = split_password("postgresql://mlflow:p%40ss%2Fw0rd@db:5432/mlflow")
    assert (uri, password) == ("postgresql://mlflow@db:5432/mlflow", "p@ss/w0rd")
    s = load({**BASE_ENV, "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:p%40ss@db/mlflow"})
    assert s.backend_store_uri == "postgresql://mlflow@db/mlflow" and s.db_password == "p@ss"
    assert "p@ss" not in repr(s) and "p@ss" not in " ".join(server.command(s))


def test_generated_auth_config_holds_no_secret():
    s = load({**BASE_ENV, "PGPASSWORD": "db-secret-123456", "HPSWEEP_TRAINER_USERNAME": "trainer",
              "HPSWEEP_TRAINER_PASSWORD": TRAINER_PW})
    text = server.auth_config(s) + " ".join(server.command(s))
    for secret in ("db-secret-123456", *(BASE_ENV[k] for k in BASE_ENV if "PASS" in k or "KEY" in k), TRAINER_PW):
        assert secret not in text
    assert "default_permission = NO_PERMISSIONS" in text
    assert "authorization_function = mlflow_server.artifact_guard:authenticate" in text


# ---------------------------------------------------------------- the real server

@dataclass
class S3:
    url: str
    client: object
    secret: str

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def body(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@dataclass
class AuthServer:
    url: str
    db_uri: str
    admin: tuple[str, str]
    trainer: tuple[str, str]
    sweep: tuple[str, str]
    secrets: list[str]
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[S3]:
    """A local S3-compatible endpoint (moto's server mode) on loopback, with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    url = f"http://127.0.0.1:{port}"
    secret = secrets.token_urlsafe(24)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="hpsweep-test",
                          aws_secret_access_key=secret)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield S3(url, client, secret)
    finally:
        moto.stop()


def _drop_databases(*names: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: S3) -> Iterator[AuthServer]:
    """`python -m mlflow_server` as production starts it, on fresh databases it creates itself."""
    root = tmp_path_factory.mktemp("auth-server")
    db = f"hpsweep_srv_{uuid.uuid4().hex[:8]}"
    port = free_port()
    admin = ("admin", secrets.token_urlsafe(18))
    trainer = ("hpsweep-trainer", secrets.token_urlsafe(18))
    sweep = ("hpsweep-sweep", secrets.token_urlsafe(18))
    secret_key = secrets.token_urlsafe(32)
    kek = secrets.token_urlsafe(24)
    env = server_env(db, port, s3_endpoint, admin, trainer, workers=2, extra={
        "HPSWEEP_SWEEP_USERNAME": sweep[0], "HPSWEEP_SWEEP_PASSWORD": sweep[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key, "MLFLOW_CRYPTO_KEK_PASSPHRASE": kek})
    with started(env, root, db) as (proc, log):
        yield AuthServer(f"http://127.0.0.1:{port}", f"{PG_DSN}/{db}", admin, trainer, sweep,
                         [admin[1], trainer[1], sweep[1], secret_key, kek, s3_endpoint.secret], proc, log)


def server_env(db: str, port: int, s3: S3, admin: tuple[str, str], trainer: tuple[str, str], workers: int,
               extra: dict[str, str]) -> dict[str, str]:
    """The environment `mlflow_server/start.sh` gets in production, on loopback with moto S3 (``extra``:
    the secrets and settings a fixture chooses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "HPSWEEP_"))}
    return {**env, "PYTHONPATH": str(REPO), "MLFLOW_BACKEND_STORE_URI": f"{PG_DSN}/{db}",
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/{PREFIX}", "MLFLOW_S3_ENDPOINT_URL": s3.url,
            "AWS_ACCESS_KEY_ID": "hpsweep-test", "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "HPSWEEP_TRAINER_USERNAME": trainer[0], "HPSWEEP_TRAINER_PASSWORD": trainer[1],
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": str(workers), **extra}


@contextmanager
def started(env: dict[str, str], root: Path, db: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`mlflow_server/start.sh` running until it says ready; then stopped (no orphans) and its databases dropped."""
    log = root / "server.log"
    proc = subprocess.Popen([str(REPO / "mlflow_server" / "start.sh")], env={**env, "PYTHON": sys.executable},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while b"mlflow_server: ready" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow_server did not start: {log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc, log
    finally:
        _stop_and_check_group(proc)
        _drop_databases(db, f"{db}_auth")


def _stop_and_check_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command stops it and every server process it started (no orphans)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    groups = {os.getpgid(int(p)) for p in children if _alive(int(p))}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    time.sleep(1)
    leftovers = [g for g in groups if _group_alive(g)]
    for g in leftovers:
        os.killpg(g, signal.SIGKILL)
    assert proc.returncode == 0 and not leftovers, f"exit {proc.returncode}, process groups left: {leftovers}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def logged_in(user: tuple[str, str]) -> Iterator[None]:
    """MLflow's clients read credentials from the environment: log in as ``user`` for a block."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(dict(zip(names, user, strict=True)))
    try:
        yield
    finally:
        for n, v in saved.items():
            os.environ.pop(n) if v is None else os.environ.__setitem__(n, v)


def client(srv: AuthServer):
    from mlflow.tracking import MlflowClient

    return MlflowClient(srv.url)


def status_of(call) -> int:
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as e:
        return e.get_http_status_code()
    return 200


@pytest.mark.slow
def test_anonymous_and_wrong_password_requests_are_refused(auth_server: AuthServer):
    api = f"{auth_server.url}/api/2.0/mlflow"
    assert requests.get(f"{auth_server.url}/health", timeout=10).status_code == 200  # the load balancer's check
    for url in (f"{api}/experiments/search?max_results=1", f"{api}/runs/search",
                f"{auth_server.url}/api/2.0/mlflow-artifacts/artifacts", f"{auth_server.url}/"):
        assert requests.get(url, timeout=10).status_code == 401, url
    wrong = requests.get(f"{api}/experiments/search?max_results=1", auth=(auth_server.trainer[0], "not-it"), timeout=10)
    assert wrong.status_code == 401
    ok = requests.get(f"{api}/experiments/search?max_results=1", auth=auth_server.trainer, timeout=30)
    assert ok.status_code == 200


def sweep_experiment(srv: AuthServer, prefix: str) -> str:
    """An experiment the sweep identity created (its owner) with EDIT granted to the trainer."""
    from mlflow.server.auth.client import AuthServiceClient

    with logged_in(srv.sweep):
        exp = client(srv).create_experiment(f"{prefix}-{uuid.uuid4().hex[:6]}")
        AuthServiceClient(srv.url).grant_user_permission(srv.trainer[0], "experiment", exp, "EDIT")
    return exp


@pytest.mark.slow
def test_trainer_creates_runs_and_logs_with_artifacts_in_s3(auth_server: AuthServer, s3_endpoint: S3, tmp_path: Path):
    from mlflow.entities import Metric, Param, RunTag

    exp = sweep_experiment(auth_server, "trainer")
    with logged_in(auth_server.trainer):
        c = client(auth_server)
        run = c.create_run(exp, run_name="lr=0.1")
        rid = run.info.run_id
        c.log_batch(rid, metrics=[Metric("val_f1", 0.5, 0, 1), Metric("val_f1", 0.7, 0, 2)],
                    params=[Param("lr", "0.1")], tags=[RunTag("hpsweep.role", "trial")])
        (tmp_path / "weights.txt").write_text("w")
        c.log_artifact(rid, str(tmp_path / "weights.txt"), "model")
        c.set_terminated(rid, "FINISHED")
        got = c.get_run(rid)
        assert got.data.params == {"lr": "0.1"} and got.data.metrics["val_f1"] == 0.7
        assert [m.step for m in c.get_metric_history(rid, "val_f1")] == [1, 2]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: no S3 credentials here
        assert [a.path for a in c.list_artifacts(rid, "model")] == ["model/weights.txt"]
    assert f"{PREFIX}/{exp}/{rid}/artifacts/model/weights.txt" in s3_endpoint.keys(f"{PREFIX}/{exp}/")


@pytest.mark.slow
def test_neither_account_deletes_experiments_models_or_runs(auth_server: AuthServer, tmp_path: Path):
    tag = uuid.uuid4().hex[:6]
    with logged_in(auth_server.admin):
        admin = client(auth_server)
        theirs = admin.create_experiment(f"admin-{tag}")
        admin.create_registered_model(f"admin-model-{tag}")
    own = sweep_experiment(auth_server, f"own-{tag}")
    with logged_in(auth_server.sweep):
        c = client(auth_server)
        rid = c.create_run(own).info.run_id  # the sweep is its experiment's MANAGE owner...
        (tmp_path / "w.txt").write_text("w")
        c.log_artifact(rid, str(tmp_path / "w.txt"), "model")
        c.create_registered_model(f"own-model-{tag}")
        version = c.create_model_version(f"own-model-{tag}", f"runs:/{rid}/model", rid).version
        c.set_registered_model_alias(f"own-model-{tag}", "champion", version)  # what a sweep does
        # ...and still cannot delete it: the child-tier grants withhold every cascade.
        assert status_of(lambda: c.delete_experiment(own)) == 403
        assert status_of(lambda: c.delete_experiment(theirs)) == 403
        assert status_of(lambda: c.delete_registered_model(f"own-model-{tag}")) == 403
        assert status_of(lambda: c.delete_registered_model(f"admin-model-{tag}")) == 403
        assert status_of(lambda: c.delete_model_version(f"own-model-{tag}", version)) == 403
        assert status_of(lambda: c.delete_run(rid)) == 403
    with logged_in(auth_server.trainer):  # EDIT on the sweep's experiment: writes, never deletes
        c = client(auth_server)
        assert status_of(lambda: c.delete_run(rid)) == 403
        assert status_of(lambda: c.delete_experiment(own)) == 403
        assert status_of(lambda: c.delete_registered_model(f"own-model-{tag}")) == 403
    for account in (auth_server.sweep, auth_server.trainer):  # nor give itself more rights
        r = requests.patch(f"{auth_server.url}/api/2.0/mlflow/users/update-admin", auth=account,
                           json={"username": account[0], "is_admin": True}, timeout=30)
        assert r.status_code == 403
    with logged_in(auth_server.admin):  # the 403s were permissions, not broken endpoints
        assert status_of(lambda: admin.delete_registered_model(f"own-model-{tag}")) == 200
        assert status_of(lambda: admin.delete_experiment(own)) == 200


@pytest.mark.slow
def test_other_accounts_see_nothing_they_were_not_given(auth_server: AuthServer):
    reader = ("reader", secrets.token_urlsafe(18))
    with logged_in(auth_server.admin):
        from mlflow.server.auth.client import AuthServiceClient

        AuthServiceClient(auth_server.url).create_user(*reader)
        exp = client(auth_server).create_experiment(f"shared-{uuid.uuid4().hex[:6]}")
    with logged_in(reader):
        c = client(auth_server)
        assert status_of(lambda: c.get_experiment(exp)) == 403
        assert exp not in {e.experiment_id for e in c.search_experiments()}
        assert status_of(lambda: c.create_run(exp)) == 403


@pytest.mark.slow
def test_restart_keeps_accounts_and_the_index(auth_server: AuthServer):
    """Provisioning and the migration are idempotent: a second run changes nothing."""
    import psycopg

    settings = load({"MLFLOW_BACKEND_STORE_URI": auth_server.db_uri, "MLFLOW_ARTIFACTS_DESTINATION": "s3://x/y",
                     "MLFLOW_AUTH_ADMIN_USERNAME": auth_server.admin[0],
                     "MLFLOW_AUTH_ADMIN_PASSWORD": auth_server.admin[1],
                     "MLFLOW_FLASK_SERVER_SECRET_KEY": BASE_ENV["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                     "MLFLOW_CRYPTO_KEK_PASSPHRASE": BASE_ENV["MLFLOW_CRYPTO_KEK_PASSPHRASE"]})
    assert database.prepare(settings) == []  # already there
    with psycopg.connect(auth_server.db_uri) as conn:
        valid, method = conn.execute(
            "SELECT i.indisvalid, am.amname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
            "JOIN pg_am am ON am.oid = c.relam WHERE c.relname = %s", (database.TAG_VALUE_INDEX.name,)).fetchone()
    assert valid and method == "hash"
    accounts.provision_trainer(auth_server.url, auth_server.admin, auth_server.trainer)
    accounts.provision_sweep(auth_server.url, auth_server.admin, auth_server.sweep)
    with logged_in(auth_server.admin):
        from mlflow.server.auth.client import AuthServiceClient

        auth = AuthServiceClient(auth_server.url)
        for (username, _), role_name, wanted in ((auth_server.trainer, accounts.TRAINER_ROLE, accounts.TRAINER_GRANTS),
                                                 (auth_server.sweep, accounts.SWEEP_ROLE, accounts.SWEEP_GRANTS)):
            roles = {r.name: r for r in auth.list_user_roles(username)}
            # besides its role, only MLflow's per-user role holding owner grants and grants made to it
            assert role_name in roles and all(n.startswith("__user_") for n in roles.keys() - {role_name})
            grants = {(p.resource_type, p.resource_pattern, p.permission)
                      for p in auth.list_role_permissions(roles[role_name].id)}
            assert grants == set(wanted)
            assert not auth.get_user(username).is_admin


SPEC = """
name: {name}
trainer:
  entrypoint: tests.trainers:sleepy
settings: {{epochs: 2, sleep_s: 0.2}}
resources: {{gpus: 1}}
"""


@pytest.mark.slow
def test_sweep_runs_through_the_server_with_artifacts_in_s3_and_no_credential_leaks(
        auth_server: AuthServer, s3_endpoint: S3, served_project: Project):
    project = served_project
    name = f"secure-{uuid.uuid4().hex[:6]}"
    combos = [{"f1": 0.71}, {"f1": 0.93}, {"f1": 0.82}]
    project.write("params/combinations.yaml", "combinations:\n" + "".join(f"  - {json.dumps(c)}\n" for c in combos))
    project.write("params/spec.yaml", SPEC.format(name=name))
    env = {k: v for k, v in project.env.items() if not k.startswith("AWS_")}  # trainers get no S3 credentials
    # The sweep runs as the sweep identity and grants the trainer its experiment; trials write as the trainer.
    env.update({"MLFLOW_TRACKING_URI": auth_server.url, "MLFLOW_TRACKING_USERNAME": auth_server.sweep[0],
                "MLFLOW_TRACKING_PASSWORD": auth_server.sweep[1], "HPSWEEP_TRAINER_USERNAME": auth_server.trainer[0],
                "HPSWEEP_TRAINER_PASSWORD": auth_server.trainer[1]})
    project.env = env
    result = project.hpsweep("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
                             "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    board = json.loads((project.root / "reports" / name / "latest" / "leaderboard.json").read_text())
    assert [r["f1"] for r in board["rows"]] == [0.93, 0.82, 0.71]

    with logged_in(auth_server.admin):
        c = client(auth_server)
        exp = c.get_experiment_by_name(name).experiment_id
        runs = c.search_runs([exp], f"tags.`hpsweep.sweep_id` = '{board['sweep_id']}'")
        # The sweep identity registered the champion (it may; it may not delete it).
        champion = c.get_model_version_by_alias(name, "champion")
        assert champion.run_id == board["rows"][0]["run_id"]
    assert len(runs) == 4  # the parent and three trials

    keys = s3_endpoint.keys(f"{PREFIX}/{exp}/")
    for row in board["rows"]:
        assert f"{PREFIX}/{exp}/{row['run_id']}/artifacts/trial.log" in keys
        assert f"{PREFIX}/{exp}/{row['run_id']}/artifacts/model/weights.txt" in keys
    parent = next(r for r in runs if r.data.tags.get("hpsweep.role") == "sweep").info.run_id
    assert f"{PREFIX}/{exp}/{parent}/artifacts/report/leaderboard.json" in keys

    # No credential anywhere the sweep wrote: params, tags, run names, every artifact in S3
    # (trial logs included), the local trial folders and reports, the command's output.
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    for run in runs:
        texts[f"run {run.info.run_id}"] = json.dumps([run.info.run_name, run.data.params, run.data.tags])
    for key in keys:
        texts[f"s3://{BUCKET}/{key}"] = s3_endpoint.body(key).decode("utf-8", "replace")
    for path in project.root.rglob("*"):
        if path.is_file() and (project.root / "data") not in path.parents:
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert any("trial.log" in k for k in texts) and len(texts) > 10
    leaks = [(where, i) for where, text in texts.items() for i, s in enumerate(auth_server.secrets) if s in text]
    assert leaks == []
