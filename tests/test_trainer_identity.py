"""The trainer identity writes the trial runs of the sweeps it was given, and nothing else.

Each row of issue 15's probe (every one returned 200 before) is replayed as the trainer
against the admin's run, experiment and registered model, on the real server
(tests/test_mlflow_server.py's fixtures), and must now get 403.
"""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from hpsweep.store import grants
from mlflow_server import __main__ as server_cli
from tests.test_mlflow_server import (AuthServer, auth_server, client, logged_in, s3_endpoint,  # noqa: F401
                                      status_of, sweep_experiment)

pytestmark = pytest.mark.slow
MODEL = "prod-model"


@dataclass
class AdminWorld:
    experiment: str
    run: str
    run_path: str  # the run's artifact root under the proxy: <experiment>/<run>/artifacts


@pytest.fixture(scope="module")
def admin_world(auth_server: AuthServer, tmp_path_factory: pytest.TempPathFactory) -> AdminWorld:
    """The admin's experiment and FINISHED run holding model/model.pkl, registered as prod-model@champion."""
    folder = tmp_path_factory.mktemp("admin-model")
    (folder / "model.pkl").write_bytes(b"GOOD-PICKLE")
    with logged_in(auth_server.admin):
        c = client(auth_server)
        exp = c.create_experiment(f"admin-{uuid.uuid4().hex[:6]}")
        rid = c.create_run(exp).info.run_id
        c.log_artifact(rid, str(folder / "model.pkl"), "model")
        c.set_terminated(rid, "FINISHED")
        c.create_registered_model(MODEL)
        version = c.create_model_version(MODEL, f"runs:/{rid}/model", rid).version
        c.set_registered_model_alias(MODEL, "champion", version)
    return AdminWorld(exp, rid, f"{exp}/{rid}/artifacts")


def put_artifact(srv: AuthServer, user: tuple[str, str], path: str, body: bytes) -> int:
    url = f"{srv.url}/api/2.0/mlflow-artifacts/artifacts/{path}"
    return requests.put(url, data=body, auth=user, timeout=60).status_code


def admin_model_bytes(srv: AuthServer, world: AdminWorld) -> bytes:
    url = f"{srv.url}/api/2.0/mlflow-artifacts/artifacts/{world.run_path}/model/model.pkl"
    return requests.get(url, auth=srv.admin, timeout=60).content


