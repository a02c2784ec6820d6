"""What `hpsweep run` prints as a sweep ends: the live line and the summary (no server needed)."""

from __future__ import annotations

from hpsweep import cli
from hpsweep.model import AttemptResult, Outcome, PlannedTrial


def summary(**overrides):
    base = {"sweep_id": "digits-20261203-1100", "top": [], "counts": {"total": 2, "finished": 0, "reused": 0,
            "failed": 2}, "report_dir": "reports/digits/x", "tracking_uri": "sqlite:///mlflow.db",
            "experiment_id": "1", "parent_run_id": "abc", "failure_reasons": [{"reason": "boom", "trials": 2}]}
    return {**base, **overrides}


def test_a_sweep_where_every_trial_failed_prints_no_ranked_table(capsys):
    cli._print_summary(summary())
    out = capsys.readouterr().out
    assert "has an F1: nothing to rank" in out and "Top trials" not in out and "2× boom" in out


def test_a_sweep_with_f1s_prints_its_top_trials(capsys):
    top = [{"rank": 1, "hparams": {"lr": 0.1}, "f1": 0.91, "status": "FINISHED"}]
    cli._print_summary(summary(top=top))
    out = capsys.readouterr().out
    assert "Top trials" in out and "0.9100" in out and "nothing to rank" not in out


def test_the_live_line_counts_early_stopped_and_interrupted_trials_apart_from_failures():
    progress = cli.RichProgress(live=False)
    progress.on_sweep_start(total=4, parallel=1)
    trial = PlannedTrial(1, {"lr": 0.1}, "k")
    for outcome in (Outcome(True, 0.9), Outcome(False, 0.2, reason="median rule", stopped=True),
                    Outcome(False, None, reason="boom"),
                    Outcome(False, None, reason="interrupted: SIGINT", killed=True, interrupted=True)):
        progress.on_trial_start(trial)
        progress.on_trial_end(trial, 1, AttemptResult("run", outcome))
    assert progress.summary().startswith("4/4 ended · 1 finished · 1 failed · 1 stopped early · 1 interrupted · "
                                         "0 running")


def test_durations_read_as_minutes_and_seconds():
    assert [cli._duration(s) for s in (10, 60, 76, 1800, 0.4)] == ["10 s", "1 min", "1 min 16 s", "30 min", "0 s"]
