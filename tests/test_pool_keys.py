"""The pool launcher's idempotency key: one Prefect flow run per trial key and attempt."""

from __future__ import annotations

from dataclasses import replace

from hpsweep.engine.pool import idempotency_key
from hpsweep.model import TrialJob

JOB = TrialJob(sweep_id="s1", experiment_id="1", parent_run_id="p", tracking_uri="http://mlflow", index=0,
               hparams={"lr": 0.1}, trial_key="k" * 24, attempt=1, settings={}, train="train.csv", val="val.csv")


def test_same_trial_and_attempt_same_key():
    # A rerun of the sweep, or a retried API call, builds the job again: it must get the same flow run.
    again = replace(JOB, sweep_id="s2", parent_run_id="p2", index=7, run_id="r", cwd="/elsewhere")
    assert idempotency_key(again) == idempotency_key(JOB) == f"hpsweep:{'k' * 24}:attempt-1"


def test_each_attempt_and_each_trial_has_its_own_key():
    keys = {idempotency_key(JOB), idempotency_key(replace(JOB, attempt=2)),
            idempotency_key(replace(JOB, trial_key="j" * 24))}
    assert len(keys) == 3


def test_salt_asks_for_new_flow_runs():
    salted = idempotency_key(JOB, salt="sweep-retrain")
    assert salted != idempotency_key(JOB) and salted.endswith(":sweep-retrain")
    assert idempotency_key(JOB, salt="sweep-retrain") == salted
    assert idempotency_key(JOB, salt="other") != salted