ROWS = {
    "write a metric into the admin's run": lambda c, w: c.log_metric(w.run, "f1", 0.0),
    "set mlflow.user on it": lambda c, w: c.set_tag(w.run, "mlflow.user", "trainer"),
    "set its status FAILED": lambda c, w: c.set_terminated(w.run, "FAILED"),
    "rename the admin's experiment": lambda c, w: c.rename_experiment(w.experiment, "pwned"),
    "rename the admin's registered model": lambda c, w: c.rename_registered_model(MODEL, "pwned"),
    "create a version of prod-model": lambda c, w: c.create_model_version(MODEL, f"runs:/{w.run}/model", w.run),
    "move prod-model's champion alias": lambda c, w: c.set_registered_model_alias(MODEL, "champion", "1"),
    "read the admin's experiment": lambda c, w: c.get_experiment(w.experiment),
    "read the admin's run": lambda c, w: c.get_run(w.run),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_the_trainer_is_refused(row: str, auth_server: AuthServer, admin_world: AdminWorld):
    with logged_in(auth_server.trainer):
        assert status_of(lambda: ROWS[row](client(auth_server), admin_world)) == 403
    with logged_in(auth_server.admin):  # nothing changed
        c = client(auth_server)
        run = c.get_run(admin_world.run)
        assert run.info.status == "FINISHED" and "f1" not in run.data.metrics
        assert run.data.tags.get("mlflow.user") != "trainer"
        assert c.get_experiment(admin_world.experiment).name.startswith("admin-")
        assert [v.version for v in c.search_model_versions(f"name = '{MODEL}'")] == ["1"]
        assert c.get_model_version_by_alias(MODEL, "champion").version == "1"


def test_the_trainer_cannot_overwrite_the_admins_model(auth_server: AuthServer, admin_world: AdminWorld):
    status = put_artifact(auth_server, auth_server.trainer, f"{admin_world.run_path}/model/model.pkl", b"EVIL-PICKLE")
    assert status == 403
    assert admin_model_bytes(auth_server, admin_world) == b"GOOD-PICKLE"


def test_the_trainer_sees_no_other_experiment(auth_server: AuthServer, admin_world: AdminWorld):
    mine = sweep_experiment(auth_server, "mine")
    with logged_in(auth_server.trainer):
        seen = {e.experiment_id for e in client(auth_server).search_experiments()}
    assert mine in seen and admin_world.experiment not in seen


def test_an_artifact_path_must_name_a_run_of_its_experiment(auth_server: AuthServer, admin_world: AdminWorld):
    """The trainer may write its sweep's experiment, but not the admin's run filed under it."""
    mine = sweep_experiment(auth_server, "mismatch")
    status = put_artifact(auth_server, auth_server.trainer, f"{mine}/{admin_world.run}/artifacts/model/model.pkl",
                          b"EVIL-PICKLE")
    assert status == 403


def test_a_finished_runs_artifacts_are_sealed_even_for_their_writer(auth_server: AuthServer, tmp_path: Path):
    exp = sweep_experiment(auth_server, "sealed")
    (tmp_path / "model.pkl").write_bytes(b"TRIAL-MODEL")
    with logged_in(auth_server.trainer):
        c = client(auth_server)
        rid = c.create_run(exp).info.run_id
        c.log_artifact(rid, str(tmp_path / "model.pkl"), "model")  # RUNNING: it may write
        assert put_artifact(auth_server, auth_server.trainer, f"{exp}/{rid}/artifacts/model/model.pkl",
                            b"TRIAL-MODEL") == 200
        c.set_terminated(rid, "FINISHED")
        with pytest.raises(requests.HTTPError, match="403 .* is FINISHED: its artifacts can no longer be written"):
            c.log_artifact(rid, str(tmp_path / "model.pkl"), "model")
    for account in (auth_server.trainer, auth_server.sweep):  # the sweep owns the experiment: sealed all the same
        assert put_artifact(auth_server, account, f"{exp}/{rid}/artifacts/model/model.pkl", b"EVIL") == 403
        assert put_artifact(auth_server, account, f"{exp}/{rid}/artifacts/model/new.pkl", b"EVIL") == 403
    r = requests.post(f"{auth_server.url}/api/2.0/mlflow-artifacts/mpu/create/{exp}/{rid}/artifacts/model/model.pkl",
                      json={"path": "model.pkl", "num_parts": 1}, auth=auth_server.trainer, timeout=60)
    assert r.status_code == 403
    url = f"{auth_server.url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{rid}/artifacts/model/model.pkl"
    assert requests.get(url, auth=auth_server.trainer, timeout=60).content == b"TRIAL-MODEL"


def test_the_sweep_registers_and_moves_the_champion(auth_server: AuthServer, tmp_path: Path):
    exp = sweep_experiment(auth_server, "crown")
    name = f"crown-{uuid.uuid4().hex[:6]}"
    (tmp_path / "m.pkl").write_bytes(b"m")
    with logged_in(auth_server.trainer):  # the trials
        c = client(auth_server)
        first, second = c.create_run(exp).info.run_id, c.create_run(exp).info.run_id
        for rid in (first, second):
            c.log_artifact(rid, str(tmp_path / "m.pkl"), "model")
    with logged_in(auth_server.sweep):
        c = client(auth_server)
        c.create_registered_model(name)
        for rid in (first, second):
            version = c.create_model_version(name, f"runs:/{rid}/model", rid).version
            c.set_registered_model_alias(name, "champion", version)
        assert c.get_model_version_by_alias(name, "champion").run_id == second
    with logged_in(auth_server.trainer):  # and the trainer cannot touch it
        assert status_of(lambda: client(auth_server).set_registered_model_alias(name, "champion", "1")) == 403


def test_the_sweep_grants_its_trainer_on_start(auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch):
    """hpsweep's sweep side (hpsweep.store.grants, called by open_sweep) as the experiment's owner."""
    monkeypatch.setenv(grants.ENV_TRAINER_USERNAME, auth_server.trainer[0])
    with logged_in(auth_server.sweep):
        exp = client(auth_server).create_experiment(f"auto-{uuid.uuid4().hex[:6]}")
        assert grants.grant_trainer(auth_server.url, exp)
    with logged_in(auth_server.trainer):
        assert client(auth_server).create_run(exp).info.experiment_id == exp
    with logged_in(auth_server.admin):
        theirs = client(auth_server).create_experiment(f"not-the-sweeps-{uuid.uuid4().hex[:6]}")
    with logged_in(auth_server.sweep):  # not its experiment: refused, logged, not raised
        assert not grants.grant_trainer(auth_server.url, theirs)


def test_an_admin_grants_with_the_command(auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]):
    with logged_in(auth_server.admin):
        name = f"granted-{uuid.uuid4().hex[:6]}"
        exp = client(auth_server).create_experiment(name)
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "HPSWEEP_"))]:
        monkeypatch.delenv(var)
    env = {"MLFLOW_BACKEND_STORE_URI": auth_server.db_uri, "MLFLOW_ARTIFACTS_DESTINATION": "s3://x/y",
           "MLFLOW_AUTH_ADMIN_USERNAME": auth_server.admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": auth_server.admin[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
           "MLFLOW_CRYPTO_KEK_PASSPHRASE": secrets.token_urlsafe(24)}  # the server's whole environment, as an admin has it
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with logged_in(auth_server.trainer):
        assert status_of(lambda: client(auth_server).create_run(exp)) == 403
    assert server_cli.main(["grant", "--experiment", name, "--user", auth_server.trainer[0],
                            "--url", auth_server.url]) == 0
    assert f"EDIT on experiment {name} ({exp})" in capsys.readouterr().out
    with logged_in(auth_server.trainer):
        assert client(auth_server).create_run(exp).info.experiment_id == exp
    assert server_cli.main(["grant", "--experiment", "no-such-sweep", "--user", auth_server.trainer[0],
                            "--url", auth_server.url]) == 2
