"""`hpsweep status`: the pure summary (states, ETA by list scheduling), the command on a sweep
running in another process (real Prefect server, SQLite store in WAL mode), and unknown sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.report.status import SweepRecord, eta_s, summarize
from tests.conftest import Project, stop
from tests.test_plan import write_inputs
from tests.test_sweep_e2e import SLEEPY_SPEC


def record(status: str = "RUNNING", **params: str) -> SweepRecord:
    return SweepRecord(name="s", experiment_id="1", sweep_id="s-1", parent_run_id="p", parent_status=status,
                       started_at=1000.0, ended_at=None, tags={"hpsweep.heartbeat": "1095"},
                       params={"slots": "2", **params})


def run_row(index: int, mlflow_status: str, status: str, **extra) -> dict:
    return {"run_id": f"r{index}", "index": index, "hparams": {"i": index}, "mlflow_status": mlflow_status,
            "status": status, "attempt": 1, "f1": extra.pop("f1", None), "duration_s": extra.pop("duration_s", None),
            "reason": extra.pop("reason", None), "started_at": extra.pop("started_at", 1000.0),
            "heartbeat": extra.pop("heartbeat", 1095.0)}


def test_summary_counts_every_state_and_schedules_the_rest_for_the_eta():
    plan = [{"index": i, "hparams": {"i": i}, "reused_run_id": "old" if i == 6 else None,
             "expected_duration_s": None, "dispatch_position": i} for i in range(1, 7)]
    runs = [run_row(1, "FINISHED", "FINISHED", f1=0.9, duration_s=30.0),
            run_row(2, "FAILED", "FAILED", reason="boom"),
            run_row(3, "RUNNING", "RUNNING", started_at=1090.0),  # 10 s in
            run_row(4, "RUNNING", "RUNNING", started_at=1000.0, heartbeat=900.0)]  # silent for 200 s
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
