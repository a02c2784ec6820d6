"""The tracking store's everyday failures: an emptied or damaged `mlflow.db` is refused untouched
(exit 2), a held store lock says who holds it, no lock file is left in the temp folder, the store's
refusals (4xx) are never retried, a trial never gets a second run, and MLflow's own HTTP back-off is
bounded so work resumes soon after the store answers again."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED
from mlflow.tracking import MlflowClient

from hpsweep import store
from hpsweep.engine.launcher import execute_trial
from hpsweep.model import TrialJob
from hpsweep.store import retry, uri
from tests.conftest import REPO, Project
from tests.test_plan import write_inputs
from tests.test_sweep_e2e import SLEEPY_SPEC

PLAN = ("plan", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
        "--train", "data/train.csv", "--val", "data/val.csv")


def one_trial(project: Project) -> None:
    write_inputs(project, [{"f1": 0.5}], SLEEPY_SPEC.format(name="robust", sleep_s=0.1, gpus=1))
    project.env["CUDA_VISIBLE_DEVICES"] = ""  # no host GPU check


def foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text)")
        conn.execute("INSERT INTO notes VALUES ('not an MLflow store')")


STORES = {"empty": (lambda p: p.write_bytes(b""), "is empty"),
          "random bytes": (lambda p: p.write_bytes(os.urandom(8192)), "is damaged"),
          "foreign sqlite": (foreign_sqlite, "is damaged")}


def refused(result: subprocess.CompletedProcess, db: Path, what: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"error: {db}: the tracking store {what}" in result.stderr, out
    assert "restore it or move it away" in result.stderr, out


@pytest.mark.parametrize("kind", sorted(STORES))
def test_plan_refuses_an_empty_or_damaged_store_and_leaves_it_as_it_was(project: Project, kind: str):
    make, what = STORES[kind]
    one_trial(project)
    db = project.root / "mlflow.db"
    make(db)
    before = db.read_bytes()
    refused(project.hpsweep(*PLAN, timeout=120), db, what)
    assert db.read_bytes() == before


def test_run_refuses_a_foreign_sqlite_store_and_its_fork_server_never_opens_it(project: Project):
    """`hpsweep run` starts the trials' fork server before it checks the store: the fork server opens
    the store only once the sweep has handed it over, checked (MLflow would create its tables in it)."""
    one_trial(project)
    db = project.root / "mlflow.db"
    foreign_sqlite(db)
    before = db.read_bytes()
    refused(project.hpsweep("run", *PLAN[1:], timeout=120), db, "is damaged")
    time.sleep(3)  # a fork server still preloading would have opened it by now
    assert db.read_bytes() == before


@pytest.mark.slow
def test_run_status_and_report_refuse_an_emptied_store(project: Project):
    one_trial(project)
    db = project.root / "mlflow.db"
    db.write_bytes(b"")
    refused(project.hpsweep("run", *PLAN[1:], timeout=120), db, "is empty")
    refused(project.hpsweep("status", "robust", timeout=120), db, "is empty")
    refused(project.hpsweep("report", "robust", timeout=120), db, "is empty")
    assert db.read_bytes() == b"" and not (project.root / "reports").exists()


def test_a_held_store_lock_says_who_holds_it_while_plan_waits(project: Project):
    one_trial(project)
    db = project.root / "mlflow.db"
    store.resolve_tracking_uri(f"sqlite:///{db}")
    with uri.store_lock(db):
        proc = subprocess.Popen([sys.executable, "-m", "hpsweep.cli", *PLAN], cwd=project.root, env=project.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # EOF (the plan ended) if it never waits
            seen.append(line)
            if "waiting for the tracking store" in line:
                break
        time.sleep(1)  # it keeps waiting while we hold the lock
        assert proc.poll() is None, "".join(seen)
    out, err = proc.communicate(timeout=120)
    notice = "".join(seen)
    assert f"waiting for the tracking store {db}: process {os.getpid()} on " in notice, notice + err
    assert str(uri.lock_path(db)) in notice
    assert proc.returncode == 0, notice + err
    assert "1 to train" in out


def test_opening_a_store_leaves_no_lock_file_in_the_temp_folder_nor_beside_the_store(tmp_path: Path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    db = tmp_path / "project" / "mlflow.db"
    for _ in range(2):
        store.resolve_tracking_uri(f"sqlite:///{db}")
    assert [p.name for p in temp.iterdir() if "hpsweep" in p.name] == []
    assert [p.name for p in db.parent.iterdir() if "lock" in p.name] == []  # nor in the project (its git tree)


# ---------------------------------------------------------------- the store's refusals are permanent


def counted(error: BaseException):
    calls = []

    def call():
        calls.append(1)
        raise error

    return call, calls


@pytest.mark.parametrize("error", [
    MlflowException("'Param key' exceeds the maximum length of 250 characters", error_code=INVALID_PARAMETER_VALUE),
    RestException({"error_code": "BAD_REQUEST", "message": "value too long for type character varying(8000)"}),
    RestException({"error_code": "RESOURCE_LIMIT_EXCEEDED", "message": "too many params"}),
    MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 413 != 200. "
                    "Response body: '<html>Request Entity Too Large</html>'"),
], ids=["mlflow-validation", "bad-request", "resource-limit", "proxy-413"])
def test_a_refusal_of_the_tracking_store_is_raised_at_once(error):
    call, calls = counted(error)
    with pytest.raises(MlflowException):
        store.retrying(call, "a write", deadline_s=10, first_wait_s=0.01)
    assert len(calls) == 1 and store.refused_by_store(error)


@pytest.mark.parametrize("error", [
    MlflowException("rate limited", error_code=REQUEST_LIMIT_EXCEEDED),
    RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}),
    MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 502 != 200. "
                    "Response body: 'Bad Gateway'"),
    ConnectionError("refused"),
], ids=["rate-limit", "unavailable", "proxy-502", "connection"])
def test_an_outage_is_still_retried(error):
    call, calls = counted(error)
    with pytest.raises(type(error)):
        store.retrying(call, "a write", deadline_s=0.2, first_wait_s=0.01)
    assert len(calls) > 1 and not store.refused_by_store(error)


def test_a_run_created_by_a_call_that_then_timed_out_is_not_created_twice(tmp_path: Path, monkeypatch):
    client = MlflowClient(store.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    exp = store.ensure_experiment(client, "ambiguous")
    create, lost = client.create_run, []

    def create_then_time_out(*args, **kwargs):
        run = create(*args, **kwargs)
        if not lost:  # the server made the run; its answer never came back
            lost.append(run.info.run_id)
            raise ConnectionError("read timed out")
        return run

    monkeypatch.setattr(client, "create_run", create_then_time_out)
    run_id = store.retrying(lambda: store.open_trial_run(client, exp, "parent", "sw-1", 1, {"lr": 0.1}, "k1", 1,
                                                         tags={}),
                            "creating the trial's run", deadline_s=10, first_wait_s=0.01)
    assert run_id == lost[0]
    assert [r.info.run_id for r in client.search_runs([exp])] == [run_id]
    # The next attempt of the same trial, or another sweep's, is a run of its own.
    assert store.open_trial_run(client, exp, "parent", "sw-1", 1, {"lr": 0.1}, "k1", 2, tags={}) != run_id
    assert store.open_trial_run(client, exp, "parent", "sw-2", 1, {"lr": 0.1}, "k1", 1, tags={}) != run_id


class NeverTrains:
    def run(self, *args, **kwargs):
        raise AssertionError("the trial trained although its run was refused")


def trial_job(url: str, exp: str, parent: str, hparams: dict, tmp_path: Path) -> TrialJob:
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("x,y\n1,0\n")
    return TrialJob(sweep_id="sw-refused", experiment_id=exp, parent_run_id=parent, tracking_uri=url, index=1,
                    hparams=hparams, trial_key=f"key-{time.time_ns()}", attempt=1, settings={},
                    train=str(tmp_path / "train.csv"), val=str(tmp_path / "val.csv"),
                    entrypoint="tests.trainers:sleepy", work_dir=str(tmp_path / "work"))


def test_a_trial_whose_param_the_store_refuses_fails_for_good_in_its_one_run(tmp_path: Path):
    url = store.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(url)
    exp = store.ensure_experiment(client, "refused")
    parent = store.start_parent_run(client, exp, "sw-refused", {})
    job = trial_job(url, exp, parent, {"k" * 300: 1}, tmp_path)
    result = execute_trial(job, (), NeverTrains())
    assert not result.outcome.ok and not result.outcome.retryable, result.outcome
    assert "exceeds the maximum length of 250" in result.outcome.reason
    run = client.get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags[store.TAG_RETRYABLE] == "false"
    assert len(client.search_runs([exp], "tags.`hpsweep.role` = 'trial'")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("hparams, message", [
    ({"k" * 300: 1}, "exceeds the maximum length of 250"),  # MLflow's validation refuses the param
    ({"v": "x" * 9000}, "BAD_REQUEST"),  # PostgreSQL refuses the hparams tag (varchar(8000))
], ids=["300-char-key", "9000-char-value"])
def test_a_trial_the_tracking_server_refuses_fails_once_for_good_with_at_most_one_run(
        mlflow_server, tmp_path: Path, monkeypatch, hparams: dict, message: str):
    client = MlflowClient(mlflow_server.url)
    exp = store.ensure_experiment(client, f"refused-{time.time_ns()}")
    parent = store.start_parent_run(client, exp, "sw-refused", {})
    creations = []
    create = MlflowClient.create_run

    def create_once(self, *args, **kwargs):
        creations.append(1)
        if len(creations) > 1:
            pytest.fail("a second run was created for the same trial")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_once)
    job = trial_job(mlflow_server.url, exp, parent, hparams, tmp_path)
    result = execute_trial(job, (), NeverTrains())
    assert not result.outcome.ok and not result.outcome.retryable, result.outcome
    assert message in result.outcome.reason and "tracking store refused" in result.outcome.reason
    trial_runs = client.search_runs([exp], f"tags.`hpsweep.trial_key` = '{job.trial_key}'")
    assert len(trial_runs) <= 1 and all(r.info.status == "FAILED" for r in trial_runs)
    assert [r.info.run_id for r in trial_runs] == ([result.run_id] if result.run_id else [])


# ---------------------------------------------------------------- back-off


def test_mlflows_http_back_off_is_capped_unless_the_user_set_it(monkeypatch):
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError
    from urllib3.util import Retry

    for name in retry.CLIENT_BACKOFF:
        monkeypatch.delenv(name, raising=False)
    store.resolve_tracking_uri("http://127.0.0.1:9")  # any command's first step
    env = {name: os.environ[name] for name in retry.CLIENT_BACKOFF}
    n, factor, jitter = (int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
                         float(env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"]))
    # The sleeps MLflow's client (urllib3) takes between tries of one request while the server is down.
    attempt, sleeps = Retry(total=n, connect=n, backoff_factor=factor, backoff_jitter=jitter), []
    with pytest.raises(MaxRetryError):
        while True:
            attempt = attempt.increment("POST", "/api/2.0/mlflow/runs/create", error=ConnectTimeoutError())
            sleeps.append(attempt.get_backoff_time())
    # Once the server answers, the next try comes after at most one of those sleeps or one tenacity wait.
    assert max(sleeps) <= 10 and retry.MAX_WAIT_S <= 10, sleeps

    user = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}
    retry.cap_client_backoff(user)
    assert user["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9" and user["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"


class FlakyClient:
    """An MLflow client whose store is down for the first ``down`` calls."""

    def __init__(self, down: int, error: Exception):
        self.calls, self.down, self.error = 0, down, error

    def get_experiment_by_name(self, name: str):
        self.calls += 1
        if self.calls <= self.down:
            raise self.error
        return None


def test_the_sweeps_store_calls_wait_out_an_outage_but_not_their_own_mistakes():
    from hpsweep.store import SweepStore

    outage = FlakyClient(down=2, error=ConnectionError("connection refused"))
    assert SweepStore(outage, patience_s=60).experiment_id("x") is None and outage.calls == 3
    mistake = FlakyClient(down=5, error=ValueError("a name with both quote kinds"))
    with pytest.raises(ValueError):
        SweepStore(mistake, patience_s=60).experiment_id("x")
    assert mistake.calls == 1


def test_the_store_lock_admits_one_holder_at_a_time_though_each_holder_removes_it(tmp_path: Path):
    """The holder removes the lock file on release: a waiter holding the removed file must not
    count as a holder (it tries again), so the critical section never has two at once."""
    import threading

    db, inside, most, rounds = tmp_path / "mlflow.db", [0], [0], []
    guard = threading.Lock()

    def contend() -> None:
        for _ in range(25):
            with uri.store_lock(db):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1
                rounds.append(1)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rounds) == 150 and most[0] == 1
    assert not uri.lock_path(db).exists()


def test_a_sweep_without_a_trainer_account_never_loads_mlflows_auth_client(tmp_path: Path):
    """The embedded default is installed without `mlflow[auth]` (README's first command): granting a
    trainer account must not import MLflow's auth client unless one is configured (the demo died on it)."""
    code = ("import sys, os; os.environ.pop('HPSWEEP_TRAINER_USERNAME', None)\n"
            "from hpsweep.store.grants import grant_trainer\n"
            "assert grant_trainer('http://127.0.0.1:1', '1') is False\n"
            "print('mlflow.server.auth' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
