"""A whole sweep execution through the engine on the in-memory store: reuse, zombies, dispatch
order, ranking, the champion and the parent run's end, with no MLflow, Prefect or trainer process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpsweep.config import SweepConfig
from hpsweep.engine import sweep as engine
from hpsweep.engine.controller import RetryPolicy, SweepEngine
from hpsweep.inputs import load_inputs
from hpsweep.model import Outcome, TrialState
from tests.memstore import InMemoryStore
from tests.test_engine import LOST_HOST, TRAINER_ERROR, ScriptedLauncher


@pytest.fixture
def project(tmp_path: Path):
    return write_project(tmp_path)


def write_project(tmp_path: Path) -> Path:
    """Four combinations, a one-epoch spec and tiny data files: what the in-memory sweeps run."""
    (tmp_path / "train.csv").write_text("x,y\n1,0\n")
    (tmp_path / "val.csv").write_text("x,y\n1,0\n")
    combos = [{"lr": lr, "depth": d} for lr in (0.1, 0.2) for d in (1, 2)]
    (tmp_path / "combos.yaml").write_text(yaml.safe_dump({"combinations": combos}))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "mem", "trainer": {"entrypoint": "tests.trainers:sleepy"},
                                                        "settings": {"epochs": 1}, "resources": {"gpus": 1}}))
    return tmp_path


def config(project: Path, **kw) -> SweepConfig:
    return SweepConfig(combinations=project / "combos.yaml", spec=project / "spec.yaml", train=project / "train.csv",
                       val=project / "val.csv", quota=2, work_dir=project / "work",
                       **{"report_dir": project / "report", **kw})


def run_sweep(project: Path, store: InMemoryStore, script=None, capacity=2, **kw):
    cfg = config(project, **kw)
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    opened = engine.open_sweep(cfg, inputs, store, capacity=capacity, queue_depth=capacity)
    launcher = ScriptedLauncher(store, script or {})
    SweepEngine(opened.run, launcher, RetryPolicy(first_delay_s=0), sleep=lambda s: False).run(
        opened.to_train, opened.parallel)
    return opened, launcher, engine.close_sweep(opened, store, cfg.report_dir)


def f1s(store: InMemoryStore, scores: dict[int, float]) -> dict[int, list[Outcome]]:
    return {i: [Outcome(True, f, started_at=0, ended_at=10.0 * i)] for i, f in scores.items()}


def test_a_sweep_trains_every_combination_ranks_them_and_crowns_the_best(project):
    store = InMemoryStore()
    opened, launcher, summary = run_sweep(project, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}))
    assert summary["counts"] == {"total": 4, "finished": 4, "failed": 0, "reused": 0}
    assert [r["f1"] for r in summary["top"]] == [0.9, 0.7, 0.6]
    best_run = summary["top"][0]["run_id"]
    assert (store.champion("mem").version, store.champion("mem").run_id) == ("1", best_run)
    parent = store.runs[opened.run.parent_run_id]
    assert parent.status == "FINISHED" and parent.params["best_f1"] == 0.9
    assert [r.dispatch_position for r in store.load_plan(opened.run.parent_run_id)] == [1, 2, 3, 4]


def test_each_sweep_reports_into_its_own_folder_and_latest_moves(project, monkeypatch):
    """A later sweep of the same name, even one where every trial failed, never touches an earlier report."""
    monkeypatch.chdir(project)
    store = InMemoryStore()
    first = run_sweep(project, store, f1s(store, {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}), report_dir=None)[2]
    first_dir = Path("reports/mem") / first["sweep_id"]
    assert (first["report_dir"], first["latest"]) == (str(first_dir), str(Path("reports/mem/latest")))
    assert Path("reports/mem/latest").resolve() == first_dir.resolve()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first_dir.iterdir()}
    assert "f1_by_combination.png" in before

    broken = {i: [TRAINER_ERROR] for i in range(1, 5)}
    second = run_sweep(project, store, broken, retrain=True, report_dir=None)[2]
    assert second["counts"]["failed"] == 4 and second["sweep_id"] != first["sweep_id"]
    assert second["top"] == []  # no failed trial is ranked among the top
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first_dir.iterdir()} == before
    latest = Path("reports/mem/latest")
    assert latest.is_symlink() and latest.resolve() == (Path("reports/mem") / second["sweep_id"]).resolve()
    assert not list(latest.glob("*.png"))  # nothing finished: no empty "top 0 of 4" plot

    # An explicit folder: exactly there, and `latest` stays where it was.
    third = run_sweep(project, store, broken, retrain=True, report_dir=Path("custom"))[2]
    assert third["report_dir"] == "custom" and "latest" not in third and Path("custom/leaderboard.json").is_file()
    assert latest.resolve().name == second["sweep_id"]


def test_a_rerun_reuses_finished_trials_and_trains_only_the_rest(project):
    store = InMemoryStore()
    run_sweep(project, store, {2: [TRAINER_ERROR]})
    opened, launcher, summary = run_sweep(project, store)
    assert [j.index for j in launcher.jobs] == [2]  # only the failed one trains again
    assert summary["counts"] == {"total": 4, "finished": 1, "failed": 0, "reused": 3}
    assert all(j.resume for j in launcher.jobs)  # its earlier run did not finish: resume from it


def test_retrain_trains_everything_from_scratch(project):
    store = InMemoryStore()
    run_sweep(project, store)
    _, launcher, summary = run_sweep(project, store, retrain=True)
    assert len(launcher.jobs) == 4 and summary["counts"]["reused"] == 0
    assert not any(j.resume for j in launcher.jobs)


def test_a_dead_sweeps_running_trials_are_closed_as_zombies_and_trained_again(project):
    store = InMemoryStore()
    opened, _, _ = run_sweep(project, store, {1: [TRAINER_ERROR]})
    # a crashed sweep left trial 1 RUNNING: reopened, owner gone
    run_id = next(r.run_id for r in store.runs.values() if r.row and r.row.index == 1)
    store.reopen_trial_run(run_id, 2)
    store.runs[run_id].owner_alive = False
    opened, launcher, summary = run_sweep(project, store)
    assert opened.zombies == [run_id] and store.runs[run_id].state is TrialState.KILLED
    assert [j.index for j in launcher.jobs] == [1] and launcher.jobs[0].resume


def test_measured_durations_start_the_longest_trials_first(project):
    store = InMemoryStore()
    run_sweep(project, store, f1s(store, {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}))  # trial i took 10·i s
    opened, launcher, _ = run_sweep(project, store, capacity=1, retrain=True)
    assert [t.index for t in opened.to_train] == [4, 3, 2, 1]
    assert opened.order.startswith("longest first") and [j.index for j in launcher.jobs] == [4, 3, 2, 1]


def test_failed_trials_are_reported_last_with_their_reason_and_fail_the_parent_run(project):
    store = InMemoryStore()
    opened, _, summary = run_sweep(project, store, {1: [LOST_HOST] * 3, 2: [TRAINER_ERROR]})
    assert summary["counts"] == {"total": 4, "finished": 2, "failed": 2, "reused": 0}
    assert store.runs[opened.run.parent_run_id].status == "FAILED"
    import json
    rows = json.loads((project / "report" / "leaderboard.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert rows[2]["reason"] == LOST_HOST.reason and rows[3]["reason"] == TRAINER_ERROR.reason
    # The terminal's "top trials" are the two with an F1, not a failed trial in third place.
    assert [r["status"] for r in summary["top"]] == ["FINISHED", "FINISHED"]


def test_a_worse_follow_up_sweep_leaves_the_champion(project):
    store = InMemoryStore()
    _, _, first = run_sweep(project, store, f1s(store, {1: 0.9}))
    _, _, summary = run_sweep(project, store, f1s(store, {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1}), retrain=True)
    assert store.champion("mem").run_id == first["top"][0]["run_id"] and store.versions["mem"] == 1
    assert summary["champion_moved"] is False
    assert summary["champion_note"].startswith("champion unchanged (F1 0.9000 from sweep mem-")


def test_the_parent_run_shows_the_specs_settings_as_params(project):
    store = InMemoryStore()
    opened, _, _ = run_sweep(project, store)
    assert store.runs[opened.run.parent_run_id].params["settings.epochs"] == 1


def test_the_report_header_names_the_settings_the_sweep_ran_with(project):
    import json
    run_sweep(project, InMemoryStore())
    assert json.loads((project / "report" / "leaderboard.json").read_text())["settings"] == {"epochs": 1}
    assert "- settings: `epochs=1`" in (project / "report" / "leaderboard.md").read_text()


def test_a_crash_after_the_parent_run_exists_closes_it_and_every_running_trial(project):
    store = InMemoryStore()
    cfg = config(project)
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    opened = engine.open_sweep(cfg, inputs, store, capacity=2, queue_depth=2)
    running = store.start_trial_run(opened.run.experiment_id, opened.run.sweep_id, 1, {"lr": 0.1}, "key1")
    with pytest.raises(OSError, match="disk full"):
        with engine.closed_on_crash(store, opened.run.experiment_id, opened.run.sweep_id, opened.run.parent_run_id):
            raise OSError("disk full")
    assert store.runs[running].state is TrialState.FAILED
    assert store.runs[running].row.reason == "hpsweep failed: OSError: disk full"
    assert store.runs[opened.run.parent_run_id].status == "FAILED"


def test_max_failures_stops_launching_and_reports_the_rest_not_started(project):
    """--max-failures 2: a hparam typo the trainer rejects fails two trials, not every combination."""
    import json

    store = InMemoryStore()
    cfg = config(project, max_failures=2)
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    opened = engine.open_sweep(cfg, inputs, store, capacity=1, queue_depth=1)
    launcher = ScriptedLauncher(store, {i: [TRAINER_ERROR] for i in range(1, 5)})
    trials = SweepEngine(opened.run, launcher, RetryPolicy(first_delay_s=0), sleep=lambda s: False,
                         max_failures=cfg.max_failures)
    trials.run(opened.to_train, opened.parallel)
    assert len(launcher.jobs) == 2 and trials.stopped_after_failures
    engine.close_sweep(opened, store, cfg.report_dir, never_started_reason="NOT STARTED (stopped after 2 failures)")
    rows = json.loads((project / "report" / "leaderboard.json").read_text())["rows"]
    assert [r["reason"] for r in rows[2:]] == ["NOT STARTED (stopped after 2 failures)"] * 2
    assert [r["reason"] for r in rows[:2]] == [TRAINER_ERROR.reason] * 2


def test_the_summary_gives_each_failure_reason_once_with_its_count(project):
    store = InMemoryStore()
    _, _, summary = run_sweep(project, store, {1: [TRAINER_ERROR], 2: [TRAINER_ERROR], 3: [TRAINER_ERROR]})
    assert summary["failure_reasons"] == [{"reason": TRAINER_ERROR.reason, "trials": 3}]


def test_a_cut_reason_never_ends_mid_word():
    from hpsweep.engine.outcome import bounded

    reason = "could not load the model: set the 'skops_trusted_types' parameter to trust these types"
    cut = bounded(reason, 60)
    assert cut.endswith("…") and len(cut) <= 60 and reason.startswith(cut[:-1]) and reason[len(cut) - 1] == " "


def test_a_started_sweep_is_opened_in_the_same_parent_run(project):
    """`hpsweep run` starts the parent run (STARTING) before Prefect; the flow opens that run, never a second."""
    store = InMemoryStore()
    cfg = config(project)
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    started = engine.start_sweep(cfg, inputs, store)
    parent = store.runs[started.parent_run_id]
    assert parent.tags["hpsweep.status"] == "STARTING" and parent.params == {}
    opened = engine.open_sweep(cfg, inputs, store, capacity=2, queue_depth=2, started=started)
    assert (opened.run.parent_run_id, opened.run.sweep_id) == (started.parent_run_id, started.sweep_id)
    assert [r.run_id for r in store.runs.values() if r.role == "sweep"] == [started.parent_run_id]
    assert parent.tags["hpsweep.status"] == "RUNNING" and parent.params["trials"] == 4
    assert store.load_plan(started.parent_run_id) is not None


def test_a_sweep_that_dies_while_starting_is_closed_and_one_with_bad_input_is_deleted(project):
    store = InMemoryStore()
    cfg = config(project)
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    started = engine.start_sweep(cfg, inputs, store)
    with pytest.raises(ConnectionError):
        with engine.kept_alive(store, started):  # e.g. Prefect's temporary server never came up
            raise ConnectionError("Prefect is not answering")
    parent = store.runs[started.parent_run_id]
    assert parent.status == "FAILED"
    assert parent.tags["hpsweep.reason"] == "hpsweep failed: ConnectionError: Prefect is not answering"

    from hpsweep.inputs import Problem, SweepInputError

    started = engine.start_sweep(cfg, inputs, store)
    with pytest.raises(SweepInputError):
        with engine.kept_alive(store, started):  # found once Prefect is up: a quota limit too small
            raise SweepInputError([Problem("--quota-limit", "too small")])
    assert started.parent_run_id not in store.runs  # invalid input writes nothing (exit 2)
