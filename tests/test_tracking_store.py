"""The embedded SQLite store when several hpsweep processes open a new one at the same moment."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def test_processes_opening_a_new_store_at_once_all_get_a_working_store(tmp_path: Path):
    """A sweep starting while `hpsweep status` polls (CI saw it): MLflow would create and migrate
    the tables in both processes, and one died on "duplicate column name"."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = time.time() + 8  # every process imports MLflow first, then they all open the store together
    script = textwrap.dedent(f"""
        import sys, time
        from mlflow.tracking import MlflowClient
        from hpsweep import store
        time.sleep(max(0.0, {go} - time.time()))
        uri = store.resolve_tracking_uri({uri!r})
        client = MlflowClient(uri)
        print(store.ensure_experiment(client, "shared"), flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, found by all four
    client = MlflowClient(uri)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "shared"]
