"""Ranking and rendering: pure functions over trial rows as read back from MLflow; learning curves
from a real (SQLite) MLflow store; the report assembled over a store (reused, never started, champion)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from hpsweep.model import PlannedTrial, TrialRow, TrialState
from hpsweep.report import plots
from hpsweep.report.leaderboard import (counts, leaderboard_frame, leaderboard_json, learning_curves, rank_rows,
                                        render_markdown, write_report)
from hpsweep.store import SweepStore


def run(index, f1, status="FINISHED", reason=None, **hp) -> TrialRow:
    return TrialRow(run_id=f"r{index}", run_name=f"run {index}", state=TrialState(status), hparams=hp or {"i": index},
                    f1=f1, reason=reason, index=index, attempt=1, duration_s=1.0)


def board(rows: list[TrialRow]) -> list[dict]:
    """The rows as leaderboard.json holds them."""
    return [r.leaderboard() for r in rows]


def test_rank_sorts_by_f1_then_file_order_and_puts_failures_last():
    rows = board(rank_rows([run(1, 0.5), run(2, None, "FAILED", "boom"), run(3, 0.9), run(4, 0.5),
                            run(5, 0.7, "REUSED")]))
    assert [r["run_id"] for r in rows] == ["r3", "r5", "r1", "r4", "r2"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1] == {**rows[-1], "f1": None, "status": "FAILED", "reason": "boom"}
    assert "reason" not in rows[0]


def test_a_run_that_ended_without_f1_is_a_failure_with_a_reason():
    rows = board(rank_rows([run(1, None, "KILLED")]))
    assert rows[0]["status"] == "FAILED" and "KILLED" in rows[0]["reason"]


def test_rank_edge_cases():
    assert rank_rows([]) == []
    # Nothing has an F1: file order (by index, not list order); no row is given an F1 it did not earn.
    failed = rank_rows([run(3, None, "FAILED"), run(1, None, "KILLED"), run(2, None, "NEVER_STARTED")])
    assert [(r.index, r.rank) for r in failed] == [(1, 1), (2, 2), (3, 3)]
    # Only FINISHED and REUSED rows are ranked by F1: a FAILED or RUNNING row holding an F1 (logged
    # before it failed) goes with the failures, its F1 left out of the leaderboard.
    rows = rank_rows([run(1, 0.99, "FAILED", "late crash"), run(2, 0.4), run(3, 0.8, "RUNNING"), run(4, 0.4, "REUSED")])
    assert [(r.index, r.rank) for r in rows] == [(2, 1), (4, 2), (1, 3), (3, 4)]
    assert [r["f1"] for r in board(rows)] == [0.4, 0.4, None, None]
    assert [r["status"] for r in board(rows)] == ["FINISHED", "REUSED", "FAILED", "FAILED"]
    assert counts(rows) == {"total": 4, "finished": 1, "failed": 2, "reused": 1}
    # Ranking again re-ranks (a stale rank is never kept); the input rows are left as they were.
    shuffled = [replace(r, rank=99) for r in reversed(rows)]
    assert rank_rows(shuffled) == rows and all(r.rank == 99 for r in shuffled)
    # F1 ties keep file order whatever the input order; 0.0 is an F1 like any other.
    tied = rank_rows([run(5, 0.0), run(3, 0.5), run(4, 0.5), run(1, None, "FAILED"), run(2, 0.5)])
    assert [r.index for r in tied] == [2, 3, 4, 5, 1]


def test_report_files_agree(tmp_path):
    rows = rank_rows([run(1, 0.25, lr=0.1, act="relu"), run(2, 0.75, lr=0.01, act="tanh"),
                      run(3, None, "FAILED", "F1 1.7 is outside [0, 1]", lr=1.0, act="relu")])
    sweep = {"sweep_id": "s-1", "name": "demo"}
    paths = write_report(tmp_path, sweep, rows)
    data = json.loads(paths["leaderboard.json"].read_text())
    assert data["sweep_id"] == "s-1" and data["counts"] == {"total": 3, "finished": 2, "failed": 1, "reused": 0}
    assert [r["f1"] for r in data["rows"]] == [0.75, 0.25, None]
    csv = paths["leaderboard.csv"].read_text().splitlines()
    assert csv[0] == ("rank,lr,act,f1,status,reason,attempts,duration_s,run_id,"
                      "f1_ci_low,f1_ci_high,p_beats_best,tied_with_best")  # no predictions: empty intervals
    assert csv[1].startswith("1,0.01,tanh,0.75,FINISHED")
    md = paths["leaderboard.md"].read_text()
    assert md.index("0.7500") < md.index("0.2500") < md.index(r"outside \[0, 1\]")  # [ ] escaped: never a link
    assert set(paths) == {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "best.json",
                          "f1_by_combination.png", "f1_by_hparam.png"}  # no curves given: no learning-curve plot
    best = json.loads(paths["best.json"].read_text())  # DVC's metrics file: the winner and the counts
    assert (best["best_f1"], best["best_hparams"], best["trials_failed"]) == (0.75, {"lr": 0.01, "act": "tanh"}, 1)
    assert images_linked(paths["leaderboard.md"]) == ["f1_by_combination.png", "f1_by_hparam.png"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_leaderboard_has_each_trials_duration():
    rows = rank_rows([replace(run(1, 0.5), duration_s=4.25), replace(run(2, 0.7), duration_s=185.0),
                      replace(run(3, None, "NEVER_STARTED"), duration_s=None)])
    md = render_markdown({"sweep_id": "s", "name": "n"}, rows)
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert header.split(" | ")[-2:] == ["duration", "run |"]
    cells = {line.split(" | ")[0]: line.split(" | ")[-2] for line in md.splitlines()
             if line[:3] in ("| 1", "| 2", "| 3")}
    assert cells == {"| 1": "3 min 05 s", "| 2": "4.2 s", "| 3": "—"}
    assert list(leaderboard_frame(rows)["duration_s"][:2]) == [185.0, 4.25]


def test_f1_bars_zoom_to_the_data_and_their_labels_fit():
    rows = rank_rows([run(i, 0.95 + i * 0.002, lr=10 ** -(i % 3)) for i in range(16)])
    fig = plots.f1_by_combination_figure(rows)
    ax = fig.axes[0]
    fig.canvas.draw()
    left, right = ax.get_xlim()
    assert 0.9 < left < 0.95 and right > 0.98  # not 0..1: 0.95 and 0.98 are told apart
    box = ax.get_window_extent()
    labels = [t for t in ax.texts if t.get_text().startswith("0.9")]
    assert len(labels) == 16 and all(box.x0 < t.get_window_extent().x1 <= box.x1 for t in labels)
    plt.close(fig)


def test_f1_by_hparam_draws_every_panel_alike_with_one_legend():
    # lr: few trials per value, act: many (categorical), depth: many (numeric): one statistic for all.
    rows = rank_rows([run(i, 0.9 + (i % 7) / 100, lr=10 ** -(i % 3), act=("relu", "tanh")[i % 2], depth=i % 2)
                      for i in range(12)])
    fig = plots.f1_by_hparam_figure(rows)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["lr", "act", "depth"]
    assert all(ax.get_legend() is None for ax in panels) and len(fig.legends) == 1  # one legend, for the figure
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a trial", "best F1 at each value"]
    assert {ax.get_ylim() for ax in panels} == {plots.f1_range([r.f1 for r in rows])}  # one zoomed F1 axis
    assert panels[0].get_ylim()[0] > 0.8
    marks = [[line for line in ax.lines if line.get_color() == plots.BEST] for ax in panels]
    assert all(len(m) == 1 and m[0].get_marker() == "_" for m in marks)  # the same mark in every panel
    assert list(marks[1][0].get_ydata()) == pytest.approx([0.96, 0.95])  # relu's best, tanh's best
    plt.close(fig)


def test_trials_reporting_one_step_get_no_learning_curve(tmp_path):
    rows = rank_rows([run(1, 0.8), run(2, 0.7)])
    curves = {"r1": [(0, 0.8)], "r2": [(0, 0.7)]}  # each trial logged val_f1 once, at its end
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "once"}, rows, curves)
    assert "learning_curves.png" not in paths and not (tmp_path / "learning_curves.png").exists()
    assert "learning" not in paths["leaderboard.md"].read_text().lower()


def test_a_sweep_where_every_trial_failed_draws_no_empty_f1_plot(tmp_path):
    rows = rank_rows([run(i, None, "FAILED", "unexpected keyword argument 'min_sample_leaf'", depth=i)
                      for i in range(6)])
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "broken"}, rows, {})
    assert {"f1_by_combination.png", "f1_by_hparam.png"}.isdisjoint(paths)
    assert not list(tmp_path.glob("*.png"))
    md = paths["leaderboard.md"].read_text()
    assert "top 0" not in md and "No F1 plots: no trial has an F1" in md
    assert images_linked(paths["leaderboard.md"]) == []
    with pytest.raises(ValueError, match="no trial has an F1"):
        plots.f1_by_combination_figure(rows)


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
    from hpsweep.store import redact_uri

    assert redact_uri("http://trainer:s3cret@mlflow:5000") == "http://***@mlflow:5000"
    assert redact_uri("postgresql://postgres:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"


def test_ranks_ten_thousand_trials():
    rows = board(rank_rows([run(i, (i * 7919 % 10007) / 10007) for i in range(10_000)]))
    assert [r["rank"] for r in rows[:3]] == [1, 2, 3] and rows[0]["f1"] >= rows[-1]["f1"]


def images_linked(md: Path) -> list[str]:
    """The markdown's image links, each checked to be a valid PNG beside it (as a viewer would load it)."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    for link in links:
        assert not Path(link).is_absolute() and "/" not in link, link  # relative: the folder can move
        with Image.open(md.parent / link) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()
    return links


