"""Ranking and rendering: pure functions over rows as read back from MLflow."""

import json

from hpsweep.report import leaderboard_frame, leaderboard_json, rank_rows, render_markdown, write_report


def run(index, f1, status="FINISHED", reason=None, **hp):
    return {"run_id": f"r{index}", "run_name": f"run {index}", "status": status, "hparams": hp or {"i": index},
            "f1": f1, "reason": reason, "index": index, "attempt": 1, "duration_s": 1.0}


def test_rank_sorts_by_f1_then_file_order_and_puts_failures_last():
    rows = rank_rows([run(1, 0.5), run(2, None, "FAILED", "boom"), run(3, 0.9), run(4, 0.5), run(5, 0.7, "REUSED")])
    assert [r["run_id"] for r in rows] == ["r3", "r5", "r1", "r4", "r2"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1] == {**rows[-1], "f1": None, "status": "FAILED", "reason": "boom"}
    assert "reason" not in rows[0]


def test_a_run_that_ended_without_f1_is_a_failure_with_a_reason():
    rows = rank_rows([{**run(1, None, "RUNNING"), "mlflow_status": "KILLED"}])
    assert rows[0]["status"] == "FAILED" and "KILLED" in rows[0]["reason"]


def test_report_files_agree(tmp_path):
    rows = rank_rows([run(1, 0.25, lr=0.1, act="relu"), run(2, 0.75, lr=0.01, act="tanh"),
                      run(3, None, "FAILED", "F1 1.7 is outside [0, 1]", lr=1.0, act="relu")])
    sweep = {"sweep_id": "s-1", "name": "demo"}
    paths = write_report(tmp_path, sweep, rows)
    data = json.loads(paths["leaderboard.json"].read_text())
    assert data["sweep_id"] == "s-1" and data["counts"] == {"total": 3, "finished": 2, "failed": 1, "reused": 0}
    assert [r["f1"] for r in data["rows"]] == [0.75, 0.25, None]
    csv = paths["leaderboard.csv"].read_text().splitlines()
    assert csv[0] == "rank,lr,act,f1,status,reason,attempts,duration_s,run_id"
    assert csv[1].startswith("1,0.01,tanh,0.75,FINISHED")
    md = paths["leaderboard.md"].read_text()
    assert md.index("0.7500") < md.index("0.2500") < md.index("outside [0, 1]")
    assert paths["f1_by_combination.png"].read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp*"))


def test_markdown_escapes_reasons_that_would_break_the_table():
    rows = rank_rows([run(1, None, "FAILED", "a | b\nc")])
    line = [l for l in render_markdown({"sweep_id": "s", "name": "n"}, rows).splitlines() if l.startswith("| 1 ")][0]
    assert "a \\| b c" in line


def test_json_and_frame_keep_hparam_types():
    rows = rank_rows([run(1, 0.5, lr=0.1, layers=3, bn=True)])
    assert json.loads(leaderboard_json({"sweep_id": "s"}, rows))["rows"][0]["hparams"] == {"lr": 0.1, "layers": 3,
                                                                                          "bn": True}
    assert leaderboard_frame(rows).loc[0, "layers"] == 3


def test_credentials_never_reach_the_report():
    from hpsweep.tracking import redact_uri

    assert redact_uri("http://trainer:s3cret@mlflow:5000") == "http://***@mlflow:5000"
    assert redact_uri("postgresql://postgres:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"


def test_ranks_ten_thousand_trials():
    rows = rank_rows([run(i, (i * 7919 % 10007) / 10007) for i in range(10_000)])
    assert [r["rank"] for r in rows[:3]] == [1, 2, 3] and rows[0]["f1"] >= rows[-1]["f1"]
