"""Early stopping end to end (issue 17): real sweeps through the CLI, real Prefect and MLflow."""

from __future__ import annotations

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TESTS, Project
from tests.test_sweep_e2e import leaderboard, records, run_sweep

pytestmark = pytest.mark.slow

# Decisions within a fraction of a reference epoch (the defaults, 5 s, suit hour-long trials).
FAST_POLLS = {"HPSWEEP_EARLY_STOP_POLL_S": "0.3", "HPSWEEP_STOP_POLL_S": "0.3"}

REFERENCE_SPEC = """
name: {name}
trainer: {{entrypoint: 'trainer.reference:train'}}
settings: {{epochs: 8, seed: 0, epoch_sleep_s: 0.6}}
resources: {{gpus: 1}}
"""
GOOD = [{"hidden": 32, "lr": 0.01}, {"hidden": 64, "lr": 0.01}, {"hidden": 32, "lr": 0.003}]
BAD = [{"hidden": 32, "lr": 0.0001}, {"hidden": 16, "lr": 0.0001}]


def client(project: Project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")


def steps_of(project: Project, run_id: str) -> list[int]:
    return sorted(m.step for m in client(project).get_metric_history(run_id, "val_f1"))


def test_median_stops_the_bad_combinations_and_a_rerun_resumes_them_from_their_checkpoints(
        served_project: Project):
    project = served_project
    # The exhaustive sweep first (its own experiment): what early stopping is measured against.
    full = run_sweep(project, GOOD + BAD, REFERENCE_SPEC.format(name="full"), 1, env=FAST_POLLS)
    assert full.returncode == 0, full.stderr
    exhaustive = leaderboard(project, "full")

    spec = REFERENCE_SPEC.format(name="median")
    # The good combinations first, then a follow-up sweep adding the bad ones with early stopping: its
    # median compares them with the reused trials' curves, whatever order the shuffle starts them in
    # (a trial that starts before 3 others reached its step cannot be judged).
    first = run_sweep(project, GOOD, spec, 1, env=FAST_POLLS)
    assert first.returncode == 0, first.stderr
    early = run_sweep(project, GOOD + BAD, spec, 1, "--early-stop", "median", "--early-stop-min-steps", "2",
                      env=FAST_POLLS)
    assert early.returncode == 0, early.stderr  # stopped trials are not failures
    board = leaderboard(project, "median")
    rows = {json.dumps(r["hparams"], sort_keys=True): r for r in board["rows"]}
    for hp in BAD:
        row = rows[json.dumps(hp, sort_keys=True)]
        assert row["status"] == "STOPPED", row
        assert row["stop_reason"].startswith(f"stopped at step {row['stopped_at_step']}: val_f1 ")
        assert "< median" in row["stop_reason"] and row["stop_reason"].endswith(("of 3 trials", "of 4 trials"))
        assert 2 <= row["stopped_at_step"] < 8 and row["f1"] is not None
        run = client(project).get_run(row["run_id"])
        assert (run.info.status, run.data.tags["hpsweep.status"]) == ("KILLED", "STOPPED")
        assert run.data.tags["hpsweep.reason"] == row["stop_reason"]
        assert max(steps_of(project, row["run_id"])) < 8  # it did not train to the end
    assert [r["status"] for r in board["rows"]] == ["REUSED"] * 3 + ["STOPPED"] * 2  # below every FINISHED one
    assert board["counts"] == {"total": 5, "finished": 0, "failed": 0, "reused": 3, "stopped": 2}
    assert board["rows"][0]["hparams"] == exhaustive["rows"][0]["hparams"]  # the best trained to its end
    champion = client(project).get_model_version_by_alias("median", "champion")
    assert champion.run_id == board["rows"][0]["run_id"]
    # The bad trials cost less than in the exhaustive sweep (GPU-hours of the trials this sweep trained).
    exhaustive_bad = sum(r["duration_s"] for r in exhaustive["rows"] if r["hparams"] in BAD)
    assert sum(r["duration_s"] for r in board["rows"] if r["status"] == "STOPPED") < exhaustive_bad
    assert board["gpu_hours_used"] < exhaustive["gpu_hours_used"]
    assert board["gpu_hours_saved"] > 0 and board["early_stop"].startswith("median")
    parent = client(project).get_run(board["parent_run_id"])
    assert parent.data.metrics["gpu_hours_saved"] == pytest.approx(board["gpu_hours_saved"])
    md = (project.root / "reports" / "median" / "latest" / "leaderboard.md").read_text()
    assert "STOPPED" in md and "saved by early stopping" in md

    # The same sweep without --early-stop: the stopped trials resume (epochs go on), nothing else trains.
    again = run_sweep(project, GOOD + BAD, spec, 1, env=FAST_POLLS)
    assert again.returncode == 0, again.stderr
    board2 = leaderboard(project, "median")
    assert board2["counts"] == {"total": 5, "finished": 2, "failed": 0, "reused": 3}
    for hp in BAD:
        before = rows[json.dumps(hp, sort_keys=True)]
        after = next(r for r in board2["rows"] if r["hparams"] == hp)
        assert after["status"] == "FINISHED" and after["run_id"] != before["run_id"]
        resumed_steps = steps_of(project, after["run_id"])
        assert resumed_steps[0] > 1 and resumed_steps[-1] == 8, resumed_steps  # continued, not restarted
        assert resumed_steps[0] == max(steps_of(project, before["run_id"])) + 1


CURVE_SPEC = f"""
name: ignores-stop
trainer:
  command: ["{sys.executable}", "{TESTS / 'curve_cmd_trainer.py'}"]
resources: {{gpus: 1}}
"""


def test_a_command_trainer_that_ignores_its_stop_file_is_killed_after_the_grace_and_is_stopped(
        served_project: Project):
    project, record = served_project, served_project.root / "rec.jsonl"
    good = [{"f1": f, "steps": 3, "step_s": 0.1} for f in (0.9, 0.85, 0.8)]
    bad = {"f1": 0.2, "steps": 400, "step_s": 0.2}  # 80 s if nothing stopped it
    assert run_sweep(project, good, CURVE_SPEC, 1, env=FAST_POLLS).returncode == 0  # the median's curves
    result = run_sweep(project, [*good, bad], CURVE_SPEC, 1, "--early-stop", "median", "--early-stop-min-steps",
                       "2", "--early-stop-grace-s", "1", env={**FAST_POLLS, "HPSWEEP_TEST_RECORD": str(record)})
    assert result.returncode == 0, result.stderr
    row = next(r for r in leaderboard(project, "ignores-stop")["rows"] if r["hparams"]["f1"] == 0.2)
    assert row["status"] == "STOPPED" and "< median" in row["stop_reason"], row
    steps = [e for e in records(record) if e["event"] == "step" and e["hparams"]["f1"] == 0.2]
    assert any(e["stop_file"] for e in steps)  # the stop file appeared, and it went on regardless
    assert len(steps) < 400  # until SIGTERM ended it
    run = client(project).get_run(row["run_id"])
    assert (run.info.status, run.data.tags["hpsweep.status"]) == ("KILLED", "STOPPED")