def test_f1_by_hparam_has_one_panel_per_hparam_key():
    rows = rank_rows([run(i, f1, lr=lr, hidden=h, act=a, bn=i % 2 == 0)
                      for i, (f1, lr, h, a) in enumerate([(0.9, 0.01, 64, "relu"), (0.5, 0.0001, 8, "tanh"),
                                                         (0.7, 0.1, 64, "relu"), (0.3, 0.001, 128, "gelu")])]
                     + [run(9, None, "FAILED", "boom", lr=0.5, hidden=8, act="relu", bn=True)])
    fig = plots.f1_by_hparam_figure(rows)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["lr", "hidden", "act", "bn"]  # one per key, in file order, no empty panels
    assert panels["lr"].get_xscale() == "log"  # 1e-4 .. 1e-1 spans three decades
    assert panels["hidden"].get_xscale() == "linear"  # 8 .. 128 is numeric but not log-worthy
    assert [t.get_text() for t in panels["act"].get_xticklabels()] == ["gelu", "relu", "tanh"]
    assert [t.get_text() for t in panels["bn"].get_xticklabels()] == ["False", "True"]
    # every finished trial is a point in the numeric panels; the failed one (no F1) is not
    lr_points = sum(len(c.get_offsets()) for c in panels["lr"].collections)
    assert lr_points == 4
    plt.close(fig)


