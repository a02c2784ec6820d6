"""The only package that talks to MLflow (tracking, artifacts, registry).

Tag names are constants (``hpsweep.store.tags``), filters are quoted (``filters``), searches page
(``runs.search``), retries go through one tenacity policy (``retry``), and every state a trial run
moves to is checked against ``hpsweep.model``'s transitions. Private MLflow APIs live in
``private``, one function each.

``SweepStore`` is the face the sweep engine sees (bound to one client); the engine's unit tests
swap in ``tests/memstore.py``'s in-memory implementation of the same methods.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from hpsweep.model import Hparams, Outcome, TrialRow
from hpsweep import predictions
from hpsweep.predictions import Predictions
from hpsweep.store import artifacts, registry, runs
from hpsweep.store.filters import quote
from hpsweep.store.registry import (RegisteredVersion, champion, champion_uri, has_model, register_champion,
                                    version_of)
from hpsweep.store.retry import TRACKING_PATIENCE_S, cap_client_backoff, refused_by_store, retrying
from hpsweep.store.runs import (create_trial_run, ensure_experiment, find_trial_run, finish_trial_run, heartbeat,
                                latest_parent_run, log_trial_params, mark_failed, open_trial_run, outcome_of,
                                reap_zombies, reopen_trial_run, set_tags, start_parent_run, start_trial_run, state_of,
                                stop_request, sweep_trials, trial_row, trials_by_run_id)
from hpsweep.store.tags import *  # noqa: F401,F403  (the tag names)
from hpsweep.store.uri import redact_uri, resolve_tracking_uri, ui_url

T = TypeVar("T")


def _patient(method: Callable[..., T]) -> Callable[..., T]:
    """The store's call outlives a tracking outage of up to ``patience_s`` (the one retry policy:
    MLflow's own HTTP retries are capped short, so that work resumes soon after the store is back);
    a refusal (4xx) is raised at once."""
    @functools.wraps(method)
    def call(self: "SweepStore", *args: Any, **kwargs: Any) -> T:
        return retrying(lambda: method(self, *args, **kwargs), method.__name__.replace("_", " "),
                        deadline_s=self.patience_s)
    return call


class SweepStore:
    """What the sweep engine reads and writes, over one MLflow client. Thread-safe (MlflowClient is).
    Every call but the heartbeat waits out a tracking outage of up to ``patience_s``: a sweep holds
    hours of GPU work (TRACKING_PATIENCE_S), a command like `status` only a minute."""

    def __init__(self, client: MlflowClient, patience_s: float = TRACKING_PATIENCE_S):
        self.client, self.patience_s = client, patience_s

    @classmethod
    def at(cls, tracking_uri: str, patience_s: float = TRACKING_PATIENCE_S) -> "SweepStore":
        return cls(MlflowClient(tracking_uri), patience_s)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    # before the trials
    @_patient
    def ensure_experiment(self, name: str) -> str:
        return runs.ensure_experiment(self.client, name)

    @_patient
    def experiment_id(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None

    @_patient
    def experiment_names(self) -> dict[str, str]:
        return runs.experiment_names(self.client)

    @_patient
    def latest_parent_run(self, experiment_ids: list[str], sweep_id: str | None = None) -> Run | None:
        return runs.latest_parent_run(self.client, experiment_ids, sweep_id)

    @_patient
    def parent_runs(self, experiment_ids: list[str], limit: int = 100) -> list[Run]:
        return runs.parent_runs(self.client, experiment_ids, limit)

    @_patient
    def reap_zombies(self, exp_id: str, stale_after_s: float) -> list[str]:
        return runs.reap_zombies(self.client, exp_id, stale_after_s)

    @_patient
    def finished_trials_by_key(self, exp_id: str, keys: set[str], versions: dict[str, str]) -> dict[str, TrialRow]:
        return runs.finished_trials_by_key(self.client, exp_id, keys, versions)

    @_patient
    def unfinished_trial_keys(self, exp_id: str, keys: set[str], versions: dict[str, str]) -> set[str]:
        return runs.unfinished_trial_keys(self.client, exp_id, keys, versions)

    @_patient
    def finished_trial_durations(self, exp_id: str, spec_hash: str | None, limit: int) -> list[tuple[Hparams, float]]:
        return runs.finished_trial_durations(self.client, exp_id, spec_hash, limit)

    @_patient
    def latest_trial_tags(self, exp_id: str, names: list[str]) -> dict[str, str] | None:
        return runs.latest_trial_tags(self.client, exp_id, names)

    @_patient
    def start_parent_run(self, exp_id: str, sweep_id: str, tags: dict[str, str]) -> str:
        return runs.start_parent_run(self.client, exp_id, sweep_id, tags)

    @_patient
    def describe_parent_run(self, parent_run_id: str, tags: dict[str, str], params: dict) -> None:
        runs.describe_parent_run(self.client, parent_run_id, tags, params)

    @_patient
    def delete_parent_run(self, parent_run_id: str) -> None:
        """Gone from every search (MLflow's deleted stage): for a sweep that never got past its input checks."""
        self.client.delete_run(parent_run_id)

    @_patient
    def log_plan(self, parent_run_id: str, rows: list[TrialRow]) -> None:
        runs.log_plan(self.client, parent_run_id, rows)

    # while they run
    def heartbeat(self, run_id: str) -> None:
        runs.heartbeat(self.client, run_id)

    @_patient
    def request_stop(self, run_id: str, step: int, reason: str) -> None:
        runs.request_stop(self.client, run_id, step, reason)

    @_patient
    def finish_trial_run(self, run_id: str, outcome: Outcome, log_path: Path | None = None) -> None:
        runs.finish_trial_run(self.client, run_id, outcome, log_path)

    # after them
    @_patient
    def sweep_trials(self, exp_id: str, sweep_id: str) -> list[TrialRow]:
        return runs.sweep_trials(self.client, exp_id, sweep_id)

    @_patient
    def trials_by_run_id(self, exp_id: str, run_ids: list[str]) -> dict[str, TrialRow]:
        return runs.trials_by_run_id(self.client, exp_id, run_ids)

    @_patient
    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        return runs.metric_history(self.client, run_id, metric)

    @_patient
    def load_predictions(self, run_id: str) -> Predictions | None:
        """The trial's validation predictions (``hpsweep.predictions``); None when it logged none,
        or none that can be read (a damaged file is not worth the report)."""
        with tempfile.TemporaryDirectory(prefix="hpsweep-predictions-") as tmp:
            path = artifacts.download_predictions(self.client, run_id, Path(tmp))
            if path is None:
                return None
            try:
                return predictions.load(path)
            except predictions.PredictionsError:
                return None

    @_patient
    def log_significance(self, parent_run_id: str, intervals: dict[str, tuple[float, float]],
                         mismatches: dict[str, str], tied_with_best_count: int) -> None:
        """The report's statistics into MLflow: ``f1_ci_low``/``f1_ci_high`` on each trial run
        (run id → interval), the F1 warning tag on each run in ``mismatches`` (run id → why), and
        ``tied_with_best_count`` on the parent run."""
        runs.log_significance(self.client, parent_run_id, intervals, mismatches, tied_with_best_count)

    @_patient
    def load_plan(self, parent_run_id: str) -> list[TrialRow] | None:
        return runs.load_plan(self.client, parent_run_id)

    @_patient
    def has_model(self, run_id: str) -> bool:
        return registry.has_model(self.client, run_id)

    @_patient
    def register_champion(self, model_name: str, run_id: str, sweep_id: str, note: str) -> str:
        return registry.register_champion(self.client, model_name, run_id, sweep_id, note)

    @_patient
    def champion(self, model_name: str) -> RegisteredVersion | None:
        return registry.champion(self.client, model_name)

    @_patient
    def version_of(self, model_name: str, run_id: str) -> RegisteredVersion | None:
        return registry.version_of(self.client, model_name, run_id)

    @_patient
    def log_report_text(self, parent_run_id: str, name: str, text: str) -> None:
        """One report file from memory into the parent run's ``report/`` folder, where
        ``finish_parent_run`` puts the files written locally (the same name is replaced)."""
        self.client.log_text(parent_run_id, text, f"report/{name}")

    @_patient
    def finish_parent_run(self, parent_run_id: str, counts: dict[str, int], best_f1: float | None,
                          files: list[str], ok: bool, stopped_by: str | None = None,
                          extra_metrics: dict[str, float] | None = None) -> None:
        runs.finish_parent_run(self.client, parent_run_id, counts, best_f1, files, ok, stopped_by, extra_metrics)

    @_patient
    def close_sweep_runs(self, exp_id: str, sweep_id: str, parent_run_id: str, reason: str) -> list[str]:
        return runs.close_sweep_runs(self.client, exp_id, sweep_id, parent_run_id, reason)
