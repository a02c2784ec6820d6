"""The report phase cannot lose a sweep (issue 14): leaderboard.json reaches MLflow first, a full or
unwritable report folder and a plot that cannot be drawn cost a warning (never the exit code, never
an open parent run), and no value (HTML, markdown, a spreadsheet formula, 1e308, 10 MB) can inject
into, break or stall the report."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from hpsweep.model import TrialRow, TrialState
from hpsweep.report import plots
from hpsweep.report.cells import VALUE_CHARS
from hpsweep.report.leaderboard import leaderboard_frame, rank_rows, render_markdown, write_report
from tests.conftest import Project
from tests.memstore import InMemoryStore
from tests.test_engine import TRAINER_ERROR
from tests.test_engine_sweep import f1s, run_sweep

REPORT_FILES = ("leaderboard.json", "best.json", "leaderboard.csv", "leaderboard.md", "f1_by_combination.png",
                "f1_by_hparam.png")
HOSTILE = {  # hparam key → value, each trying to escape its table cell
    "<img src=x onerror=alert(1)>": "</td><script>alert(1)</script>",
    "logo": "![x](http://evil.example/x.png)",
    "link": "[click](http://evil.example)",
    "pipe": "a|b",
    "lines": "one\ntwo\r\nthree",
    "code": "`x` *b* _i_ ~~s~~ \\| &amp;",
}
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd", "\t=1", "\r=1"]


def trial(index: int, f1: float | None, reason: str | None = None, **hparams) -> TrialRow:
    return TrialRow(run_id=f"run{index:04d}", run_name=f"trial {index}", index=index, attempt=1, hparams=hparams,
                    state=TrialState.FINISHED if f1 is not None else TrialState.FAILED, f1=f1, reason=reason,
                    duration_s=1.0)


def rendered_html(markdown: str) -> str:
    """The markdown as a GFM-like renderer shows it (tables and strikethrough on, raw HTML passed through)."""
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


# ---------------------------------------------------------------- markdown and csv cells


def test_markdown_cells_cannot_inject_html_images_or_links_nor_break_the_table():
    rows = rank_rows([trial(1, 0.9, **HOSTILE), trial(2, None, "<img src=x onerror=alert(2)> | ![y](http://e/y.png)",
                                                      **HOSTILE)])
    sweep = {"sweep_id": "s-<b>1</b>", "name": "n`<script>`", "settings": {"<i>k": "![z](http://e/z.png)"},
             "champion": "models:/n@champion", "champion_moved": False, "champion_note": "</td><img src=x>"}
    text = rendered_html(render_markdown(sweep, rows))
    for forbidden in ("<img", "<script", "</td><", "<b>", "<i>", "<a ", "<em>", "<strong>", "<s>", "<del>"):
        assert forbidden not in text, forbidden
    table = text[text.index("<table>"):]
    columns = 1 + len(HOSTILE) + 5  # rank, the hparams, F1, status, attempts, duration, run
    cells = (len(re.findall(r"<th[ >]", table)), len(re.findall(r"<td[ >]", table)))
    assert cells == (columns, 2 * columns)  # no cell split, no row broken
    assert "![x](http://evil.example/x.png)" in table and "a|b" in table  # shown as text, whole
    assert "one two three" in table  # newlines are spaces


def test_csv_cells_a_spreadsheet_would_run_are_neutralised_and_numbers_stay_numbers():
    rows = rank_rows([trial(i, None, formula, **{"=key": formula, "neg": -0.5, "neg_text": "-0.5"})
                      for i, formula in enumerate(FORMULAS, 1)])
    table = list(csv.reader(io.StringIO(leaderboard_frame(rows).to_csv(index=False), newline="")))
    header, body = table[0], table[1:]
    assert header[1] == "'=key"
    for line in body:
        cells = dict(zip(header, line))
        assert cells["'=key"] == cells["reason"] and cells["reason"].startswith("'")
        assert (cells["neg"], cells["neg_text"]) == ("-0.5", "-0.5")  # a number is no formula
    assert [dict(zip(header, line))["reason"] for line in body] == ["'" + f.replace("\r", "\n") for f in FORMULAS]


def test_long_values_are_cut_in_md_csv_and_plot_labels_but_kept_whole_in_json(tmp_path):
    big = "x" * 10_000_000
    rows = rank_rows([trial(1, 0.9, blob=big, n=1), trial(2, 0.8, blob="small", n=2)])
    markdown = render_markdown({"sweep_id": "s", "name": "n"}, rows)
    assert max(len(line) for line in markdown.splitlines()) < 2 * VALUE_CHARS
    assert max(len(cell) for line in csv.reader(io.StringIO(leaderboard_frame(rows).to_csv(index=False)))
               for cell in line) == VALUE_CHARS
    fig = plots.f1_by_hparam_figure(rows)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    plots.plt.close(fig)
    assert labels and max(map(len, labels)) <= plots.LABEL_CHARS
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "n"}, rows)
    assert json.loads(paths["leaderboard.json"].read_text())["rows"][0]["hparams"]["blob"] == big
    assert set(paths) == set(REPORT_FILES)


# ---------------------------------------------------------------- plots


@pytest.mark.parametrize("values", [
    pytest.param([1e308], id="one-trial-1e308"),
    pytest.param([-1e308, 1e308], id="plus-minus-1e308"),
    pytest.param([10 ** 400, 1], id="huge-int"),
    pytest.param([10 ** 400, "adam", 1e308, None, [1, 2], {"a": 1}, True, float("nan")], id="mixed-types"),
])
def test_plots_draw_extreme_values(tmp_path, caplog, values):
    rows = rank_rows([trial(i, 1 - 0.1 * i, lr=v) for i, v in enumerate(values, 1)]
                     + [trial(99, None, "boom", lr=1e308), trial(98, None, "boom", lr=10 ** 400)])
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "n"}, rows)
    assert set(paths) == set(REPORT_FILES) and not caplog.records
    assert "f1_by_hparam.png" in paths["leaderboard.md"].read_text()


def test_a_plot_that_cannot_be_drawn_is_skipped_with_one_warning(tmp_path, caplog, monkeypatch):
    (tmp_path / "f1_by_hparam.png").write_bytes(b"a stale plot of an earlier sweep")

    def broken(rows):
        plots.plt.figure()  # half-drawn: its figure must be closed all the same
        raise ValueError("arange: cannot compute length")
    monkeypatch.setattr(plots, "f1_by_hparam_figure", broken)
    figures = len(plots.plt.get_fignums())
    paths = write_report(tmp_path, {"sweep_id": "s", "name": "n"}, rank_rows([trial(1, 0.5, lr=0.1)]))
    assert set(paths) == set(REPORT_FILES) - {"f1_by_hparam.png"}
    assert not (tmp_path / "f1_by_hparam.png").exists()  # no stale plot, and the markdown does not link one
    assert "f1_by_hparam.png" not in paths["leaderboard.md"].read_text()
    assert [r.getMessage() for r in caplog.records] == [
        f"report: skipped f1_by_hparam.png in {tmp_path}: ValueError: arange: cannot compute length"]
    assert len(plots.plt.get_fignums()) == figures


# ---------------------------------------------------------------- the sweep's end


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Four combinations for ``tests.test_engine_sweep.run_sweep`` (the report goes to ``report/``)."""
    (tmp_path / "train.csv").write_text("x,y\n1,0\n")
    (tmp_path / "val.csv").write_text("x,y\n1,0\n")
    combos = [{"lr": lr, "depth": d} for lr in (0.1, 0.2) for d in (1, 2)]
    (tmp_path / "combos.yaml").write_text(yaml.safe_dump({"combinations": combos}))
    spec = {"name": "mem", "trainer": {"entrypoint": "tests.trainers:sleepy"}, "resources": {"gpus": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


class RecordingStore(InMemoryStore):
    """Notes, when leaderboard.json reaches the parent run, which report files exist locally already."""

    def __init__(self, report_dir: Path):
        super().__init__()
        self.report_dir = report_dir
        self.local_when_published: list[str] | None = None

    def log_report_text(self, parent_run_id: str, name: str, text: str) -> None:
        self.local_when_published = sorted(p.name for p in self.report_dir.glob("*")) \
            if self.report_dir.is_dir() else []
        super().log_report_text(parent_run_id, name, text)


def published_board(store: InMemoryStore, parent_run_id: str) -> dict:
    return json.loads(store.runs[parent_run_id].artifacts["report/leaderboard.json"])


def test_leaderboard_json_reaches_the_parent_run_before_any_local_file(sweep_dir):
    store = RecordingStore(sweep_dir / "report")
    opened, _, summary = run_sweep(sweep_dir, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}))
    assert store.local_when_published == []
    board = published_board(store, opened.run.parent_run_id)
    assert board == json.loads((sweep_dir / "report" / "leaderboard.json").read_text())
    assert store.runs[opened.run.parent_run_id].status == "FINISHED"