def test_log_axis_only_when_values_span_decades():
    assert plots.is_log_scale([0.0001, 0.001, 0.03])
    assert not plots.is_log_scale([8, 64, 128])
    assert not plots.is_log_scale([0.0, 0.1, 0.5])  # zero: no log axis
    assert not plots.is_log_scale([-1.0, 100.0])


def test_a_categorical_hparam_with_many_values_shows_the_best_ones():
    rows = rank_rows([run(i, i / 100, name=f"model-{i}") for i in range(100)])
    fig = plots.f1_by_hparam_figure(rows)
    ax = fig.axes[0]
    plt.close(fig)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == plots.CATEGORY_MAX and "model-99" in labels and "model-0" not in labels
    assert f"best {plots.CATEGORY_MAX} of 100 values" in ax.get_xlabel()


def test_f1_bars_stay_readable_for_thousands_of_trials(tmp_path):
    rows = rank_rows([run(i, (i * 7919 % 2003) / 2003, lr=10 ** -(i % 4), depth=i % 7) for i in range(1000)])
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "big"}, rows)
    fig = plots.f1_by_combination_figure(rows)
    bars, overview = fig.axes
    plt.close(fig)
    assert len(bars.patches) == plots.BAR_MAX and "top 60 of 1000" in bars.get_title()
    assert len(overview.lines[0].get_xdata()) == 1000  # all trials, best first, below the bars
    with Image.open(paths["f1_by_combination.png"]) as image:
        assert image.height < 3000  # not one bar per trial
    assert images_linked(paths["leaderboard.md"]) == ["f1_by_combination.png", "f1_by_hparam.png"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
    """A real MLflow tracking store (SQLite), shared by this module's tests (one experiment each)."""
    return SweepStore(MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"))


def trial(store: SweepStore, exp: str, index: int, f1: float | None, history: list[tuple[int, float]],
          status: str = "FINISHED", **hp) -> TrialRow:
    """A trial run with its per-epoch val_f1 (logged one value per call, like a trainer) and its row."""
    client = store.client
    run_id = client.create_run(exp, run_name=f"trial {index}").info.run_id
    for step, value in history:
        client.log_metric(run_id, "val_f1", value, step=step)
    if f1 is not None:
        client.log_metric(run_id, "f1", f1)
    client.set_terminated(run_id, status)
    return replace(run(index, f1, status, None if f1 is not None else "boom", **hp), run_id=run_id)


def test_learning_curves_of_the_top_trials_come_from_their_metric_history(store, tmp_path):
    exp = store.client.create_experiment("curves")
    runs = [trial(store, exp, i, f1, [(e, f1 * e / 4) for e in range(1, 5)], lr=10 ** -i, act="relu")
            for i, f1 in enumerate([0.6, 0.9, 0.7, 0.8, 0.5, 0.65, 0.55], start=1)]
    # a failed trial with the longest history must not be drawn; a reused one counts as finished
    runs.append(trial(store, exp, 8, None, [(e, 0.99) for e in range(1, 9)], "FAILED", lr=1.0, act="relu"))
    runs[2] = replace(runs[2], state=TrialState.REUSED)
    rows = rank_rows(runs)

    curves = learning_curves(store, rows)
    assert list(curves) == [r.run_id for r in rows[:5]]  # top 5 (default), in rank order
    best = rows[0]
    assert best.f1 == 0.9 and curves[best.run_id] == [(1, 0.225), (2, 0.45), (3, 0.675), (4, 0.9)]
    assert rows[2].leaderboard()["status"] == "REUSED" and rows[2].run_id in curves

    assert list(learning_curves(store, rows, top=20)) == [r.run_id for r in rows[:7]]  # never the failed one
    assert learning_curves(store, rows, top=0) == {}
    assert learning_curves(store, rows, top=2, metric="loss") == {rows[0].run_id: [], rows[1].run_id: []}
    with pytest.raises(ValueError, match="top"):
        learning_curves(store, rows, top=-1)

    report = tmp_path / "report"
    paths = write_report(report, {"sweep_id": "s", "name": "curves"}, rows, curves)
    assert images_linked(paths["leaderboard.md"]) == ["f1_by_combination.png", "f1_by_hparam.png",
                                                      "learning_curves.png"]
    assert set(paths) >= {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "learning_curves.png"}
    assert all(p.exists() for p in paths.values())
    fig = plots.learning_curves_figure(rows, curves)
    (ax,) = fig.axes
    assert [line.get_label()[:10] for line in ax.lines] == ["#1 F1 0.90", "#2 F1 0.80", "#3 F1 0.70",
                                                           "#4 F1 0.65", "#5 F1 0.60"]
    assert list(ax.lines[0].get_ydata()) == [0.225, 0.45, 0.675, 0.9]
    plt.close(fig)

    # Regenerated without curves: the learning-curve plot goes, not left stale beside the new report.
    paths = write_report(report, {"sweep_id": "s", "name": "curves"}, rows)
    assert "learning_curves.png" not in paths and not (report / "learning_curves.png").exists()
    assert "learning_curves.png" not in paths["leaderboard.md"].read_text()
    # The leaderboard.json contract is unchanged by the plots.
    data = json.loads(paths["leaderboard.json"].read_text())
    assert set(data) == {"sweep_id", "name", "counts", "rows"}
    assert set(data["rows"][0]) == {"rank", "hparams", "f1", "status", "run_id", "run_name", "attempts",
                                    "duration_s", "f1_ci_low", "f1_ci_high", "p_beats_best", "tied_with_best",
                                    "f1_recomputed"}  # issue 18's keys: null without predictions


def test_a_resumed_trial_that_logged_an_epoch_twice_keeps_the_latest_value(store):
    exp = store.client.create_experiment("resumed")
    row = trial(store, exp, 1, 0.8, [(1, 0.3), (2, 0.5)])
    # the retried attempt resumed from epoch 1's checkpoint and logged epochs 2 and 3 again, later
    store.client.log_batch(row.run_id, metrics=[Metric("val_f1", 0.6, 10**13, 2), Metric("val_f1", 0.8, 10**13, 3)])
    assert learning_curves(store, rank_rows([row])) == {row.run_id: [(1, 0.3), (2, 0.6), (3, 0.8)]}


def test_top_trials_without_a_metric_history_get_a_note_not_an_empty_plot(store, tmp_path):
    exp = store.client.create_experiment("silent")
    rows = rank_rows([trial(store, exp, 1, 0.8, []), trial(store, exp, 2, 0.7, [])])
    curves = learning_curves(store, rows)
    assert curves == {rows[0].run_id: [], rows[1].run_id: []}
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "silent"}, rows, curves)
    assert "learning_curves.png" not in paths
    assert "logged no per-step `val_f1`" in paths["leaderboard.md"].read_text()


