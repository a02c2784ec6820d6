"""Sweeps on a real Prefect work pool: trials are flow runs of the train-trial deployment,
started by a real process worker; the pool's concurrency limit is the quota."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, \
    FlowRunFilterId, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import Project, prefect_cli
from tests.test_prefect_views import flow_run_views
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


def test_sweep_deployment_takes_its_defaults_and_paths_from_the_project(served_project: Project, gpu_pool):
    """`prefect deployment run` with only the settings that differ from params.yaml, as the README shows."""
    project = served_project
    write_inputs(project, "deployed", [{"f1": 0.3}, {"f1": 0.8}, {"f1": 0.5}])
    project.write("params.yaml", "sweep:\n  combinations: params/combinations.yaml\n  spec: params/spec.yaml\n"
                                 "  train: data/train.csv\n  val: data/val.csv\n  quota: 2\n")
    config = {"launcher": "pool", "pool": gpu_pool.name}
    out = prefect_cli(gpu_pool.api_url, "deployment", "run", "sweep/hpsweep", "--param", f"config={json.dumps(config)}",
                      "--param", f"project_dir={project.root}", "--watch", "--watch-timeout", "600")
    assert "Completed" in out.stdout, out.stdout
    board = leaderboard(project, "deployed")  # the report, MLflow store and trial folders are the project's
    assert [r["f1"] for r in board["rows"]] == [0.8, 0.5, 0.3]
    assert (project.root / "mlflow.db").is_file() and (project.root / ".hpsweep" / "trials").is_dir()
    with temporary_settings(updates={PREFECT_API_URL: gpu_pool.api_url}), get_client(sync_client=True) as client:
        trials = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"sweep:{board['sweep_id']}"])))
    assert sorted(r.name for r in trials) == ["f1=0.3", "f1=0.5", "f1=0.8"]  # named like their MLflow runs
    parent = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}").get_run(board["parent_run_id"])
    _, messages, _ = flow_run_views(gpu_pool.api_url, parent.data.tags["hpsweep.flow_run_id"])
    assert any("f1=0.8" in m and "F1 0.8000" in m for m in messages), messages


def test_a_deployment_run_missing_a_required_setting_names_it(served_project: Project, gpu_pool):
    config = {"launcher": "pool", "pool": gpu_pool.name, "spec": "params/spec.yaml"}
    out = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "sweep/hpsweep", "--param",
                          f"config={json.dumps(config)}", "--param", f"project_dir={served_project.root}",
                          "--watch", "--watch-timeout", "300"], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "PREFECT_API_URL": gpu_pool.api_url})
    assert out.returncode == 1 and "Failed" in out.stdout + out.stderr, out.stdout + out.stderr
    with temporary_settings(updates={PREFECT_API_URL: gpu_pool.api_url}), get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            UUID(re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1))])))[0]
    assert "config.combinations: required" in run.state.message, run.state.message


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
