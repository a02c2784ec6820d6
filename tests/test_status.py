"""`hpsweep status`: the pure summary (states, ETA by list scheduling), finding a sweep by name or id
(quoted into MLflow's filter), Prefect's view, the command on a sweep running in another process
(real Prefect server, SQLite store in WAL mode), and unknown sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.model import TrialRow, TrialState
from hpsweep.report.status import (STATE_WORDS, SweepNotFound, SweepRecord, eta_s, find_sweep, prefect_state,
                                   render, summarize)
from tests.conftest import Project, stop
from tests.test_plan import write_inputs
from tests.test_sweep_e2e import SLEEPY_SPEC


def record(status: str = "RUNNING", **params: str) -> SweepRecord:
    return SweepRecord(name="s", experiment_id="1", sweep_id="s-1", parent_run_id="p", parent_status=status,
                       started_at=1000.0, ended_at=None, tags={"hpsweep.heartbeat": "1095"},
                       params={"slots": "2", **params})


def run_row(index: int, state: TrialState, **extra) -> TrialRow:
    return TrialRow(run_id=f"r{index}", index=index, hparams={"i": index}, state=state, attempt=1,
                    f1=extra.pop("f1", None), duration_s=extra.pop("duration_s", None), reason=extra.pop("reason", None),
                    started_at=extra.pop("started_at", 1000.0), heartbeat=extra.pop("heartbeat", 1095.0))


def plan_rows(n: int, reused: int | None = None) -> list[TrialRow]:
    """The sweep's plan.json read back: ``n`` trials, ``reused`` standing in from an earlier run."""
    return [TrialRow.from_plan_entry({"index": i, "hparams": {"i": i}, "reused_run_id": "old" if i == reused else None,
                                      "expected_duration_s": None, "dispatch_position": i}) for i in range(1, n + 1)]


def test_summary_counts_every_state_and_schedules_the_rest_for_the_eta():
    plan = plan_rows(6, reused=6)
    runs = [run_row(1, TrialState.FINISHED, f1=0.9, duration_s=30.0),
            run_row(2, TrialState.FAILED, reason="boom"),
            run_row(3, TrialState.RUNNING, started_at=1090.0),  # 10 s in
            run_row(4, TrialState.RUNNING, started_at=1000.0, heartbeat=900.0)]  # silent for 200 s
    status = summarize(record(), plan, runs, now=1100.0, stale_after_s=120.0, prefect="Running")
    assert status["counts"] == {"running": 1, "stale": 1, "queued": 1, "done": 1, "failed": 1, "reused": 1,
                                "never started": 0}
    assert status["state"] == "running" and status["elapsed_s"] == 100.0
    # No estimates in the plan: the median finished trial (30 s). Two slots: the running trial
    # has 20 s left, the queued one starts on the free slot at 0 -> 30 s.
    assert status["eta_s"] == 30.0
    assert [t["state"] for t in status["trials"]] == ["done", "failed", "running", "stale", "queued", "reused"]
    assert status["best"]["index"] == 1

    # A finished parent: what never ran is "never started", and there is no ETA.
    over = summarize(record("FAILED"), plan, runs[:2], now=1100.0, stale_after_s=120.0)
    assert over["state"] == "finished with failures" and over["eta_s"] is None
    assert over["counts"]["never started"] == 3


def test_the_best_trial_is_shown_with_its_rank_and_its_place_in_the_file():
    runs = [run_row(i, TrialState.FINISHED, f1=f1, duration_s=5.0) for i, f1 in ((1, 0.5), (2, 0.7), (3, 0.9))]
    status = summarize(record(), plan_rows(4), runs, now=1100.0, stale_after_s=120.0)
    assert (status["best"]["index"], status["best"]["ranked"]) == (3, 3)
    assert "  best        F1 0.9000, rank 1 of 3 finished: i=3 (combination 3 in the file)" in render(status)
    assert "#" not in render(status)  # a bare `#3` reads like a rank


