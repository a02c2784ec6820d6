"""What a trial process keeps when it is killed: metrics it reported but had not shipped yet."""

import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from mlflow.tracking import MlflowClient

from hpsweep.runtime.durable import MetricsLogger

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
