"""Everything that watches a sweep is a callback: the terminal's progress, the sweep's log lines,
Prefect's artifacts. The engine calls them from its worker threads: they must be thread-safe, and
one that raises is logged and skipped, never allowed to stop a sweep."""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from typing import Any, Iterator

from hpsweep.model import AttemptResult, Outcome, PlannedTrial, TrialRow, run_name

log = logging.getLogger("hpsweep")


class SweepCallback:
    """Override what you need; every hook defaults to doing nothing."""

    def on_sweep_start(self, total: int, parallel: int) -> None:
        """``total`` trials to train, at most ``parallel`` at once."""

    def on_trial_start(self, trial: PlannedTrial) -> None:
        """The trial's first attempt is about to start."""

    def on_trial_retry(self, trial: PlannedTrial, attempt: int, outcome: Outcome, delay_s: float) -> None:
        """``attempt`` failed retryably; the next starts after ``delay_s``."""

    def on_trial_end(self, trial: PlannedTrial, attempts: int, result: AttemptResult) -> None:
        """The trial's last attempt ended (``result.outcome.ok``: it has an F1)."""

    def on_sweep_end(self) -> None:
        """No trial is running any more (the report is written after this)."""

    def on_report(self, header: dict[str, Any], rows: list[TrialRow]) -> None:
        """The report is written and the parent run closed: ``rows`` ranked, ``header`` its top."""


class LogCallback(SweepCallback):
    """One log line per retry and per ended trial."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter = log):
        self._log = logger

    def on_trial_retry(self, trial: PlannedTrial, attempt: int, outcome: Outcome, delay_s: float) -> None:
        self._log.warning("trial %d (%s): attempt %d failed: %s; retrying in %.0f s", trial.index,
                          run_name(trial.hparams), attempt, outcome.reason, delay_s)

    def on_trial_end(self, trial: PlannedTrial, attempts: int, result: AttemptResult) -> None:
        self._log.info("trial %s %s: %s", run_name(trial.hparams), "finished" if result.outcome.ok else
                       "STOPPED" if result.outcome.stopped else
                       "INTERRUPTED" if result.outcome.interrupted else "FAILED",
                       describe(result.outcome, attempts))


def describe(outcome: Outcome, attempts: int) -> str:
    """``F1 0.9812``, or the reason (``after 3 attempts: …`` when it was retried)."""
    if outcome.ok:
        return f"F1 {outcome.f1:.4f}"
    return f"after {attempts} attempts: {outcome.reason}" if attempts > 1 else str(outcome.reason)


# Callbacks that whoever starts a sweep in this context wants called too (the CLI's progress
# display): the sweep flow cannot take them as parameters, since flow parameters must be data.
_observers: contextvars.ContextVar[tuple[SweepCallback, ...]] = contextvars.ContextVar("hpsweep_observers",
                                                                                        default=())


@contextmanager
def observing(*callbacks: SweepCallback) -> Iterator[None]:
    """Sweeps started inside this block (in this thread or context) also call ``callbacks``."""
    token = _observers.set(_observers.get() + callbacks)
    try:
        yield
    finally:
        _observers.reset(token)


def observers() -> tuple[SweepCallback, ...]:
    return _observers.get()


class Callbacks:
    """Calls a hook on every callback; one that raises is logged and skipped."""

    def __init__(self, callbacks: list[SweepCallback]):
        self._callbacks = list(callbacks)

    def emit(self, hook: str, *args: object) -> None:
        for cb in self._callbacks:
            try:
                getattr(cb, hook)(*args)
            except Exception as e:  # noqa: BLE001 - a display or artifact must never stop a sweep
                log.warning("callback %s.%s failed: %s: %s", type(cb).__name__, hook, type(e).__name__, e)
