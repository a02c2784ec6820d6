"""The MLflow UI, as a user opens it after a sweep: a real `mlflow server`, a real sweep, headless Chromium.

Needs Debian's `chromium` (`/usr/bin/chromium`; `.ci/run` installs it) and the `playwright` package.
The screenshot is kept under `test-artifacts/browser/` (git-ignored) whether the test passes or not.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, run_sweep

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "browser"
UI_TIMEOUT_MS = 90_000  # a React app on 2 busy cores: first paint alone can take 10-20 s
F1_COLUMN = '[col-id="metrics.`f1`"]'
NAME_COLUMN = '[col-id="attributes.`Run Name`"]'


@pytest.fixture
def browser_page():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)  # actions; expect() takes its own timeout
            yield page
        finally:
            browser.close()


def test_mlflow_ui_lists_every_trial_run_with_its_f1(served_project: Project, mlflow_server, browser_page):
    from playwright.sync_api import expect

    project, page = served_project, browser_page
    combos = [{"f1": f, "mode": "ok"} for f in (0.61, 0.93, 0.72, 0.88)] + [{"f1": 0.99, "mode": "raise"}]
    result = run_sweep(project, combos, SLEEPY_SPEC.format(name="browser-sweep", sleep_s=0.1, gpus=1), 2,
                       env={"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert result.returncode == 1, result.stderr  # the `raise` trial failed, the sweep finished
    board = leaderboard(project, "browser-sweep")
    expected = {r["run_name"]: r["f1"] for r in board["rows"]}  # the failed trial: None
    assert len(expected) == 5

    parent_name = MlflowClient(mlflow_server.url).get_run(board["parent_run_id"]).info.run_name
    # The URL the sweep's summary prints, as a user would copy it (README: "See the results").
    printed = re.search(r"MLflow UI: (\S+)", result.stdout)
    assert printed, result.stdout
    url = printed.group(1)
    assert url.startswith(f"{mlflow_server.url}/#/experiments/{board['experiment_id']}/runs?"), url
    shot = ARTIFACTS / "mlflow_ui_runs_with_f1.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        page.goto(url)
        # The runs table, not MLflow 3's GenAI overview ("No data available", "Detect Issues").
        expect(page.get_by_text("matching runs")).to_be_visible(timeout=UI_TIMEOUT_MS)
        assert "/runs" in page.url and "/overview" not in page.url, page.url
        expect(page.get_by_text("Detect Issues")).to_have_count(0)
        # f1 is a column from the start: no Columns menu to open.
        expect(page.locator(f'[role="columnheader"]{F1_COLUMN}')).to_have_text("f1", timeout=UI_TIMEOUT_MS)
        # The trials are child runs, folded under the sweep's parent run: unfold it.
        parent = page.get_by_role("gridcell").filter(has=page.get_by_role("link", name=parent_name, exact=True))
        parent.get_by_role("button").first.click()
        expect(page.locator(f'[role="gridcell"]{F1_COLUMN}')).to_have_count(1 + len(expected), timeout=UI_TIMEOUT_MS)
        close_assistant = page.get_by_role("button", name="Close")
        if close_assistant.count():
            close_assistant.first.click()  # the assistant side panel would cover the f1 column
        listed = table_rows(page)
    finally:
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot} ({time.monotonic() - started:.1f} s in the browser)")

    assert list(listed)[0] == parent_name and listed.pop(parent_name) == "-"  # the parent has best_f1, no f1
    assert sorted(listed) == sorted(expected)  # every trial run, by its name, and nothing else
    for name, f1 in expected.items():
        shown = listed[name]
        if f1 is None:
            assert shown == "-", f"failed trial {name} shows an F1: {shown!r}"
        else:
            assert shown != "-" and float(shown) == pytest.approx(f1, abs=5e-4), (name, shown)


def table_rows(page) -> dict[str, str]:
    """Run name → text of its f1 cell, in the table's order. The grid renders the pinned name column
    and the scrolling metric columns as separate rows sharing a `row-index`."""
    names: dict[str, str] = {}
    f1s: dict[str, str] = {}
    for column, into in ((NAME_COLUMN, names), (F1_COLUMN, f1s)):
        for cell in page.locator(f'[role="gridcell"]{column}').all():
            index = cell.locator("xpath=ancestor::*[@role='row'][1]").get_attribute("row-index")
            into[index] = cell.get_by_role("link").inner_text() if column == NAME_COLUMN else cell.inner_text()
    order = sorted(names, key=int)
    assert set(order) == set(f1s), f"name and f1 cells disagree: {names} {f1s}"
    return {names[i].strip(): f1s[i].strip() for i in order}