def test_a_sweep_silent_for_two_of_its_heartbeats_is_not_responding():
    """The sweep's own interval (on its parent run), not the reader's: kill -9 shows within two beats."""
    tags = {"hpsweep.heartbeat": "1000", "hpsweep.heartbeat_s": "5"}
    beating = SweepRecord(**{**record().__dict__, "tags": tags})
    assert summarize(beating, plan_rows(2), [], now=1009.0, stale_after_s=120.0)["state"] == "running"
    status = summarize(beating, plan_rows(2), [], now=1011.0, stale_after_s=120.0)
    assert status["state"] == "not responding (no heartbeat for 11 s: orchestrator killed?)"
    assert "ETA" in render(status)  # still what was left when it went silent


def test_a_starting_sweep_says_so():
    starting = SweepRecord(**{**record().__dict__, "tags": {"hpsweep.heartbeat": "1095", "hpsweep.status": "STARTING"}})
    status = summarize(starting, None, [], now=1100.0, stale_after_s=120.0)
    assert status["state"] == "starting" and status["eta_s"] is None
    assert render(status).splitlines()[:2] == ["sweep s-1 (s): starting, 100.0 s elapsed",
                                               "  trials      not planned yet (Prefect and the plan are being set up)"]


def test_every_trial_state_has_the_word_status_shows():
    assert set(STATE_WORDS) == set(TrialState)
    plan = plan_rows(7, reused=7)
    runs = [run_row(1, TrialState.FINISHED, f1=0.8, duration_s=5.0), run_row(2, TrialState.FAILED, reason="boom"),
            run_row(3, TrialState.KILLED, reason="time limit"), run_row(4, TrialState.RUNNING),
            run_row(5, TrialState.RUNNING, heartbeat=900.0)]  # 6: no run yet; 7: reused
    words = {t["index"]: t["state"] for t in summarize(record(), plan, runs, 1100.0, 120.0)["trials"]}
    assert words == {1: "done", 2: "failed", 3: "failed", 4: "running", 5: "stale", 6: "queued", 7: "reused"}
    over = summarize(record("KILLED"), plan, runs, 1100.0, 120.0)
    assert over["state"] == "killed" and {t["index"]: t["state"] for t in over["trials"]}[6] == "never started"
    assert list(over["counts"]) == ["running", "stale", "queued", "done", "failed", "reused", "never started"]
    # `hpsweep status --json`: the same keys per trial as ever (elapsed_s only while it runs).
    trials = {t["index"]: t for t in over["trials"]}
    base = ["index", "hparams", "run_id", "expected_duration_s", "attempt", "f1", "duration_s", "reason"]
    assert list(trials[1]) == list(trials[6]) == base + ["state"] and list(trials[4]) == base + ["elapsed_s", "state"]
    assert (trials[3]["reason"], trials[7]["run_id"], trials[6]["run_id"]) == ("time limit", "old", None)
    assert list(over) == ["sweep_id", "name", "parent_run_id", "experiment_id", "state", "prefect", "dispatch_order",
                          "started_at", "ended_at", "elapsed_s", "total", "counts", "eta_s", "best", "trials",
                          "reason"]


def test_a_trial_early_stopping_stopped_is_counted_stopped_not_failed():
    runs = [run_row(1, TrialState.FINISHED, f1=0.9, duration_s=5.0),
            run_row(2, TrialState.STOPPED, f1=0.3, reason="stopped at step 3: val_f1 0.3000 < median 0.8000 of 3 trials")]
    status = summarize(record("FINISHED"), plan_rows(2), runs, 1100.0, 120.0)
    assert [t["state"] for t in status["trials"]] == ["done", "stopped"]
    assert status["counts"]["stopped"] == 1 and status["counts"]["failed"] == 0


