"""Each sweep's report in its own folder, `latest` on the newest; `hpsweep report`: the report of any
past sweep, written again from MLflow alone, is the one the sweep wrote (same files, same ranking), by
sweep name (latest execution) or by sweep id."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, run_sweep

pytestmark = pytest.mark.slow


def files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Each file's bytes and modification time: a report left untouched keeps both."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_each_sweep_keeps_its_own_report_and_latest_moves(served_project: Project):
    project = served_project
    combos = [{"f1": f, "mode": "ok"} for f in (0.61, 0.93, 0.72)] + [{"f1": 0.99, "mode": "raise"}]
    spec = SLEEPY_SPEC.format(name="again", sleep_s=0.1, gpus=1)
    result = run_sweep(project, combos, spec, 2)
    assert result.returncode == 1  # one trial fails: still a report
    reports = project.root / "reports" / "again"
    first = leaderboard(project, "again")  # read through reports/again/latest
    first_dir = reports / first["sweep_id"]
    assert (reports / "latest").is_symlink() and (reports / "latest").resolve() == first_dir.resolve()
    assert f"report: reports/again/{first['sweep_id']}/leaderboard.md" in result.stdout  # the path written
    written = files(first_dir)
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "f1_by_combination.png"} <= written
    before = snapshot(first_dir)

    # A second sweep of the same name (every trial reused, so no plot of its own would differ much):
    # its own folder; the first one's files untouched; `latest` moves to it.
    assert run_sweep(project, combos, spec, 2).returncode == 1
    second = leaderboard(project, "again")
    assert second["sweep_id"] != first["sweep_id"]
    assert [r["status"] for r in second["rows"]] == ["REUSED"] * 3 + ["FAILED"]
    assert (reports / "latest").resolve() == (reports / second["sweep_id"]).resolve()
    assert snapshot(first_dir) == before
    assert sorted(p.name for p in reports.iterdir()) == sorted([first["sweep_id"], second["sweep_id"], "latest"])

    # `hpsweep report` of the older sweep, by id: written again into its own folder, the same report;
    # `latest` stays on the newer sweep.
    shutil.rmtree(first_dir)
    result = project.hpsweep("report", first["sweep_id"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert files(first_dir) == written
    assert json.loads((first_dir / "leaderboard.json").read_text()) == first  # same header, rows, ranking
    assert "0.9300" in result.stdout and f"reports/again/{first['sweep_id']}/leaderboard.md" in result.stdout
    assert (reports / "latest").resolve() == (reports / second["sweep_id"]).resolve()

    # By name: the latest execution, into its folder, `latest` still there.
    shutil.rmtree(reports / second["sweep_id"])
    assert project.hpsweep("report", "again").returncode == 0
    assert leaderboard(project, "again") == second

    # --report-dir: exactly there, and `latest` is not moved (for `report` as for `run`).
    result = project.hpsweep("report", first["sweep_id"], "--report-dir", "old")
    assert result.returncode == 0, result.stdout + result.stderr
    old = json.loads((project.root / "old" / "leaderboard.json").read_text())
    assert {k: v for k, v in old.items() if k != "champion"} == {k: v for k, v in first.items() if k != "champion"}
    assert [(r["rank"], r["run_id"], r["f1"]) for r in old["rows"]] == [
        (r["rank"], r["run_id"], r["f1"]) for r in first["rows"]]
    result = run_sweep(project, combos, spec, 2, "--report-dir", "mine")
    third = json.loads((project.root / "mine" / "leaderboard.json").read_text())
    assert "report: mine/leaderboard.md" in result.stdout and not (project.root / "mine" / "latest").exists()
    assert third["sweep_id"] not in {p.name for p in reports.iterdir()}
    assert (reports / "latest").resolve() == (reports / second["sweep_id"]).resolve()


def test_hpsweep_alone_prints_its_help_and_version_says_which():
    import subprocess
    import sys

    from tests.conftest import REPO

    alone = subprocess.run([sys.executable, "-m", "hpsweep.cli"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert alone.returncode == 0 and "usage: hpsweep" in alone.stdout and "run a sweep" in alone.stdout
    version = subprocess.run([sys.executable, "-m", "hpsweep.cli", "--version"], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("hpsweep ")


@pytest.mark.slow
def test_list_shows_past_sweeps_newest_first_with_counts_best_f1_and_the_champion(project: Project):
    spec = SLEEPY_SPEC.format(name="listed", sleep_s=0.05, gpus=1)
    ok = {"f1": 0.9, "mode": "ok"}
    assert run_sweep(project, [ok, {"f1": 0.5, "mode": "raise"}], spec, 2).returncode == 1
    assert run_sweep(project, [ok, {"f1": 0.7, "mode": "ok"}], spec, 2).returncode == 0  # reuses 0.9, trains 0.7
    listed = project.hpsweep("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    second, first = rows
    assert second["started"] >= first["started"] and second["name"] == first["name"] == "listed"
    assert (first["total"], first["finished"], first["failed"], first["best_f1"]) == (2, 1, 1, 0.9)
    assert (second["total"], second["finished"], second["reused"], second["failed"]) == (2, 1, 1, 0)
    assert first["champion"] == "version 1" and second["champion"] is None  # the first sweep crowned it
    table = project.hpsweep("list", "listed")
    assert table.returncode == 0 and first["sweep_id"] in table.stdout and "0.9000" in table.stdout
    assert json.loads(project.hpsweep("list", "nothing-by-that-name", "--json").stdout) == []
