"""hpsweep.store against a real MLflow store (a temporary SQLite file, no server): checked state
changes, quoted filters, paging, zombies, reuse lookups and the one retry policy."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from hpsweep import store
from hpsweep.identity import process_identity
from hpsweep.model import IllegalTransition, Outcome, TrialState
from hpsweep.store import runs
from hpsweep.store.filters import quote

VERSIONS = {"hpsweep.spec_hash": "s1", "hpsweep.data_version": "d1", "hpsweep.code_version": "c1"}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return MlflowClient(store.resolve_tracking_uri(uri))


@pytest.fixture
def exp(client) -> str:
    return store.ensure_experiment(client, f"exp-{time.time_ns()}")


def trial(client, exp, sweep_id="sw-1", index=1, key="k1", tags=None) -> str:
    return store.start_trial_run(client, exp, "parent", sweep_id, index, {"lr": index / 10}, key, 1,
                                 tags={**VERSIONS, **(tags or {})})


def test_quote_picks_the_quote_the_value_lacks_and_refuses_both():
    assert quote("plain") == "'plain'"
    assert quote("it's") == '"it\'s"'
    with pytest.raises(ValueError, match="both kinds of quote"):
        quote("""it's "x\"""")


def test_a_sweep_id_with_a_quote_finds_its_own_trials_only(client, exp):
    mine = trial(client, exp, sweep_id="o'brien-1")
    trial(client, exp, sweep_id="other' or '1'='1")
    assert [r.run_id for r in store.sweep_trials(client, exp, "o'brien-1")] == [mine]


def test_a_finished_trial_run_is_never_reopened_nor_finished_again(client, exp):
    run_id = trial(client, exp)
    store.finish_trial_run(client, run_id, Outcome(True, 0.8, started_at=1, ended_at=2))
    assert store.state_of(client.get_run(run_id)) is TrialState.FINISHED
    with pytest.raises(IllegalTransition, match="FINISHED → RUNNING"):
        store.reopen_trial_run(client, run_id, 2)
    with pytest.raises(IllegalTransition, match="FINISHED → FAILED"):
        store.finish_trial_run(client, run_id, Outcome(False, None, "late"))
    assert client.get_run(run_id).data.metrics["f1"] == 0.8


def test_a_failed_trial_run_is_reopened_for_its_next_attempt_with_the_reason_logged(client, exp):
    run_id = trial(client, exp)
    store.finish_trial_run(client, run_id, Outcome(False, None, "killed by SIGKILL", retryable=True, killed=True))
    assert store.state_of(client.get_run(run_id)) is TrialState.KILLED
    store.reopen_trial_run(client, run_id, 2)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[store.TAG_ATTEMPT] == "2"
    assert run.data.tags[store.TAG_ATTEMPT_LOG] == "attempt 1: killed by SIGKILL"
    store.finish_trial_run(client, run_id, Outcome(True, 0.7))
    row = store.trial_row(client.get_run(run_id))
    assert (row.state, row.f1, row.attempt) == (TrialState.FINISHED, 0.7, 2)


def test_zombies_are_found_across_pages_and_killed(client, exp, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = process_identity(dead.pid)
    dead.wait()
    ids = [trial(client, exp, index=i, key=f"z{i}") for i in range(1, 6)]
    for run_id in ids:
        runs.set_tags(client, run_id, {store.TAG_OWNER: dead_owner})
    alive = trial(client, exp, index=9, key="alive")  # owned by this live process, fresh heartbeat
    monkeypatch.setattr(runs, "PAGE", 2)
    assert sorted(store.reap_zombies(client, exp, stale_after_s=3600)) == sorted(ids)
    assert {client.get_run(i).info.status for i in ids} == {"KILLED"}
    assert "zombie: its process died" in client.get_run(ids[0]).data.tags[store.TAG_REASON]
    assert client.get_run(alive).info.status == "RUNNING"


def test_a_silent_run_of_another_host_is_a_zombie_after_the_heartbeat_window(client, exp):
    run_id = trial(client, exp)
    runs.set_tags(client, run_id, {store.TAG_OWNER: "elsewhere:1:1", store.TAG_HEARTBEAT: f"{time.time() - 600:.0f}"})
    assert store.reap_zombies(client, exp, stale_after_s=120) == [run_id]


def test_reuse_takes_the_newest_finished_run_of_each_key_under_the_same_versions(client, exp):
    old = trial(client, exp, key="k")
    store.finish_trial_run(client, old, Outcome(True, 0.5))
    new = trial(client, exp, key="k")
    store.finish_trial_run(client, new, Outcome(True, 0.6))
    failed = trial(client, exp, key="f")
    store.finish_trial_run(client, failed, Outcome(False, None, "boom"))
    found = runs.finished_trials_by_key(client, exp, {"k", "f"}, VERSIONS)
    assert list(found) == ["k"] and found["k"].run_id == new and found["k"].f1 == 0.6
    assert runs.finished_trials_by_key(client, exp, {"k"}, {**VERSIONS, "hpsweep.code_version": "c2"}) == {}
    assert runs.unfinished_trial_keys(client, exp, {"k", "f"}, VERSIONS) == {"f"}


def test_retrying_outlasts_a_transient_error_and_raises_permanent_ones_at_once():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("server restarting")
        return "ok"

    assert store.retrying(flaky, "a flaky call", deadline_s=10, first_wait_s=0.01) == "ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    with pytest.raises(MlflowException):
        store.retrying(missing, "a lookup", deadline_s=10, first_wait_s=0.01)
    assert len(calls) == 1

    def illegal():
        calls.append(1)
        raise IllegalTransition("FINISHED → RUNNING")

    calls.clear()
    with pytest.raises(IllegalTransition):
        store.retrying(illegal, "a reopen", deadline_s=10, first_wait_s=0.01)
    assert len(calls) == 1


def test_the_parent_run_is_found_by_a_quoted_sweep_id(client, exp):
    parent = store.start_parent_run(client, exp, "sweep-'q'", {})
    assert store.latest_parent_run(client, [exp], "sweep-'q'").info.run_id == parent
    assert store.latest_parent_run(client, [exp], "sweep-'q' or '1'='1") is None


def test_a_trial_run_shows_its_hparams_and_the_specs_settings_as_params(client, exp):
    run_id = store.start_trial_run(client, exp, "parent", "sw", 1, {"lr": 0.1, "seed": 7}, "k", 1, tags=VERSIONS,
                                   settings={"seed": 0, "epochs": 10})
    assert client.get_run(run_id).data.params == {"lr": "0.1", "seed": "7", "settings.seed": "0",
                                                  "settings.epochs": "10"}


def test_the_experiment_carries_a_runs_view_with_the_f1_columns_and_the_ui_url_opens_it(client, exp):
    import json

    tags = client.get_experiment(exp).tags
    view = json.loads(tags["mlflow.sharedViewState.hpsweep"])  # what MLflow's "Share" button would store
    assert {"metrics.`f1`", "metrics.`best_f1`"} <= set(view["selectedColumns"])
    # MLflow 3.17 opens experiments on the GenAI pages unless the URL asks for the runs table.
    assert store.ui_url("http://10.0.0.5:5000/", exp) == (
        f"http://10.0.0.5:5000/#/experiments/{exp}/runs?viewStateShareKey=hpsweep&workflowType=machine_learning")
    assert store.ui_url("sqlite:///x/mlflow.db", exp).startswith(f"http://127.0.0.1:5000/#/experiments/{exp}/runs?")
