"""One contract, every place a trial can run: the local launcher and the pool launcher
(a real `train-trial` deployment on a real process work pool) must behave the same."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL, temporary_settings

from hpsweep import store
from hpsweep.engine.launcher import LocalLauncher, TrialJob
from hpsweep.engine.pool import PoolLauncher

pytestmark = pytest.mark.slow


@pytest.fixture(params=["local", "pool"])
def launcher(request):
    if request.param == "local":
        yield LocalLauncher(preload=["tests.trainers"])
        return
    pool = request.getfixturevalue("gpu_pool")
    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}):  # talk to the test server
        yield PoolLauncher("train-trial/hpsweep", poll_interval_s=0.5)


@pytest.fixture
def sweep_run(tmp_path: Path, demo_data: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = store.ensure_experiment(client, f"contract-{time.time_ns()}")
    parent = store.start_parent_run(client, exp, "sweep-1", {})

    def job(index: int, hparams: dict, **overrides) -> TrialJob:
        fields = dict(sweep_id="sweep-1", experiment_id=exp, parent_run_id=parent, tracking_uri=uri, index=index,
                      hparams=hparams, trial_key=f"key-{time.time_ns()}-{index}", attempt=1,
                      settings={"epochs": 2, "epoch_s": 0.1}, train=str(demo_data / "train.csv"),
                      val=str(demo_data / "val.csv"), entrypoint="tests.trainers:epochs",
                      work_dir=str(tmp_path / "work"))
        return TrialJob(**{**fields, **overrides})

    return client, job


def test_a_good_trial_is_finished_with_its_f1_and_metrics(launcher, sweep_run):
    client, job = sweep_run
    result = launcher.launch(job(1, {"f1": 0.7, "mode": "ok"}), ())
    assert result.outcome.ok and result.outcome.f1 == 0.7
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["f1"] == 0.7
    assert [m.step for m in client.get_metric_history(result.run_id, "val_f1")] == [1, 2]
    assert run.data.tags[store.TAG_SWEEP_ID] == "sweep-1"


def test_a_trainer_error_fails_without_retry(launcher, sweep_run):
    client, job = sweep_run
    result = launcher.launch(job(2, {"f1": 0.7, "mode": "raise"}), ())
    assert not result.outcome.ok and not result.outcome.retryable
    assert "this trainer rejects its hparams" in result.outcome.reason
    assert client.get_run(result.run_id).info.status == "FAILED"


def test_a_time_limit_kills_the_trial(launcher, sweep_run):
    client, job = sweep_run
    result = launcher.launch(job(3, {"f1": 0.7, "mode": "hang"}, time_limit_s=2), ())
    assert not result.outcome.ok and "time limit of 2 s exceeded" in result.outcome.reason
    assert client.get_run(result.run_id).info.status == "KILLED"


def test_a_command_trainer_gets_the_documented_environment(launcher, sweep_run):
    client, job = sweep_run
    cmd = [sys.executable, str(Path(__file__).parent / "cmd_trainer.py")]
    result = launcher.launch(job(4, {"f1": 0.4, "mode": "ok"}, entrypoint=None, command=cmd), ())
    assert result.outcome.ok and result.outcome.f1 == 0.4
    assert client.get_run(result.run_id).data.metrics["val_f1"] == 0.4
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} == {"model/model.json"}
