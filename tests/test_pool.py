"""Sweeps on a real Prefect work pool: trials are flow runs of the train-trial deployment,
started by a real process worker; the pool's concurrency limit is the quota."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import Project, prefect_cli
from tests.test_sweep_e2e import leaderboard, peak_concurrency, records

pytestmark = pytest.mark.slow


def trial_flow_runs(api_url: str) -> int:
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["hpsweep"])), limit=200)
        return sum(1 for r in runs if r.parameters.get("job"))


POOL_SPEC = """
name: {name}
trainer:
  entrypoint: tests.trainers:sleepy
settings: {{epochs: 2, sleep_s: 6.0, record_path: "{record}"}}  # long enough to overlap despite start jitter
"""


def write_inputs(project: Project, name: str, combos: list[dict]) -> None:
    project.write("params/combinations.yaml", "combinations:\n" + "".join(f"  - {json.dumps(c)}\n" for c in combos))
    project.write("params/spec.yaml", POOL_SPEC.format(name=name, record=project.root / "rec.jsonl"))


def run_args(pool: str) -> list[str]:
    return ["run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml", "--train",
            "data/train.csv", "--val", "data/val.csv", "--quota", "2", "--launcher", "pool", "--pool", pool]


def test_pool_sweep_runs_at_most_the_pool_limit_and_a_rerun_launches_nothing(served_project: Project, gpu_pool):
    project, record = served_project, served_project.root / "rec.jsonl"
    combos = [{"f1": round(0.1 * i, 2)} for i in range(1, 6)]
    write_inputs(project, "pooled", combos)
    env: dict[str, str] = {}
    before = trial_flow_runs(gpu_pool.api_url)
    result = project.hpsweep(*run_args(gpu_pool.name), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = leaderboard(project, "pooled")["rows"]
    assert [r["f1"] for r in rows] == [0.5, 0.4, 0.3, 0.2, 0.1]
    assert all(r["status"] == "FINISHED" for r in rows)
    assert peak_concurrency(records(record)) == 2  # the pool's limit, reached and never exceeded
    launched = trial_flow_runs(gpu_pool.api_url) - before
    assert launched == 5

    again = project.hpsweep(*run_args(gpu_pool.name), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert trial_flow_runs(gpu_pool.api_url) - before == 5  # the rerun launched no child run
    assert leaderboard(project, "pooled")["counts"]["reused"] == 5


def test_sweep_deployment_runs_a_whole_sweep(served_project: Project, gpu_pool):
    project = served_project
    write_inputs(project, "deployed", [{"f1": 0.3}, {"f1": 0.8}, {"f1": 0.5}])
    root = project.root
    config = {"combinations": str(root / "params/combinations.yaml"), "spec": str(root / "params/spec.yaml"),
              "train": str(root / "data/train.csv"), "val": str(root / "data/val.csv"), "quota": 2,
              "launcher": "pool", "pool": gpu_pool.name, "report_dir": str(root / "reports/deployed"),
              "work_dir": str(root / ".hpsweep"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    out = prefect_cli(gpu_pool.api_url, "deployment", "run", "sweep/hpsweep", "--param",
                      f"config={json.dumps(config)}", "--watch", "--watch-timeout", "600")
    assert "Completed" in out.stdout, out.stdout
    rows = json.loads((root / "reports/deployed/leaderboard.json").read_text())["rows"]  # exactly its report_dir
    assert [r["f1"] for r in rows] == [0.8, 0.5, 0.3]


@pytest.mark.parametrize("limit, message", [(None, "has no concurrency limit"), (5, "allows 5 runs at once")])
def test_a_pool_without_a_safe_limit_is_refused(served_project: Project, prefect_server: str, limit, message):
    name = f"unsafe-{limit}-{time.time_ns()}"
    prefect_cli(prefect_server, "work-pool", "create", name, "--type", "process")
    if limit is not None:
        prefect_cli(prefect_server, "work-pool", "set-concurrency-limit", name, str(limit))
    write_inputs(served_project, "refused", [{"f1": 0.3}])
    result = served_project.hpsweep(*run_args(name))
    assert result.returncode == 2
    assert message in result.stderr and "set-concurrency-limit" in result.stderr
    assert served_project.state_written() == []