# ---------------------------------------------------------------- the report assembled over a store


def test_the_report_lists_every_combination_reused_and_never_started_included(tmp_path):
    from hpsweep.model import Outcome
    from hpsweep.report.assemble import NEVER_STARTED_REASON, build_report, rebuild_report, sweep_meta
    from hpsweep.report.status import SweepRecord
    from hpsweep.store import TAG_QUOTA, TAG_SPEC_HASH
    from tests.memstore import InMemoryStore

    store = InMemoryStore()
    exp = store.ensure_experiment("demo")
    old = store.start_trial_run(exp, "demo-0", 7, {"i": 3, "was": "row 7"}, "k3")  # an earlier sweep's winner
    store.finish_trial_run(old, Outcome(True, 0.95, started_at=0.0, ended_at=2.0))
    parent = store.start_parent_run(exp, "demo-1", {TAG_SPEC_HASH: "h", TAG_QUOTA: "2"})
    trials = [PlannedTrial(i, {"i": i}, f"k{i}") for i in range(1, 5)]
    ok = store.start_trial_run(exp, "demo-1", 1, {"i": 1}, "k1")
    store.log_metric(ok, "val_f1", 1, 0.5)
    store.log_metric(ok, "val_f1", 2, 0.6)
    store.finish_trial_run(ok, Outcome(True, 0.6, started_at=0.0, ended_at=1.0))
    bad = store.start_trial_run(exp, "demo-1", 2, {"i": 2}, "k2")
    store.finish_trial_run(bad, Outcome(False, None, "boom"))
    reused = store.finished_trials_by_key(exp, {"k3"}, {})
    provenance = {TAG_SPEC_HASH: "h", TAG_QUOTA: "2"}
    meta = sweep_meta("demo-1", "demo", exp, parent, "http://u:secret@mlflow:5000", provenance, 2)

    rows, header, paths = build_report(store, meta, trials, reused, tmp_path / "sweep", register=True)
    assert [(r.index, r.state, r.rank) for r in rows] == [(3, TrialState.REUSED, 1), (1, TrialState.FINISHED, 2),
                                                          (2, TrialState.FAILED, 3), (4, TrialState.NEVER_STARTED, 4)]
    assert (rows[0].run_id, rows[0].f1, rows[0].hparams) == (old, 0.95, {"i": 3})  # the original run, this sweep's row
    assert board(rows)[3] == {"rank": 4, "hparams": {"i": 4}, "f1": None, "status": "FAILED", "run_id": "",
                              "run_name": "i=4", "attempts": 0, "duration_s": None, "reason": NEVER_STARTED_REASON,
                              "f1_ci_low": None, "f1_ci_high": None, "p_beats_best": None, "tied_with_best": None,
                              "f1_recomputed": None}
    assert header["champion"] == f"models:/demo@champion (version 1, run {old})" and store.champions["demo"] == ("1", old)
    assert header["champion_moved"] is True and header["champion_note"].startswith("champion registered: the first")
    assert header["tracking_uri"] == "http://***@mlflow:5000" and (header["spec_hash"], header["quota"]) == ("h", 2)
    assert set(paths) >= {"leaderboard.json", "best.json", "learning_curves.png"}
    written = json.loads(paths["leaderboard.json"].read_text())
    assert written["rows"] == board(rows) and written["champion"] == header["champion"]
    best = json.loads(paths["best.json"].read_text())
    assert (best["champion"], best["champion_moved"]) == (header["champion"], True)
    assert f"- champion: `{header['champion']}` (moved by this sweep)" in paths["leaderboard.md"].read_text()

    # `hpsweep report`: from plan.json and the runs alone, the same file again; nothing registered.
    store.log_plan(parent, [TrialRow(index=t.index, hparams=t.hparams, key=t.key, state=TrialState.PLANNED)
                            if t.key != "k3" else TrialRow.from_plan_entry({"index": 3, "hparams": {"i": 3}, "key": "k3",
                                                                            "reused_run_id": old}) for t in trials])
    record = SweepRecord(name="demo", experiment_id=exp, sweep_id="demo-1", parent_run_id=parent,
                         parent_status="FAILED", started_at=0.0, ended_at=1.0, tags=provenance, params={})
    store.tracking_uri = "http://u:secret@mlflow:5000"
    again = rebuild_report(store, record, tmp_path / "again")
    assert (tmp_path / "again" / "leaderboard.json").read_bytes() == paths["leaderboard.json"].read_bytes()
    assert again[0] == rows and store.versions["demo"] == 1


# ---------------------------------------------------------------- the report folders


def test_latest_is_a_relative_link_swapped_over_the_old_one(tmp_path):
    from hpsweep.report.folders import point_latest

    for sweep in ("s-1", "s-2"):
        (tmp_path / sweep).mkdir()
        (tmp_path / sweep / "best.json").write_text(sweep)
        latest = point_latest(tmp_path / sweep)
        assert latest.is_symlink() and str(latest.readlink()) == sweep  # relative: the reports folder can move
        assert (latest / "best.json").read_text() == sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "s-1", "s-2"]  # no temporary name left


def test_latest_is_a_copy_where_links_cannot_be_made(tmp_path, monkeypatch):
    from hpsweep.report.folders import point_latest

    def no_links(self, *args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    for sweep in ("s-1", "s-2"):
        (tmp_path / sweep).mkdir()
        (tmp_path / sweep / "best.json").write_text(sweep)
        latest = point_latest(tmp_path / sweep)
        assert not latest.is_symlink() and (latest / "best.json").read_text() == sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "s-1", "s-2"]
    monkeypatch.undo()
    assert point_latest(tmp_path / "s-1").is_symlink()  # links work again: the copy is replaced by one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "s-1", "s-2"]
