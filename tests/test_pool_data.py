"""Trials on a work pool read their data from shared storage: the DVC remote (S3 on loopback),
through the worker host's data cache, never from the disk of the machine that launched the sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.datacache import DataCache, file_md5
from tests.conftest import REPO, Project, prefect_cli, stop
from tests.test_sweep_e2e import leaderboard

pytestmark = pytest.mark.slow

SPEC = """
name: staged
trainer:
  entrypoint: trainer.reference:train
settings: {epochs: 2, seed: 0}
"""


def dvc(project: Project, *args: str) -> None:
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project.root, env=project.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}\n{result.stderr}"


@pytest.fixture
def staged_pool(prefect_server: str, s3_endpoint, tmp_path: Path):
    """A pool (limit 2) whose worker must stage data through its own cache, with train-trial deployed on it."""
    name = f"staged-{os.getpid()}"
    prefect_cli(prefect_server, "work-pool", "create", name, "--type", "process")
    prefect_cli(prefect_server, "work-pool", "set-concurrency-limit", name, "2")
    prefect_cli(prefect_server, "--no-prompt", "deploy", "flows/trial.py:train_trial", "--name", name,
                "--pool", name, env={"HPSWEEP_HOME": str(REPO)})
    cache = tmp_path / "worker-cache"
    env = {**os.environ, **s3_endpoint.env, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONPATH": str(REPO), "HPSWEEP_STAGE_DATA": "always", "HPSWEEP_DATA_CACHE": str(cache)}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", name, "--type",
                               "process"], env=env, cwd=REPO, stdout=(tmp_path / "worker.log").open("wb"),
                              stderr=subprocess.STDOUT)
    try:
        yield name, cache
    finally:
        stop(worker)


def test_pool_trials_fetch_data_from_the_dvc_remote_once_per_host(served_project: Project, s3_endpoint,
                                                                   staged_pool):
    pool, cache_root = staged_pool
    project = served_project
    project.env.update(s3_endpoint.env)
    project.write("params/combinations.yaml", "combinations:\n" + "".join(
        f"  - {{hidden: {h}, lr: 0.03, alpha: 0.0001}}\n" for h in (16, 32, 64)))
    project.write("params/spec.yaml", SPEC)
    bucket = s3_endpoint.bucket()
    dvc(project, "init", "--no-scm", "-q")
    dvc(project, "add", "data/train.csv", "data/val.csv")
    dvc(project, "remote", "add", "-d", "shared", f"s3://{bucket}/dvc")
    dvc(project, "remote", "modify", "shared", "endpointurl", s3_endpoint.url)
    dvc(project, "push")

    result = project.hpsweep("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
                             "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "2",
                             "--launcher", "pool", "--pool", pool, "--trial-deployment", f"train-trial/{pool}")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = leaderboard(project, "staged")["rows"]
    assert [r["status"] for r in rows] == ["FINISHED"] * 3
    assert len({r["f1"] for r in rows}) > 1  # real training on the real (staged) data

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    runs = [client.get_run(r["run_id"]) for r in rows]
    assert {r.data.tags["hpsweep.data_source"] for r in runs} == {"cache"}
    sizes = [(project.root / "data" / n).stat().st_size for n in ("train.csv", "val.csv")]
    # Three trials on one host: each file downloaded once, not three times.
    assert sum(int(r.data.tags["hpsweep.data_fetched_bytes"]) for r in runs) == sum(sizes)
    cache = DataCache(cache_root)
    for name in ("train.csv", "val.csv"):
        md5 = file_md5(project.root / "data" / name)
        assert file_md5(cache.path_for(md5)) == md5
