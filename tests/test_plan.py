"""`hpsweep plan` and the dispatch order: estimates, schedule and cost as pure functions (checked
against schedules computed by hand), the command on real inputs, and after real sweeps (reuse,
learned durations, longest-first starts measured from the trainers' own timestamps)."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.model import TrialRow, TrialState
from hpsweep.plan import (FILE_ORDER, LONGEST_FIRST, SHUFFLED, DurationHistory, Estimate, PlannedTrial, Prices,
                          dispatch_order, estimate_durations, list_schedule, make_plan, slots_for)
from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, records, run_sweep


def trials(*hparams: dict) -> list[PlannedTrial]:
    return [PlannedTrial(i, hp, f"key{i}") for i, hp in enumerate(hparams, start=1)]


# ---------------------------------------------------------------- pure functions


def test_list_schedule_matches_a_schedule_computed_by_hand():
    # Two slots, longest first (7 5 4 3 3 2): A=7, B=5, B+4=9, A+3=10, B+3=12, A+2=12 -> 12.
    assert list_schedule([7, 5, 4, 3, 3, 2], 2) == 12
    # The same work in file order (3 7 2 5 3 4): A=3, B=7, A=5, A=10, B=10, A/B+4=14 -> 14.
    assert list_schedule([3, 7, 2, 5, 3, 4], 2) == 14
    assert list_schedule([5, 5, 5], 1) == 15 and list_schedule([], 3) == 0
    # Running trials occupy slots: 4 s and 1 s left; the queued 3 goes on the slot free at 1 s.
    assert list_schedule([3], 2, busy=[4, 1]) == 4
    with pytest.raises(ValueError, match="slots must be at least 1"):
        list_schedule([1], 0)


def test_slots_are_the_quota_over_gpus_capped_by_the_host():
    assert slots_for(5, 2) == 2
    assert slots_for(8, 1, host=(0, 1, 2, 3)) == 4
    assert slots_for(8, 2, host=(0, 1, 2)) == 1


def test_estimates_prefer_measured_then_spec_then_median():
    ts = trials({"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3})
    history = DurationHistory(same_spec=(({"lr": 0.1}, 40.0), ({"lr": 0.1}, 99.0), ({"lr": 0.9}, 10.0)))
    # lr=0.1 measured (its newest run: 40), the others from the spec's guess.
    assert estimate_durations(ts, 25.0, history) == [Estimate(40.0, "measured"), Estimate(25.0, "spec"),
                                                     Estimate(25.0, "spec")]
    # No guess in the spec: the median of the experiment's trials under this spec (10, 40, 99 -> 40).
    assert estimate_durations(ts, None, history)[1:] == [Estimate(40.0, "median")] * 2
    # Trials under another spec only give a median, never a per-hparams measurement.
    other = DurationHistory(other=(({"lr": 0.1}, 8.0), ({"lr": 0.5}, 12.0)))
    assert estimate_durations(ts, None, other) == [Estimate(10.0, "median")] * 3
    assert estimate_durations(ts, None, DurationHistory()) == [Estimate(None, "unknown")] * 3


def test_dispatch_is_longest_first_when_durations_are_known_else_file_order():
    ts = trials({"x": 1}, {"x": 2}, {"x": 3}, {"x": 4})
    known = [Estimate(s, "measured") for s in (2.0, 9.0, 2.0, 5.0)]
    ordered, est, order = dispatch_order(ts, known)
    assert [t.index for t in ordered] == [2, 4, 1, 3] and order == LONGEST_FIRST  # ties keep file order
    assert [e.seconds for e in est] == [9.0, 5.0, 2.0, 2.0]
    unknown = [Estimate(None, "unknown")] * 4
    assert [t.index for t in dispatch_order(ts, unknown)[0]] == [1, 2, 3, 4]
    assert dispatch_order(ts, unknown)[2] == FILE_ORDER
    assert dispatch_order(ts, [Estimate(7.0, "spec")] * 4)[2] == FILE_ORDER  # all equal


def test_with_early_stopping_trials_start_shuffled_the_same_way_on_every_rerun():
    """A file sorted weak → strong would let every later trial pass the rules: the sweep shuffles it."""
    ts = trials(*({"lr": lr} for lr in range(12)))
    known = [Estimate(float(i), "measured") for i in range(12)]
    ordered, est, order = dispatch_order(ts, known, early_stop=True)
    assert order == SHUFFLED and sorted(t.index for t in ordered) == [t.index for t in ts]
    assert [t.index for t in ordered] != [t.index for t in ts]  # not file order
    assert [t.index for t in ordered] != [t.index for t in dispatch_order(ts, known)[0]]  # nor longest first
    assert [e.seconds for e in est] == [known[t.index - 1].seconds for t in ordered]  # estimates travel along
    assert dispatch_order(list(reversed(ts)), list(reversed(known)), early_stop=True)[0] == ordered  # keys decide
    from hpsweep.plan import describe_order
    assert describe_order(SHUFFLED, est) == SHUFFLED


def test_plan_numbers_for_known_durations():
    ts = trials(*({"i": i} for i in range(6)))
    reused = {"key1": TrialRow(1, {}, TrialState.FINISHED, run_id="r1", duration_s=1800.0)}  # a FINISHED run
    seconds = [7200, 3600, 3600, 1800, 1800]  # trials 2..6, in file order
    plan = make_plan(ts, reused, [Estimate(s, "measured") for s in seconds], slots=2, gpus_per_trial=2,
                     prices=Prices(on_demand=2.0, spot=0.5))
    assert (plan["trials"], plan["reused"], plan["to_train"]) == (6, 1, 5)
    assert plan["gpu_hours"] == pytest.approx(18000 * 2 / 3600)  # 10 GPU-h
    assert plan["reuse_saves_gpu_hours"] == pytest.approx(1.0)
    # Longest first on 2 slots: A=7200, B=3600, B=7200, A/B: 9000, 9000 -> 9000 s.
    assert plan["makespan_s"] == 9000 and plan["lower_bound_s"] == 9000
    assert plan["cost"]["on_demand"] == pytest.approx(20.0) and plan["cost"]["spot"] == pytest.approx(5.0)
    rows = {r["index"]: r for r in plan["rows"]}
    assert rows[1]["reused_run_id"] == "r1" and rows[1]["dispatch_position"] is None
    assert rows[2]["dispatch_position"] == 1 and rows[2]["duration_source"] == "measured"


# ---------------------------------------------------------------- the command


def plan_cmd(project: Project, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return project.hpsweep("plan", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
                           "--train", "data/train.csv", "--val", "data/val.csv", *extra, timeout=300,
                           env={"CUDA_VISIBLE_DEVICES": "", **(env or {})})


def write_inputs(project: Project, combos: list[dict], spec: str) -> None:
    project.write("params/combinations.yaml",
                  "combinations:\n" + "".join(f"  - {json.dumps(c)}\n" for c in combos))
    project.write("params/spec.yaml", spec)


def test_plan_from_the_spec_duration_starts_and_writes_nothing(project: Project):
    write_inputs(project, [{"f1": 0.1 * i} for i in range(1, 6)],
                 SLEEPY_SPEC.format(name="planned", sleep_s=0.1, gpus=2) + "expected_duration_s: 5400\n")
    result = plan_cmd(project, "--quota", "5", "--json", "--price-per-gpu-hour", "2", "--spot-price-per-gpu-hour",
                      "0.5")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    # 5 trials of 1.5 h on 2 GPUs each, quota 5 -> 2 at once: 3 waves = 4.5 h; 15 GPU-h.
    assert (plan["trials"], plan["reused"], plan["to_train"], plan["slots"]) == (5, 0, 5, 2)
    assert plan["duration_sources"]["spec"] == 5 and plan["dispatch_order"] == FILE_ORDER
    assert plan["makespan_s"] == 3 * 5400 and plan["gpu_hours"] == pytest.approx(15)
    assert plan["cost"] == {"price_per_gpu_hour": 2.0, "spot_price_per_gpu_hour": 0.5, "on_demand": 30.0,
                            "spot": 7.5}
    assert project.state_written() == []  # no MLflow store, no report, no trial folder

    # The text view; on a host with 2 GPUs only one 2-GPU trial runs at a time: 5 waves.
    text = plan_cmd(project, "--quota", "5", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert text.returncode == 0, text.stderr
    assert "5 to train, 0 reused" in text.stdout
    assert "makespan    7.5 h" in text.stdout and "$15.09 on demand at $1.006/GPU-h" in text.stdout
    assert "5 from the spec's expected_duration_s" in text.stdout


def test_plan_rejects_bad_input_like_run(project: Project):
    write_inputs(project, [{"f1": 0.5}, {"f1": 0.5}], SLEEPY_SPEC.format(name="bad", sleep_s=0.1, gpus=5))
    result = plan_cmd(project, "--quota", "8", "--price-per-gpu-hour", "-1", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "error: params/combinations.yaml: row 2: duplicate of row 1",
        "error: params/spec.yaml: key 'resources.gpus': a trial needs 5 GPUs but this host has 4 (0,1,2,3): "
        "no trial could ever start"]
    assert project.state_written() == []
    write_inputs(project, [{"f1": 0.5}], SLEEPY_SPEC.format(name="bad", sleep_s=0.1, gpus=1))
    result = plan_cmd(project, "--price-per-gpu-hour", "-1")
    assert result.returncode == 2 and result.stderr.strip() == "error: --price-per-gpu-hour: must be at least 0, got -1.0"


# ---------------------------------------------------------------- after real sweeps


def trial_runs(project: Project, name: str) -> list:
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=1000)


def starts(path) -> list[float]:
    return [e["hparams"]["sleep_s"] for e in records(path) if e["event"] == "start"]


@pytest.mark.slow
def test_plan_after_a_sweep_and_longest_first_dispatch(served_project: Project):
    project = served_project
    spec = SLEEPY_SPEC.format(name="order", sleep_s=0.1, gpus=1)
    combos = [{"f1": 0.5, "sleep_s": 0.2}, {"f1": 0.6, "sleep_s": 1.6}, {"f1": 0.7, "sleep_s": 0.6},
              {"f1": 0.8, "sleep_s": 1.1}]
    first = project.root / "first.jsonl"
    result = run_sweep(project, combos, spec, 1, env={"HPSWEEP_TEST_RECORD": str(first)})
    assert result.returncode == 0, result.stderr
    assert starts(first) == [0.2, 1.6, 0.6, 1.1]  # nothing known yet: file order

    # plan: everything is reused; with a new combination, that one is estimated from the median.
    runs_before = len(trial_runs(project, "order"))
    plan = json.loads(plan_cmd(project, "--quota", "1", "--json").stdout)
    assert (plan["reused"], plan["to_train"], plan["gpu_hours"]) == (4, 0, 0)
    write_inputs(project, combos + [{"f1": 0.9, "sleep_s": 0.3}], spec)
    plan = json.loads(plan_cmd(project, "--quota", "1", "--json").stdout)
    assert (plan["reused"], plan["to_train"]) == (4, 1)
    new = plan["rows"][-1]
    assert new["duration_source"] == "median" and new["reused_run_id"] is None
    measured = {json.dumps(r.data.params, sort_keys=True): float(r.data.tags["hpsweep.duration_s"])
                for r in trial_runs(project, "order") if r.data.tags.get("hpsweep.role") == "trial"}
    assert new["expected_duration_s"] == pytest.approx(statistics.median(measured.values()))
    # --retrain: every trial has a measured duration: its own run's, and a longest-first makespan.
    write_inputs(project, combos, spec)
    plan = json.loads(plan_cmd(project, "--quota", "2", "--retrain", "--json").stdout)
    assert plan["duration_sources"]["measured"] == 4 and plan["dispatch_order"] == LONGEST_FIRST
    durations = [r["expected_duration_s"] for r in plan["rows"]]
    assert sorted(durations) == sorted(measured.values())
    assert plan["makespan_s"] == pytest.approx(list_schedule(sorted(durations, reverse=True), 2))
    assert plan["gpu_hours"] == pytest.approx(sum(durations) / 3600)
    assert len(trial_runs(project, "order")) == runs_before  # planning created no run

    # The sweep itself now starts the longest first (quota 1: one at a time), and says so.
    second = project.root / "second.jsonl"
    result = project.hpsweep("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
                             "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1", "--retrain",
                             env={"HPSWEEP_TEST_RECORD": str(second)})
    assert result.returncode == 0, result.stderr
    # Longest measured first (under load a trial's overhead can outweigh half a second of sleep, so
    # the order is the measured one, which on a quiet machine is 1.6, 1.1, 0.6, 0.2).
    by_sleep = {float(json.loads(k)["sleep_s"]): d for k, d in measured.items()}
    assert starts(second) == sorted(by_sleep, key=lambda s: -by_sleep[s])
    board = leaderboard(project, "order")
    assert [r["f1"] for r in board["rows"]] == [0.8, 0.7, 0.6, 0.5]  # the report stays in F1 order
    parent = [r for r in trial_runs(project, "order") if r.data.tags.get("hpsweep.sweep_id") == board["sweep_id"]
              and r.data.tags.get("hpsweep.role") == "sweep"][0]
    assert parent.data.tags["hpsweep.dispatch_order"] == "longest first (4 measured)"


def test_the_dispatch_order_says_in_words_when_nothing_is_known_yet():
    from hpsweep.plan import describe_order

    assert describe_order(FILE_ORDER, [Estimate(None, "unknown")] * 16) == "file order (no durations known yet)"
    assert describe_order(LONGEST_FIRST, [Estimate(3.0, "measured")] * 2 + [Estimate(2.0, "median")]) == \
        "longest first (2 measured, 1 median)"


def test_plan_with_asha_gives_the_expected_gpu_hours_range(project: Project):
    write_inputs(project, [{"f1": 0.01 * i} for i in range(1, 82)],
                 "name: asha-plan\ntrainer: {entrypoint: 'tests.trainers:sleepy'}\nsettings: {epochs: 18}\n"
                 "resources: {gpus: 1}\nexpected_duration_s: 3600\n")
    result = plan_cmd(project, "--quota", "4", "--json", "--early-stop", "asha", "--early-stop-min-steps", "2")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    es = plan["early_stop"]
    assert (es["rule"], es["max_steps"], es["reduction_factor"]) == ("asha", 18, 3)  # max_steps: settings.epochs
    low, high = es["gpu_hours_range"]
    # successive halving at best: 81 trials × 2 epochs, 27 × 4 more, 9 × 12 more, of 81 × 18 epochs
    assert low == pytest.approx(81 * (81 * 2 + 27 * 4 + 9 * 12) / (81 * 18))
    assert low < high < plan["gpu_hours"] == pytest.approx(81)
    text = plan_cmd(project, "--quota", "4", "--early-stop", "asha", "--early-stop-min-steps", "2")
    assert "early stop  asha: expected GPU-hours 21.00 to" in text.stdout, text.stdout
    assert json.loads(plan_cmd(project, "--quota", "4", "--json").stdout)["early_stop"] is None
