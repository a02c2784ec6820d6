"""What a trial process keeps when it is killed (metrics it reported but had not shipped yet, its
checkpoints), where a retry's system metrics continue, and that a trial dies with its orchestrator."""

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.identity import process_identity
from hpsweep.runtime.durable import CheckpointSync, MetricsLogger, SystemMetrics, exit_when_dead, restore_checkpoints
from hpsweep.store.tags import TAG_TRIAL_KEY
from tests.test_launcher import gone

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_a_killed_attempt_never_shipped_go_up_with_the_next_attempt(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("durable")).info.run_id
    journal = tmp_path / "trial" / "metrics.jsonl"
    journal.parent.mkdir()

    # The first attempt reports two epochs while the tracking server is down, then is killed.
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mlflow.tracking import MlflowClient
        from hpsweep.runtime.durable import MetricsLogger
        logger = MetricsLogger(MlflowClient("http://127.0.0.1:{closed_port()}"), {run_id!r},
                               journal=Path({str(journal)!r}))
        logger.log(1, {{"val_f1": 0.5, "train_loss": 2.0}})
        logger.log(2, {{"val_f1": 0.7, "train_loss": 1.0}})
        print("reported", flush=True)
        time.sleep(600)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "reported"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert client.get_metric_history(run_id, "val_f1") == []
    with open(journal, "a") as f:
        f.write('{"run": "' + run_id + '", "key": "val_f1", "val')  # a line cut short by the kill

    # The retry, with the server back, ships them before its own epoch.
    second = MetricsLogger(client, run_id, journal=journal)
    second.log(3, {"val_f1": 0.8, "train_loss": 0.5})
    second.flush()
    history = client.get_metric_history(run_id, "val_f1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.5), (2, 0.7), (3, 0.8)]
    assert len(client.get_metric_history(run_id, "train_loss")) == 3

    # A third logger on the same folder has nothing left to send; nothing is stored twice.
    MetricsLogger(client, run_id, journal=journal).flush()
    assert len(client.get_metric_history(run_id, "val_f1")) == 3
    assert int(journal.with_name("metrics.jsonl.shipped").read_text()) == journal.stat().st_size


def test_without_a_journal_metrics_are_still_shipped(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("plain")).info.run_id
    logger = MetricsLogger(client, run_id)
    for step in range(1, 4):
        logger.log(step, {"val_f1": step / 10})
    logger.flush()
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_f1")) == [1, 2, 3]
    assert not list(tmp_path.glob("*.jsonl"))


def test_metrics_for_a_run_that_is_gone_fail_at_flush_without_waiting_out_the_outage_patience(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.search_experiments()  # the store exists; the run does not
    logger = MetricsLogger(client, "f" * 32)
    logger.log(1, {"val_f1": 0.5})
    with pytest.raises(RuntimeError, match="metrics not stored"):  # not a TimeoutError: no hour of retries
        logger.flush(timeout_s=120)


def store_with_run(tmp_path: Path, trial_key: str) -> tuple[MlflowClient, str, str]:
    """A SQLite tracking store whose artifacts stay in ``tmp_path``, and one RUNNING run of the trial."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("ckpt", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id, tags={TAG_TRIAL_KEY: trial_key}).info.run_id
    return client, exp_id, run_id


def test_checkpoints_go_up_while_training_and_come_back_for_the_next_attempt(tmp_path: Path):
    key = "it's a key"  # a quote: the search for the trial's runs must still find it
    client, exp_id, run_id = store_with_run(tmp_path, key)
    folder = tmp_path / "trial" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pkl").write_bytes(b"epoch 1")
    (folder / ".checkpoint.pkl.tmp").write_bytes(b"half written")

    sync = CheckpointSync(client, run_id, folder, interval_s=3600)
    assert sync.sync_once() == 1
    assert sync.sync_once() == 0  # unchanged files are not sent again
    (folder / "checkpoint.pkl").write_bytes(b"epoch 2")
    sync.stop()  # what changed since the last sync goes up at stop
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/checkpoint.pkl"]

    dest = tmp_path / "elsewhere" / "checkpoints"
    assert restore_checkpoints(client, exp_id, key, dest) == run_id
    assert [p.name for p in dest.iterdir()] == ["checkpoint.pkl"] and (dest / "checkpoint.pkl").read_bytes() == b"epoch 2"
    assert not list(dest.parent.glob(".restore-*"))
    assert restore_checkpoints(client, exp_id, key, dest) is None  # a folder with checkpoints is kept as is

    client.set_terminated(run_id, "FINISHED")  # a finished run's checkpoints are never resumed from
    assert restore_checkpoints(client, exp_id, key, tmp_path / "third" / "checkpoints") is None
    assert restore_checkpoints(client, exp_id, "another key", tmp_path / "fourth" / "checkpoints") is None


def test_system_metrics_of_a_retry_continue_after_the_previous_attempts_steps(tmp_path: Path):
    client, _, run_id = store_with_run(tmp_path, "k")
    for _attempt in range(2):
        metrics = MetricsLogger(client, run_id)
        system = SystemMetrics(metrics, 3600, (), client, run_id)
        system.stop(timeout_s=60)  # the interval never passes: one sample, taken at stop
        metrics.flush()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in history) == [0, 1]
    assert client.get_run(run_id).data.metrics["system/system_memory_usage_megabytes"] > 0


def _trial_of(orchestrator: str, pidfile: Path) -> None:
    """A forked trial process: its own process group with a child of its own, watching its orchestrator."""
    os.setsid()
    exit_when_dead(orchestrator, interval_s=0.05)
    child = subprocess.Popen(["sleep", "300"])
    pidfile.write_text(str(child.pid))
    time.sleep(300)


def test_a_trial_whose_orchestrator_died_kills_its_whole_process_group(tmp_path: Path):
    orchestrator = subprocess.Popen(["sleep", "300"])
    pidfile = tmp_path / "child.pid"
    trial = multiprocessing.get_context("fork").Process(
        target=_trial_of, args=(process_identity(orchestrator.pid), pidfile))
    trial.start()
    try:
        give_up = time.monotonic() + 60
        while not pidfile.exists() and trial.is_alive() and time.monotonic() < give_up:
            time.sleep(0.05)
        assert trial.is_alive() and pidfile.exists()  # the orchestrator lives: the trial trains on
        orchestrator.kill()
        orchestrator.wait()
        trial.join(60)
        assert trial.exitcode == -signal.SIGKILL
        assert gone(int(pidfile.read_text()))  # the trainer's own children went with it
    finally:
        orchestrator.kill()
        orchestrator.wait()
        if trial.is_alive():
            os.killpg(trial.pid, signal.SIGKILL)
            trial.join()
