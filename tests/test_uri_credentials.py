"""Credentials in a tracking URI never reach stdout, Prefect's parameters or MLflow (issue 15).

`--tracking-uri http://user:pw@host` used to be printed by MLflow ("View run … at: http://user:pw@…")
and stored in the sweep flow run's parameters. hpsweep moves them into MLflow's credential
variables before anything is printed, stored or sent.
"""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from hpsweep.store.uri import credentials_to_environment
from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, run_sweep

SECRET = "pw-Zq7uXr3Lk9"


def test_credentials_move_from_the_uri_to_mlflows_variables(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://sweeper:{SECRET}@mlflow.internal/")
    assert credentials_to_environment(f"http://alice:{SECRET}%40x@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", f"{SECRET}@x")
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.internal/"
    assert credentials_to_environment(f"postgresql://mlflow:{SECRET}@db:5432/mlflow") == "postgresql://mlflow@db:5432/mlflow"
    assert os.environ["PGPASSWORD"] == SECRET
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")


@pytest.mark.slow
def test_a_sweep_given_credentials_in_its_tracking_uri_shows_them_nowhere(served_project: Project, mlflow_server,
                                                                          prefect_server: str):
    project = served_project
    host = mlflow_server.url.removeprefix("http://")
    result = run_sweep(project, [{"f1": 0.4}, {"f1": 0.8}], SLEEPY_SPEC.format(name="creds", sleep_s=0.05, gpus=1),
                       2, "--tracking-uri", f"http://sweeper:{SECRET}@{host}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "View run" in result.stdout + result.stderr  # MLflow's own lines are there, without the password
    assert SECRET not in result.stdout + result.stderr
    board = leaderboard(project, "creds")
    assert [r["f1"] for r in board["rows"]] == [0.8, 0.4] and SECRET not in str(board)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        parameters = [str(r.parameters) for r in client.read_flow_runs()]
    assert any(host in p for p in parameters)  # the sweep's flow run is there, with its tracking URI…
    assert not [p for p in parameters if SECRET in p]  # …and no password in any parameter
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("creds")
    for run in client.search_runs([exp.experiment_id]):
        assert SECRET not in str(run.data.params) + str(run.data.tags)
