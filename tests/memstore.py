"""An in-memory stand-in for ``hpsweep.store.SweepStore`` (as Optuna tests its study logic on
``InMemoryStorage``): the same methods, the same state machine, no MLflow, so the engine's rules
(retries, transitions, reuse, zombies, dispatch order, ranking) are tested in milliseconds."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpsweep.model import Hparams, Outcome, TrialRow, TrialState, check_transition, run_name
from hpsweep.store.registry import RegisteredVersion


@dataclass
class MemRun:
    run_id: str
    experiment_id: str
    role: str  # "sweep" or "trial"
    sweep_id: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    state: TrialState = TrialState.RUNNING
    row: TrialRow | None = None
    heartbeat: float = field(default_factory=time.time)
    owner_alive: bool = True
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    has_model: bool = True
    status: str = "RUNNING"  # the parent run's MLflow status
    predictions: tuple[Any, Any] | None = None  # (y_true, y_pred): the trial's predictions/ artifact


class InMemoryStore:
    tracking_uri = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, MemRun] = {}
        self.champions: dict[str, tuple[str, str]] = {}  # model → (version, run id) @champion points at
        self.versions: dict[str, int] = {}  # model → versions registered
        self.registered: dict[str, dict[str, tuple[str, dict[str, str]]]] = {}  # model → run id → (version, moved_by)

    # ------------------------------------------------------------ what SweepStore offers

    def ensure_experiment(self, name: str) -> str:
        with self._lock:
            return self.experiments.setdefault(name, str(len(self.experiments) + 1))

    def experiment_id(self, name: str) -> str | None:
        return self.experiments.get(name)

    def reap_zombies(self, exp_id: str, stale_after_s: float) -> list[str]:
        reaped = []
        for run in self._trials(exp_id):
            if run.state is TrialState.RUNNING and (not run.owner_alive or time.time() - run.heartbeat > stale_after_s):
                self._move(run, TrialState.KILLED, reason="zombie: its process died without reporting")
                reaped.append(run.run_id)
        return reaped

    def finished_trials_by_key(self, exp_id: str, keys: set[str], versions: dict[str, str]) -> dict[str, TrialRow]:
        found: dict[str, TrialRow] = {}
        for run in reversed(self._trials(exp_id)):  # newest first
            if run.state is TrialState.FINISHED and run.row.key in keys and self._matches(run, versions):
                found.setdefault(run.row.key, run.row)
        return found

    def unfinished_trial_keys(self, exp_id: str, keys: set[str], versions: dict[str, str]) -> set[str]:
        return {r.row.key for r in self._trials(exp_id)
                if r.state is not TrialState.FINISHED and r.row.key in keys and self._matches(r, versions)}

    def finished_trial_durations(self, exp_id: str, spec_hash: str | None, limit: int) -> list[tuple[Hparams, float]]:
        runs = [r for r in reversed(self._trials(exp_id)) if r.state is TrialState.FINISHED
                and r.row.duration_s is not None and (spec_hash is None or r.tags.get("hpsweep.spec_hash") == spec_hash)]
        return [(r.row.hparams, r.row.duration_s) for r in runs[:limit]]

    def latest_trial_tags(self, exp_id: str, names: list[str]) -> dict[str, str] | None:
        run = next((r for r in reversed(self._trials(exp_id)) if r.state is TrialState.FINISHED), None)
        return None if run is None else {n: run.tags[n] for n in names if n in run.tags}

    def start_parent_run(self, exp_id: str, sweep_id: str, tags: dict[str, str]) -> str:
        run = MemRun(f"run{next(self._ids)}", exp_id, "sweep", sweep_id, dict(tags), {})
        self.runs[run.run_id] = run
        return run.run_id

    def describe_parent_run(self, parent_run_id: str, tags: dict[str, str], params: dict) -> None:
        run = self.runs[parent_run_id]
        assert not set(params) & set(run.params), "MLflow refuses to log a param twice"
        run.tags.update(tags)
        run.params.update(params)

    def delete_parent_run(self, parent_run_id: str) -> None:
        del self.runs[parent_run_id]

    def log_plan(self, parent_run_id: str, rows: list[TrialRow]) -> None:
        self.runs[parent_run_id].artifacts["plan.json"] = rows  # type: ignore[assignment]

    def load_plan(self, parent_run_id: str) -> list[TrialRow] | None:
        return self.runs[parent_run_id].artifacts.get("plan.json")  # type: ignore[return-value]

    def heartbeat(self, run_id: str) -> None:
        self.runs[run_id].heartbeat = time.time()

    def finish_trial_run(self, run_id: str, outcome: Outcome, log_path: Path | None = None) -> None:
        run = self.runs[run_id]
        self._move(run, outcome.state, f1=outcome.f1, reason=outcome.reason, duration_s=outcome.duration_s,
                   stopped_at_step=outcome.stopped_at_step)

    def request_stop(self, run_id: str, step: int, reason: str) -> None:
        self.runs[run_id].tags.update({"hpsweep.stop_request": reason, "hpsweep.stopped_at_step": str(step)})

    def sweep_trials(self, exp_id: str, sweep_id: str) -> list[TrialRow]:
        return [r.row for r in self._trials(exp_id) if r.sweep_id == sweep_id]

    def trials_by_run_id(self, exp_id: str, run_ids: list[str]) -> dict[str, TrialRow]:
        return {i: self.runs[i].row for i in run_ids if i in self.runs}

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        return sorted(self.runs[run_id].metrics.get(metric, [])) if run_id in self.runs else []

    def has_model(self, run_id: str) -> bool:
        return self.runs[run_id].has_model

    def register_champion(self, model_name: str, run_id: str, sweep_id: str, note: str) -> str:
        registered = self.registered.setdefault(model_name, {})
        if run_id not in registered:  # a run is registered once; later moves reuse its version
            self.versions[model_name] = self.versions.get(model_name, 0) + 1
            registered[run_id] = (str(self.versions[model_name]), {})
        version, moved_by = registered[run_id]
        moved_by[sweep_id] = note
        self.champions[model_name] = (version, run_id)
        return version

    def champion(self, model_name: str) -> RegisteredVersion | None:
        current = self.champions.get(model_name)
        return self.version_of(model_name, current[1]) if current is not None else None

    def version_of(self, model_name: str, run_id: str) -> RegisteredVersion | None:
        if run_id not in self.registered.get(model_name, {}):
            return None
        version, moved_by = self.registered[model_name][run_id]
        run = self.runs.get(run_id)
        if run is None:
            return RegisteredVersion(version, run_id, moved_by=dict(moved_by))
        return RegisteredVersion(version, run_id, run.row.f1 if run.row else None, run.tags.get("hpsweep.data_version"),
                                 run.sweep_id, dict(moved_by))

    def load_predictions(self, run_id: str) -> tuple[Any, Any] | None:
        return self.runs[run_id].predictions if run_id in self.runs else None

    def log_significance(self, parent_run_id: str, intervals: dict[str, tuple[float, float]],
                         mismatches: dict[str, str], tied_with_best_count: int) -> None:
        for run_id, (low, high) in intervals.items():
            self.log_metric(run_id, "f1_ci_low", 0, low)
            self.log_metric(run_id, "f1_ci_high", 0, high)
            if run_id in mismatches:
                self.runs[run_id].tags["hpsweep.warning.f1_mismatch"] = mismatches[run_id]
        self.log_metric(parent_run_id, "tied_with_best_count", 0, tied_with_best_count)

    def log_report_text(self, parent_run_id: str, name: str, text: str) -> None:
        self.runs[parent_run_id].artifacts[f"report/{name}"] = text

    def finish_parent_run(self, parent_run_id: str, counts: dict[str, int], best_f1: float | None,
                          files: list[str], ok: bool, stopped_by: str | None = None,
                          extra_metrics: dict[str, float] | None = None) -> None:
        run = self.runs[parent_run_id]
        for path in files:
            run.artifacts[f"report/{Path(path).name}"] = Path(path).read_text(errors="replace") \
                if Path(path).suffix != ".png" else "<png>"
        run.status = "KILLED" if stopped_by else "FINISHED" if ok else "FAILED"
        run.params.update({f"trials_{k}": v for k, v in counts.items()}, best_f1=best_f1, **(extra_metrics or {}))

    def close_sweep_runs(self, exp_id: str, sweep_id: str, parent_run_id: str, reason: str) -> list[str]:
        closed = []
        for run in self._trials(exp_id):
            if run.sweep_id == sweep_id and run.state is TrialState.RUNNING:
                self._move(run, TrialState.FAILED, reason=reason)
                closed.append(run.run_id)
        parent = self.runs[parent_run_id]
        if parent.status == "RUNNING":
            parent.status = "FAILED"
            parent.tags.update({"hpsweep.reason": reason, "hpsweep.status": "FAILED"})
            closed.append(parent_run_id)
        return closed

    # ------------------------------------------------------------ what a trial attempt writes

    def start_trial_run(self, exp_id: str, sweep_id: str, index: int, hparams: Hparams, key: str,
                        versions: dict[str, str] | None = None) -> str:
        run = MemRun(f"run{next(self._ids)}", exp_id, "trial", sweep_id, dict(versions or {}))
        run.row = TrialRow(index=index, hparams=hparams, state=TrialState.RUNNING, run_id=run.run_id,
                           run_name=run_name(hparams), key=key, started_at=time.time())
        self.runs[run.run_id] = run
        return run.run_id

    def reopen_trial_run(self, run_id: str, attempt: int) -> None:
        run = self.runs[run_id]
        self._move(run, TrialState.RUNNING, attempt=attempt, reason=None)

    def log_metric(self, run_id: str, key: str, step: int, value: float) -> None:
        self.runs[run_id].metrics.setdefault(key, []).append((step, value))

    # ------------------------------------------------------------ helpers

    def _trials(self, exp_id: str) -> list[MemRun]:
        return [r for r in self.runs.values() if r.role == "trial" and r.experiment_id == exp_id]

    @staticmethod
    def _matches(run: MemRun, versions: dict[str, str]) -> bool:
        return all(run.tags.get(k) == v for k, v in versions.items())

    def _move(self, run: MemRun, new: TrialState, **changes: Any) -> None:
        with self._lock:
            check_transition(run.state, new, f"trial run {run.run_id}")
            run.state = new
            run.row = replace(run.row, state=new, **changes)