def test_an_unwritable_report_folder_costs_a_warning_not_the_sweep(sweep_dir, caplog):
    (sweep_dir / "report").write_text("a file where the report folder should be")
    store = InMemoryStore()
    opened, _, summary = run_sweep(sweep_dir, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}))
    parent = store.runs[opened.run.parent_run_id]
    assert parent.status == "FINISHED" and summary["counts"]["failed"] == 0  # exit 0, as the trials say
    assert [r["f1"] for r in published_board(store, parent.run_id)["rows"]] == [0.9, 0.7, 0.6, 0.5]
    assert summary["report_files"] == {}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("nothing written" in m and str(sweep_dir / "report") in m for m in messages), messages
    assert any(f"hpsweep report {opened.run.sweep_id} --report-dir" in m for m in messages), messages


def fill_disk(report_dir: Path, names: tuple[str, ...]) -> None:
    """Each file's temporary twin points at /dev/full: writing it fails with ENOSPC, as on a full disk."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = name + (".tmp.png" if name.endswith(".png") else ".tmp")
        os.symlink("/dev/full", report_dir / tmp)


def test_a_full_disk_keeps_what_fits_and_names_what_it_cost(sweep_dir, caplog):
    full = ("leaderboard.md", "leaderboard.csv", "f1_by_combination.png")
    fill_disk(sweep_dir / "report", full)
    store = InMemoryStore()
    opened, _, summary = run_sweep(sweep_dir, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7}) | {4: [TRAINER_ERROR]})
    parent = store.runs[opened.run.parent_run_id]
    assert parent.status == "FAILED" and summary["counts"]["failed"] == 1  # exit 1, as the trials say
    assert set(summary["report_files"]) == set(REPORT_FILES) - set(full)
    assert sorted(p.name for p in (sweep_dir / "report").iterdir()) == sorted(set(REPORT_FILES) - set(full))
    assert {f"report/{name}" for name in summary["report_files"]} <= set(parent.artifacts)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("report: skipped")]
    assert len(skipped) == 1 and "leaderboard.csv, f1_by_combination.png, leaderboard.md" in skipped[0]
    assert "No space left on device" in skipped[0]


def test_a_registry_failure_still_closes_the_parent_run_with_the_reason(sweep_dir):
    store = InMemoryStore()

    def refused(*args, **kwargs):
        raise PermissionError("403: registry refused")
    store.register_champion = refused
    with pytest.raises(PermissionError):
        run_sweep(sweep_dir, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}))
    parent = next(r for r in store.runs.values() if r.role == "sweep")
    assert parent.status == "FAILED" and "403: registry refused" in parent.tags["hpsweep.reason"]


def test_hpsweep_report_says_when_it_cannot_write_the_leaderboard_and_changes_nothing(sweep_dir):
    from hpsweep.report.assemble import ReportNotWritten, rebuild_report
    from hpsweep.report.status import SweepRecord

    store = InMemoryStore()
    opened, _, _ = run_sweep(sweep_dir, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}))
    run = opened.run
    record = SweepRecord(name=run.name, experiment_id=run.experiment_id, sweep_id=run.sweep_id,
                         parent_run_id=run.parent_run_id, parent_status="FINISHED", started_at=0.0, ended_at=1.0,
                         tags=opened.provenance, params={})
    fill_disk(sweep_dir / "again", ("leaderboard.json",))
    with pytest.raises(ReportNotWritten, match="leaderboard.json could not be written"):
        rebuild_report(store, record, sweep_dir / "again")
    assert store.runs[run.parent_run_id].status == "FINISHED"  # a report written again changes nothing in MLflow


# ---------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_a_sweep_whose_report_folder_is_full_exits_as_its_trials_say(project: Project):
    """The real CLI, every report file on a full disk: exit 0 (every trial finished), a warning,
    the parent run FINISHED, and the leaderboard on it in MLflow."""
    from mlflow.tracking import MlflowClient

    from tests.test_sweep_e2e import SLEEPY_SPEC
    from tests.test_sweep_e2e import run_sweep as run_cli

    fill_disk(project.root / "reports" / "full", REPORT_FILES)
    result = run_cli(project, [{"f1": 0.7, "mode": "ok"}, {"f1": 0.8, "mode": "ok"}],
                     SLEEPY_SPEC.format(name="full", sleep_s=0.05, gpus=1), 2, "--report-dir", "reports/full")
    out = " ".join((result.stdout + result.stderr).split())  # the log's lines are wrapped
    assert result.returncode == 0, out
    assert "report: skipped" in out and "No space left on device" in out and "hpsweep report full-" in out
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    parent, = client.search_runs([client.get_experiment_by_name("full").experiment_id], "tags.`hpsweep.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    board = Path(client.download_artifacts(parent.info.run_id, "report/leaderboard.json", str(project.root)))
    assert [r["f1"] for r in json.loads(board.read_text())["rows"]] == [0.8, 0.7]
