"""What a sweep looks like in Prefect's UI: task runs named after their hparams, each trial's F1 in the
flow run's log, and a leaderboard artifact that links to the MLflow runs (real servers on loopback)."""

from __future__ import annotations

from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, \
    FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from hpsweep.model import TrialRow, TrialState
from hpsweep.report.leaderboard import render_markdown
from hpsweep.report.links import mlflow_ui_note, run_url
from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, run_sweep


def flow_run_views(api_url: str, flow_run_id: str) -> tuple[list[str], list[str], dict[str, str]]:
    """The flow run's task run names, log messages and artifacts (key: data)."""
    ids = [UUID(flow_run_id)]
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=ids)))
    return [t.name for t in tasks], [log.message for log in logs], {a.key: a.data for a in artifacts}


@pytest.mark.slow
def test_prefect_shows_trials_by_hparams_with_their_f1_and_links_to_mlflow(served_project: Project, mlflow_server):
    project = served_project
    result = run_sweep(project, [{"f1": 0.61, "mode": "ok"}, {"f1": 0.93, "mode": "ok"}],
                       SLEEPY_SPEC.format(name="viewed", sleep_s=0.1, gpus=1), 2,
                       env={"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert result.returncode == 0, result.stdout + result.stderr
    board = leaderboard(project, "viewed")
    parent = MlflowClient(mlflow_server.url).get_run(board["parent_run_id"])
    names, messages, artifacts = flow_run_views(project.env["PREFECT_API_URL"],
                                                parent.data.tags["hpsweep.flow_run_id"])

    assert sorted(names) == ["f1=0.61 mode=ok", "f1=0.93 mode=ok"]  # the MLflow run names, not `nonchalant-cockle`
    assert any("f1=0.93 mode=ok" in m and "F1 0.9300" in m for m in messages), messages
    markdown = artifacts["viewed-leaderboard"]
    for row in board["rows"]:
        assert f"({mlflow_server.url}/#/experiments/{board['experiment_id']}/runs/{row['run_id']})" in markdown
    assert "viewed-table" in artifacts


def test_links_to_a_local_store_say_how_to_open_its_ui():
    uri = "sqlite:////home/me/project/mlflow.db"
    assert run_url(uri, "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert "mlflow ui --backend-store-uri sqlite:////home/me/project/mlflow.db" in mlflow_ui_note(uri, "3")
    assert run_url("https://mlflow.example.com/", "3", "abc") == "https://mlflow.example.com/#/experiments/3/runs/abc"
    assert "mlflow ui" not in mlflow_ui_note("https://mlflow.example.com", "3")


def test_leaderboard_markdown_links_each_run_when_asked():
    rows = [TrialRow(index=1, hparams={"lr": 0.1}, state=TrialState.FINISHED, run_id="r1" * 16, f1=0.5, rank=1),
            TrialRow(index=2, hparams={"lr": 0.2}, state=TrialState.FAILED, reason="boom", rank=2)]
    header = {"name": "s", "sweep_id": "s-1"}
    linked = render_markdown(header, rows, run_link=lambda run_id: f"http://ui/#/runs/{run_id}")
    assert f"(http://ui/#/runs/{'r1' * 16})" in linked
    assert "http://ui" not in render_markdown(header, rows)  # the report file keeps plain run ids