def test_a_sweep_that_crashed_says_so_and_why():
    crash = "hpsweep failed: IsADirectoryError: [Errno 21] Is a directory: 'data/shards'"
    crashed = SweepRecord(**{**record("FAILED").__dict__, "tags": {"hpsweep.reason": crash}})
    status = summarize(crashed, plan_rows(2), [run_row(1, TrialState.FAILED, reason=crash)], 1100.0, 120.0)
    assert status["state"] == f"crashed: {crash}" and status["reason"] == crash
    assert render(status).splitlines()[0].startswith(f"sweep s-1 (s): crashed: {crash}, ")
    # A sweep that ran to its end with failed trials is not a crash.
    assert summarize(record("FAILED"), plan_rows(2), [], 1100.0, 120.0)["state"] == "finished with failures"
    long = SweepRecord(**{**crashed.__dict__, "tags": {"hpsweep.reason": "RuntimeError: x\n" + "y" * 5000}})
    status = summarize(long, None, [], 1100.0, 120.0)
    assert status["state"] == "crashed: RuntimeError: x" and status["reason"].endswith("y" * 5000)
    assert "  why         RuntimeError: x" in render(status)  # the rest of it, under the state line


def test_a_sweep_without_a_plan_is_summarized_from_its_runs():
    runs = [run_row(2, TrialState.FINISHED, f1=0.5, duration_s=3.0), run_row(1, TrialState.RUNNING)]
    status = summarize(record(), None, runs, 1100.0, 120.0)
    assert [(t["index"], t["state"]) for t in status["trials"]] == [(1, "running"), (2, "done")]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory):
    from hpsweep.store import SweepStore

    return SweepStore(MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"))


def test_a_sweep_name_or_id_with_a_quote_is_found_and_cannot_widen_the_search(sweep_store):
    from hpsweep.store.runs import start_parent_run

    client = sweep_store.client
    for name in ("o'brien", 'say "hi"', "plain"):
        exp = sweep_store.ensure_experiment(name)
        for n in (1, 2):
            start_parent_run(client, exp, f"{name}-20260101-00000{n}-abcdef", {})
    assert find_sweep(sweep_store, "o'brien").sweep_id == "o'brien-20260101-000002-abcdef"  # by name: the latest
    found = find_sweep(sweep_store, "o'brien-20260101-000001-abcdef")  # by id
    assert (found.name, found.sweep_id) == ("o'brien", "o'brien-20260101-000001-abcdef")
    assert find_sweep(sweep_store, 'say "hi"-20260101-000001-abcdef').name == 'say "hi"'
    for crafted in ("x' or tags.`hpsweep.role` = 'sweep", "nope-1-2-3' or attributes.status != 'x",
                    "both ' and \"-1-2-3", "' OR '1'='1"):
        with pytest.raises(SweepNotFound, match="no sweep named or with id"):
            find_sweep(sweep_store, crafted)
    sweep_store.ensure_experiment("empty")
    with pytest.raises(SweepNotFound, match="has no executions"):
        find_sweep(sweep_store, "empty")


def test_closing_a_crashed_sweep_leaves_no_run_of_it_running(project: Project):
    """What the sweep's crash path calls: every run it left RUNNING is closed FAILED with the reason,
    and `hpsweep status` then says the sweep crashed, and why (not "not responding")."""
    from hpsweep.model import Outcome
    from hpsweep.store import SweepStore
    from hpsweep.store.runs import start_parent_run, start_trial_run

    store = SweepStore(MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}"))
    client = store.client
    exp = store.ensure_experiment("crashy")
    parent = start_parent_run(client, exp, "crashy-20260101-000000-abcdef", {})
    other = start_parent_run(client, exp, "crashy-20260101-000001-abcdef", {})  # another sweep, still running
    trial = {i: start_trial_run(client, exp, parent, "crashy-20260101-000000-abcdef", i, {"i": i}, f"k{i}", 1, {})
             for i in (1, 2, 3)}
    theirs = start_trial_run(client, exp, other, "crashy-20260101-000001-abcdef", 1, {"i": 1}, "k1", 1, {})
    store.finish_trial_run(trial[1], Outcome(True, 0.9, started_at=1.0, ended_at=2.0))

    crash = "hpsweep failed: IsADirectoryError: [Errno 21] Is a directory: 'data/shards'"
    closed = store.close_sweep_runs(exp, "crashy-20260101-000000-abcdef", parent, crash)
    assert sorted(closed) == sorted([trial[2], trial[3], parent])
    runs = {i: client.get_run(r) for i, r in trial.items()}
    assert runs[1].info.status == "FINISHED"  # what ended keeps its end
    for i in (2, 3):
        assert runs[i].info.status == "FAILED" and runs[i].data.tags["hpsweep.reason"] == crash
        assert runs[i].data.tags["hpsweep.status"] == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["hpsweep.reason"] == crash
    assert client.get_run(other).info.status == client.get_run(theirs).info.status == "RUNNING"
    assert store.close_sweep_runs(exp, "crashy-20260101-000000-abcdef", parent, "again") == []

    result = status(project, "crashy-20260101-000000-abcdef")
    assert result.returncode == 0, result.stderr
    assert f"crashy-20260101-000000-abcdef (crashy): crashed: {crash}" in result.stdout
    assert "2 failed" in result.stdout and "not responding" not in result.stdout
    as_json = json.loads(status(project, "crashy-20260101-000000-abcdef", "--json").stdout)
    assert (as_json["state"], as_json["reason"]) == (f"crashed: {crash}", crash)


def test_prefect_state_asks_prefects_api_and_never_raises():
    import threading
    import uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect.settings import PREFECT_API_URL, temporary_settings

    asked = []

    class FlowRuns(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps({"id": self.path.rsplit("/", 1)[-1], "flow_id": str(uuid.uuid4()),
                               "state": {"type": "RUNNING", "name": "Running"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FlowRuns)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, flow_run = f"http://127.0.0.1:{server.server_port}/api", str(uuid.uuid4())
    try:
        assert prefect_state(flow_run, url) == "Running" and asked == [f"/api/flow_runs/{flow_run}"]
    finally:
        server.shutdown()
        server.server_close()
    assert prefect_state(flow_run, url) == f"unknown (Prefect API at {url} not reachable: ConnectError)"
    assert prefect_state("not-a-flow-run-id", url).startswith("unknown (Prefect API at ")
    assert prefect_state(None, url) == "unknown (the sweep recorded no flow run)"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API: never a temporary one of its own
        assert prefect_state(flow_run).startswith("unknown (PREFECT_API_URL not set")


def test_eta_uses_the_plan_estimates_and_is_unknown_without_any():
    trials = [{"state": "running", "expected_duration_s": 50.0, "elapsed_s": 20.0, "duration_s": None},
              {"state": "queued", "expected_duration_s": 40.0, "duration_s": None},
              {"state": "queued", "expected_duration_s": 10.0, "duration_s": None}]
    assert eta_s(trials, 1) == 30 + 40 + 10
    assert eta_s(trials, 2) == 40  # slot A: 30 then 10 -> 40; slot B: 40
    assert eta_s([{**t, "expected_duration_s": None} for t in trials], 2) is None


def status(project: Project, *args: str) -> subprocess.CompletedProcess:
    return project.hpsweep("status", *args, timeout=300)


def test_status_of_an_unknown_sweep_says_so(project: Project):
    result = status(project, "nope")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: no MLflow store at ") and project.state_written() == []
    MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}").create_experiment("other")
    result = status(project, "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: no sweep named or with id 'nope' in sqlite:///{project.root / 'mlflow.db'}"
    result = project.hpsweep("report", "other", timeout=300)  # an experiment with no sweep in it
    assert result.returncode == 2 and "has no executions" in result.stderr


@pytest.mark.slow
def test_status_while_a_sweep_runs_in_another_process(served_project: Project):
    project = served_project
    write_inputs(project, [{"f1": 0.5, "sleep_s": 8}, {"f1": 0.6, "sleep_s": 8}, {"f1": 0.7, "sleep_s": 8}],
                 SLEEPY_SPEC.format(name="watched", sleep_s=1, gpus=1))
    sweep = subprocess.Popen(
        [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "params/combinations.yaml", "--spec",
         "params/spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1"],
        cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        seen, answers = None, []
        while time.monotonic() < deadline and sweep.poll() is None:
            result = status(project, "watched", "--json")
            answers.append(f"exit {result.returncode}: {(result.stdout or result.stderr)[-500:]}")
            if result.returncode == 0:
                snapshot = json.loads(result.stdout)
                if snapshot["counts"]["running"] == 1 and snapshot["counts"]["done"] < 3:
                    seen = snapshot
                    break
            time.sleep(0.5)
        assert seen is not None, ("never saw a running trial; status said:\n" + "\n".join(answers[-5:])
                                  + f"\nthe sweep (exit {sweep.poll()}) said:\n" + (sweep.stdout.read()[-3000:] if sweep.poll() is not None else ""))
        assert seen["state"] == "running" and seen["total"] == 3 and seen["counts"]["failed"] == 0
        assert seen["counts"]["running"] + seen["counts"]["queued"] + seen["counts"]["done"] == 3
        assert seen["prefect"] == "Running"  # the flow run's state, from the real Prefect server
        running = [t for t in seen["trials"] if t["state"] == "running"]
        assert running[0]["run_id"] and running[0]["elapsed_s"] >= 0
        output, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, output
    finally:
        stop(sweep)
    done = status(project)  # default: params.yaml's sweep name; none here, so name it
    assert done.returncode == 2 and "params.yaml has no sweep.name" in done.stderr
    project.write("params.yaml", "sweep:\n  name: watched\n")
    done = status(project)
    assert done.returncode == 0, done.stderr
    assert "watched" in done.stdout and ": finished" in done.stdout
    assert "3: 0 running, 0 queued, 3 done, 0 failed" in done.stdout


@pytest.mark.slow
def test_status_sees_a_sweep_from_its_start_and_a_start_that_fails_closes_it(project: Project):
    """The parent run is written before Prefect is asked anything. Here Prefect's API accepts the
    connection and never answers, so the sweep stays in its start-up for as long as the test wants."""
    import socket

    write_inputs(project, [{"f1": 0.5, "sleep_s": 0}], SLEEPY_SPEC.format(name="early", sleep_s=0, gpus=1))
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # listens, never accepts
    env = {**project.env, "PREFECT_API_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/api",
           "PREFECT_API_REQUEST_TIMEOUT": "600", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "params/combinations.yaml", "--spec",
         "params/spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv"],
        cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sweep.poll() is None:
            result = status(project, "early")
            answers.append(result.stdout + result.stderr)
            if result.returncode == 0:
                break
            time.sleep(0.5)
        seen = answers[-1] if answers else ""
        told = sweep.stdout.read() if sweep.poll() is not None else ""
        assert "sweep early-" in seen and ": starting, " in seen and "not planned yet" in seen, \
            f"{answers[-3:]}\nthe sweep (exit {sweep.poll()}): {told}"
        sweep_id = seen.split()[1]
        assert status(project, "early").stdout.startswith(f"sweep {sweep_id} (early): starting, ")  # still there
    finally:
        silent.close()  # Prefect's API goes away: the start-up fails
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 3, output
    after = status(project, "early")
    assert ": crashed: hpsweep failed: " in after.stdout, after.stdout + after.stderr + output
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    assert (parent.info.status, parent.data.tags["hpsweep.status"]) == ("FAILED", "FAILED")
