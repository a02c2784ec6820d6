"""What a sweep prints when its output is not a terminal (a CI log, `| tee`): plain lines, never
wrapped nor cut, no ERROR, and the summary last."""

from __future__ import annotations

import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, Project


@pytest.mark.slow
def test_a_piped_demo_prints_whole_plain_lines_and_ends_with_the_summary(project: Project):
    shutil.copy(REPO / "params.yaml", project.root / "params.yaml")
    shutil.copy(REPO / "params" / "spec.yaml", project.write("params/spec.yaml", ""))
    project.write("params/combinations.yaml", "combinations:\n" + "".join(
        f"  - {{hidden: {h}, lr: 0.01, alpha: 0.0001}}\n" for h in (8, 16, 32)))
    del project.env["COLUMNS"]  # as in CI: nothing tells Rich the width, which then assumes 80 columns
    result = project.hpsweep("demo", timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if re.search(r"\bERROR\b", line)], out
    assert "…" not in out, out  # nothing cut
    assert "\r" not in out and "Downloading artifacts" not in out, out  # no progress bars redrawn in a log
    # Lines longer than 80 columns stay whole: the sweep's start line, the champion, the MLflow UI.
    assert any("combinations, 3 to train" in line and "no durations known yet" in line
               or "combinations, 3 to train" in line and "every trial starts at once" in line for line in lines), out
    assert [line for line in lines if line.startswith("sweep ") and "3/3 ended" in line], out  # a plain progress line
    summary = result.stdout.splitlines()
    assert summary[-1].startswith("MLflow UI: mlflow ui --backend-store-uri sqlite:///") and \
        summary[-1].rstrip().endswith(")") and "parent run" in summary[-1], out
    assert any(line.startswith("champion: models:/digits-mlp@champion (version 1, run ") and
               line.endswith("moved by this sweep") for line in summary), out
    assert result.stderr.rstrip().splitlines()[-1].endswith("Finished in state Completed()"), out  # nothing after
    # One parent run for the sweep (started before Prefect, then opened by the flow), closed FINISHED.
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("digits-mlp").experiment_id],
                                 "tags.`hpsweep.role` = 'sweep'")
    assert [(p.info.status, p.data.tags["hpsweep.status"]) for p in parents] == [("FINISHED", "FINISHED")]
