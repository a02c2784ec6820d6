"""The sweep side of early stopping: watch the trials' metric histories, apply the rule, ask to stop.

Every POLL_S the stopper reads the sweep's trial runs (one search), the histories of the running
ones (one request each: at most the quota's worth) and, once, those of the ended ones and of the
reused runs the rule compares with. A decision is a tag on the trial run (``store.request_stop``);
the trial's own host polls it, writes the stop file and ends the trainer after the grace
(``hpsweep.engine.process``), so it works the same for local trials and a work pool's.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol, Sequence

from hpsweep.engine.early_stop import EarlyStopRule, History, StopTracker
from hpsweep.model import TrialRow, TrialState
from hpsweep.periodic import Periodic

log = logging.getLogger("hpsweep")

POLL_S = float(os.environ.get("HPSWEEP_EARLY_STOP_POLL_S", "5"))


class StopStore(Protocol):
    """What the stopper reads and writes: ``hpsweep.store.SweepStore`` (or tests' in-memory store)."""

    def sweep_trials(self, exp_id: str, sweep_id: str) -> list[TrialRow]: ...

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]: ...

    def request_stop(self, run_id: str, step: int, reason: str) -> None: ...


class EarlyStopper:
    """Applies ``rule`` to one sweep's running trials; ``poll`` once, or ``periodic()`` in the background."""

    def __init__(self, store: StopStore, rule: EarlyStopRule, experiment_id: str, sweep_id: str,
                 compare_run_ids: Sequence[str] = ()):
        """``compare_run_ids``: earlier runs the rule compares with too (the trials this sweep reuses)."""
        self.store, self.rule = store, rule
        self.experiment_id, self.sweep_id = experiment_id, sweep_id
        self._compare = list(compare_run_ids)
        self._ended: dict[str, History] = {}  # run id → the history of a run that reports no more
        self._tracker = StopTracker(rule)

    def poll(self) -> dict[str, tuple[int, str]]:
        """Judge every newly reported step of the running trials; returns the stops asked this time."""
        rows = self.store.sweep_trials(self.experiment_id, self.sweep_id)
        running = [r.run_id for r in rows if r.state is TrialState.RUNNING]
        histories: dict[str, History] = {}
        for run_id in [*self._compare, *(r.run_id for r in rows)]:
            if run_id in self._ended and run_id not in running:
                histories[run_id] = self._ended[run_id]
                continue
            history = self.store.metric_history(run_id, self.rule.metric)
            histories[run_id] = history
            if run_id not in running:
                self._ended[run_id] = history
        decisions = self._tracker.decide(running, histories)
        for run_id, (step, reason) in decisions.items():
            self.store.request_stop(run_id, step, reason)
            log.info("early stop: run %s %s", run_id, reason)
        return decisions

    def periodic(self, interval_s: float = POLL_S) -> Periodic:
        return Periodic(interval_s, self.poll, "hpsweep-early-stop")
