"""Rerun is resume: finished trials are reused by trial key, changed ones alone are trained."""

from __future__ import annotations

import pytest

from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, records, run_sweep

pytestmark = pytest.mark.slow


def starts(record) -> list[dict]:
    return [e["hparams"] for e in records(record) if e["event"] == "start"]


def test_rerun_reuses_finished_trials_and_trains_only_what_changed(served_project: Project):
    project, record = served_project, served_project.root / "rec.jsonl"
    env = {"HPSWEEP_TEST_RECORD": str(record)}
    spec = SLEEPY_SPEC.format(name="resume", sleep_s=0.1, gpus=1)
    combos = [{"f1": 0.3}, {"f1": 0.6}, {"f1": 0.9}]
    assert run_sweep(project, combos, spec, 2, env=env).returncode == 0
    first = leaderboard(project, "resume")
    assert len(starts(record)) == 3

    again = run_sweep(project, combos, spec, 2, env=env)
    assert again.returncode == 0, again.stderr
    assert len(starts(record)) == 3  # nothing trained again
    board = leaderboard(project, "resume")
    assert board["counts"] == {"total": 3, "finished": 0, "failed": 0, "reused": 3}
    assert {r["run_id"] for r in board["rows"]} == {r["run_id"] for r in first["rows"]}
    assert "3 reused" in again.stdout

    changed = [{"f1": 0.3}, {"f1": 0.65}, {"f1": 0.9}]
    assert run_sweep(project, changed, spec, 2, env=env).returncode == 0
    assert starts(record)[3:] == [{"f1": 0.65}]  # only the changed combination trained
    board = leaderboard(project, "resume")
    assert [(r["f1"], r["status"]) for r in board["rows"]] == [(0.9, "REUSED"), (0.65, "FINISHED"),
                                                               (0.3, "REUSED")]

    forced = run_sweep(project, changed, spec, 2, "--retrain", env=env)
    assert forced.returncode == 0
    assert len(starts(record)) == 7  # --retrain trains all three again
    assert leaderboard(project, "resume")["counts"]["finished"] == 3


def test_a_changed_spec_invalidates_every_trial(served_project: Project):
    project, record = served_project, served_project.root / "rec.jsonl"
    env = {"HPSWEEP_TEST_RECORD": str(record)}
    combos = [{"f1": 0.3}, {"f1": 0.6}]
    assert run_sweep(project, combos, SLEEPY_SPEC.format(name="spec-change", sleep_s=0.1, gpus=1), 2,
                     env=env).returncode == 0
    assert run_sweep(project, combos, SLEEPY_SPEC.format(name="spec-change", sleep_s=0.2, gpus=1), 2,
                     env=env).returncode == 0
    assert len(starts(record)) == 4  # new settings, new trial keys: nothing stale is reused
