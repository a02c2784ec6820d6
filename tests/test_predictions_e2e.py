"""Issue 18 end to end: trainers hand over their validation predictions, and the report, the terminal,
MLflow and the registry say which F1s are statistically tied (real CLI, Prefect and MLflow)."""

from __future__ import annotations

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TESTS, Project
from tests.test_sweep_e2e import leaderboard, run_sweep

pytestmark = pytest.mark.slow

PREDICTING_SPEC = """
name: {name}
trainer:
  entrypoint: tests.trainers:predicting
metric: {{average: macro, resamples: 500, seed: 3}}
"""

COMMAND_SPEC = f"""
name: cmd-predictions
trainer:
  command: ["{sys.executable}", "{TESTS / 'cmd_trainer.py'}"]
"""

KEYS = ("f1_ci_low", "f1_ci_high", "p_beats_best", "tied_with_best")


def test_python_trainer_predictions_give_intervals_ties_warnings_and_the_tie_break_champion(served_project: Project):
    project = served_project
    combos = [{"hidden": 64, "acc": 0.95, "lie": 0.0, "silent": False},
              {"hidden": 16, "acc": 0.95, "lie": 0.0, "silent": False},  # the same predictions: tied
              {"hidden": 32, "acc": 0.60, "lie": 0.0, "silent": False},  # far behind: not tied
              {"hidden": 8, "acc": 0.80, "lie": 0.05, "silent": False},  # reports more than its predictions give
              {"hidden": 4, "acc": 0.70, "lie": 0.0, "silent": True}]  # no predictions: null, nothing breaks
    result = run_sweep(project, combos, PREDICTING_SPEC.format(name="tied"), 2, "--tie-break", "hidden:asc")
    assert result.returncode == 0, result.stderr
    board = leaderboard(project, "tied")
    sig = board["significance"]
    assert (sig["method"], sig["resamples"], sig["seed"], sig["validation_size"]) == ("paired bootstrap", 500, 3, 360)
    rows = {r["hparams"]["hidden"]: r for r in board["rows"]}
    assert rows[64]["tied_with_best"] and rows[16]["tied_with_best"] and not rows[32]["tied_with_best"]
    assert rows[32]["p_beats_best"] == 0.0
    assert rows[64]["f1_ci_low"] < rows[64]["f1"] < rows[64]["f1_ci_high"]
    assert all(rows[4][k] is None for k in KEYS) and rows[4]["f1"] is not None and rows[4]["status"] == "FINISHED"
    assert sig["f1_mismatch_run_ids"] == [rows[8]["run_id"]]

    # The tie-break picked the smaller of the two tied best, registered it, and says so.
    assert board["champion_rule"].startswith("tie-break hidden:asc among the 2 trials statistically tied")
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    assert client.get_model_version_by_alias("tied", "champion").run_id == rows[16]["run_id"]
    assert "top 2 are statistically tied (paired bootstrap, 360 val examples): the order among them is noise" \
        in result.stdout
    assert "champion picked by: tie-break hidden:asc" in result.stdout

    # MLflow: intervals on the trial runs, the warning tag on the one that misreported, the count on the parent.
    best = client.get_run(rows[64]["run_id"])
    assert best.data.metrics["f1_ci_low"] == pytest.approx(rows[64]["f1_ci_low"])
    assert best.data.metrics["f1_ci_high"] == pytest.approx(rows[64]["f1_ci_high"])
    assert "predictions/predictions.npz" in {a.path for a in client.list_artifacts(best.info.run_id, "predictions")}
    assert "hpsweep.warning.f1_mismatch" in client.get_run(rows[8]["run_id"]).data.tags
    assert "hpsweep.warning.f1_mismatch" not in best.data.tags
    assert client.get_run(board["parent_run_id"]).data.metrics["tied_with_best_count"] == 2

    md = (project.root / "reports" / "tied" / "latest" / "leaderboard.md").read_text()
    assert "95% CI" in md and "≈" in md and "⚠ The trainer's F1 is not the F1 of its own predictions" in md
    csv = (project.root / "reports" / "tied" / "latest" / "leaderboard.csv").read_text().splitlines()[0]
    assert csv.endswith("f1_ci_low,f1_ci_high,p_beats_best,tied_with_best")

    # `hpsweep report` recomputes the same from MLflow, the tie-break included.
    again = project.hpsweep("report", "tied", "--report-dir", "again")
    assert again.returncode == 0, again.stderr
    redone = json.loads((project.root / "again" / "leaderboard.json").read_text())
    assert [[r[k] for k in KEYS] for r in redone["rows"]] == [[r[k] for k in KEYS] for r in board["rows"]]
    assert redone["champion_rule"] == board["champion_rule"]


def test_command_trainer_csv_predictions_give_the_new_columns(served_project: Project):
    project = served_project
    combos = [{"acc": 0.9, "predict": True}, {"acc": 0.5, "predict": True}, {"acc": 0.7, "predict": False}]
    result = run_sweep(project, combos, COMMAND_SPEC, 2)
    assert result.returncode == 0, result.stderr
    board = leaderboard(project, "cmd-predictions")
    rows = {json.dumps(r["hparams"], sort_keys=True): r for r in board["rows"]}
    good, bad, silent = (rows[json.dumps(c, sort_keys=True)] for c in combos)
    assert good["tied_with_best"] and not bad["tied_with_best"]
    assert good["f1_ci_low"] <= good["f1"] <= good["f1_ci_high"] and bad["f1_ci_high"] < good["f1_ci_low"]
    assert all(silent[k] is None for k in KEYS) and silent["f1"] is not None
    assert board["significance"]["validation_size"] == 360 and board["significance"]["f1_mismatch_run_ids"] == []


def test_an_invalid_metric_in_the_spec_is_one_line_naming_file_and_key(project: Project):
    result = run_sweep(project, [{"acc": 0.9}], PREDICTING_SPEC.format(name="x").replace("macro", "sideways"), 1)
    assert result.returncode == 2
    assert "params/spec.yaml: key 'metric.average': Input should be 'binary', 'macro', 'micro' or 'weighted'" \
        in result.stderr
    bad_rule = run_sweep(project, [{"acc": 0.9}], PREDICTING_SPEC.format(name="x"), 1, "--tie-break", "size:asc")
    assert bad_rule.returncode == 2 and "--tie-break: no hparam 'size' in the combinations" in bad_rule.stderr
    bad_form = run_sweep(project, [{"acc": 0.9}], PREDICTING_SPEC.format(name="x"), 1, "--tie-break", "acc")
    assert bad_form.returncode == 2 and "write hparam:asc or hparam:desc" in bad_form.stderr
