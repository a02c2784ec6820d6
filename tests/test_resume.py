"""Rerun is resume: finished trials are reused by trial key, changed ones alone are trained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, quota_limit, records, run_sweep

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


def test_retrain_trains_from_scratch_and_finished_trials_keep_no_local_checkpoints(served_project: Project):
    """A checkpointing trainer (the reference one): --retrain must not resume from the final
    checkpoint of the run it retrains, which would train nothing and copy the old F1."""
    project = served_project
    project.write("params/spec.yaml", "name: retrain\ntrainer: {entrypoint: 'trainer.reference:train'}\n"
                                      "settings: {epochs: 4, seed: 0}\nresources: {gpus: 1}\n")
    project.write("params/combinations.yaml", "combinations:\n  - {hidden: 16, lr: 0.01, alpha: 0.0001}\n")
    args = ("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1")
    assert project.hpsweep(*args).returncode == 0
    # Finished: its checkpoints live in the artifact store, not on this host's disk.
    assert list((project.root / ".hpsweep").glob("trials/*/checkpoints/*")) == []

    # A stale final checkpoint on disk (as an older hpsweep left them) must not be resumed either.
    first = leaderboard(project, "retrain")["rows"][0]
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    trial_dir = next((project.root / ".hpsweep" / "trials").iterdir())
    client.download_artifacts(first["run_id"], "checkpoints", str(trial_dir))
    assert list((trial_dir / "checkpoints").iterdir())

    result = project.hpsweep(*args, "--retrain")
    assert result.returncode == 0, result.stderr
    row = leaderboard(project, "retrain")["rows"][0]
    assert row["run_id"] != first["run_id"] and row["status"] == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(row["run_id"], "val_f1")) == [1, 2, 3, 4]
    log = Path(client.download_artifacts(row["run_id"], "trial.log", str(project.root / "dl")))
    assert "resumed" not in log.read_text()
    assert row["f1"] == first["f1"]  # same seed, trained again from scratch: the same model


def test_a_sweep_killed_on_the_embedded_default_gives_its_quota_back_to_the_rerun(project: Project):
    """kill -9 of `hpsweep run` on the embedded default (the local Prefect server): the killed
    sweep's quota slot must come back, or the rerun waits for it forever (it did)."""
    project.write("params/spec.yaml", SLEEPY_SPEC.format(name="killed", sleep_s=1, gpus=1))
    project.write("params/combinations.yaml", "combinations:\n  - {f1: 0.5, sleep_s: 15}\n  - {f1: 0.6, sleep_s: 2}\n")
    args = [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "params/combinations.yaml",
            "--spec", "params/spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1",
            "--quota-limit", quota_limit(project)]  # its own limit of 1: no other test's slots to take
    first = subprocess.Popen(args, cwd=project.root, env=project.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(project.root.glob(".hpsweep/trials/*/trial.log")):  # a trial holds the slot
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its fork server; the local server lives on
        first.wait()

    rerun = project.hpsweep(*args[3:], timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    board = leaderboard(project, "killed")
    assert [(r["f1"], r["status"]) for r in board["rows"]] == [(0.6, "FINISHED"), (0.5, "FINISHED")]
    assert f"slots of quota limit '{quota_limit(project)}' are taken" in rerun.stderr  # the wait is explained
    assert "returned the quota slots of 1 expired lease" in rerun.stderr


CRASHES_BEFORE_STORING = '''
"""`hpsweep run`, whose process dies (SIGKILL) the moment it would store a finished trial's outcome:
the trainer is done, its run is not closed."""
import os
import signal
import sys

if __name__ == "__main__":
    from hpsweep import store
    from hpsweep.cli import main

    store.finish_trial_run = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(main())
'''


def test_a_crash_between_trainer_done_and_run_closed_never_counts_the_trial_finished(project: Project):
    """The guarantee behind reuse: a trial counts as FINISHED only once its F1 is stored. A sweep killed
    after its trainer returned but before its run was closed leaves a RUNNING run with no F1; the rerun
    closes it as a zombie and trains the trial again, instead of reusing a result it never stored."""
    record = project.root / "rec.jsonl"
    env = {"HPSWEEP_TEST_RECORD": str(record)}
    spec = SLEEPY_SPEC.format(name="crash-window", sleep_s=0.1, gpus=1)
    crashing = project.write("crashing_run.py", CRASHES_BEFORE_STORING)
    lines = ["combinations:", '  - {"f1": 0.7}']
    project.write("params/combinations.yaml", "\n".join(lines) + "\n")
    project.write("params/spec.yaml", spec)
    args = ["run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1"]
    died = subprocess.run([sys.executable, str(crashing), *args], cwd=project.root, env={**project.env, **env},
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stdout + died.stderr
    assert [e["event"] for e in records(record)] == ["start", "end"]  # the trainer was done

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crash-window")
    (left,) = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'trial'")
    assert left.info.status == "RUNNING" and "f1" not in left.data.metrics

    rerun = run_sweep(project, [{"f1": 0.7}], spec, 1, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert [e["event"] for e in records(record)].count("start") == 2  # trained again, not reused
    zombie = client.get_run(left.info.run_id)
    assert zombie.info.status == "KILLED" and "zombie" in zombie.data.tags["hpsweep.reason"]
    board = leaderboard(project, "crash-window")
    assert [(r["f1"], r["status"]) for r in board["rows"]] == [(0.7, "FINISHED")]
    assert board["rows"][0]["run_id"] != left.info.run_id
