"""A trial's life in one place: its states, the moves between them, and the typed records that
describe it on its way (planned → sent to a launcher → an attempt's outcome → a leaderboard row).

Every module speaks this vocabulary; ``hpsweep.store`` maps it to and from MLflow, and checks each
state change it writes against ``TRANSITIONS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

Hparams = dict[str, Any]

# A RUNNING trial's (and sweep's) process tells the store it is alive every HEARTBEAT_S; a run
# silent for ZOMBIE_AFTER_S is a zombie: the next sweep closes it, and `status` calls it stale.
HEARTBEAT_S = float(os.environ.get("HPSWEEP_HEARTBEAT_S", "30"))
ZOMBIE_AFTER_S = 4 * HEARTBEAT_S


class TrialState(str, Enum):
    """Where one combination stands within one sweep."""

    PLANNED = "PLANNED"  # queued in this sweep, not started
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"  # trained, F1 stored
    FAILED = "FAILED"  # ended without an F1: the trainer's error, or the machine's
    KILLED = "KILLED"  # ended by a signal: time limit, lost host, zombie closed by a later sweep
    REUSED = "REUSED"  # an earlier sweep's FINISHED run with the same trial key stands in
    NEVER_STARTED = "NEVER_STARTED"  # the sweep ended before this trial got a run
    INTERRUPTED = "INTERRUPTED"  # the sweep was stopped (Ctrl-C, SIGTERM) before this trial finished
    STOPPED = "STOPPED"  # stopped early by the sweep's early-stopping rule; a later sweep resumes it

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]

    @property
    def has_f1(self) -> bool:
        return self in (TrialState.FINISHED, TrialState.REUSED)

    @property
    def report_status(self) -> str:
        """The leaderboard's statuses (a public contract): FINISHED, REUSED, FAILED, INTERRUPTED
        for a trial a stopped sweep did not finish (a rerun trains it), and STOPPED for one the
        early-stopping rule stopped (a rerun resumes it)."""
        return self.value if self.has_f1 or self in (TrialState.INTERRUPTED, TrialState.STOPPED) else "FAILED"


# The legal moves. FINISHED and REUSED are final: a finished trial is never reopened. FAILED and
# KILLED go back to RUNNING only for a retry (the same run, the next attempt). STOPPED is never
# retried by its own sweep; like INTERRUPTED it may run again (a later sweep resumes its checkpoints).
TRANSITIONS: dict[TrialState, frozenset[TrialState]] = {
    TrialState.PLANNED: frozenset({TrialState.RUNNING, TrialState.REUSED, TrialState.NEVER_STARTED,
                                   TrialState.INTERRUPTED}),
    TrialState.RUNNING: frozenset({TrialState.FINISHED, TrialState.FAILED, TrialState.KILLED,
                                   TrialState.INTERRUPTED, TrialState.STOPPED}),
    TrialState.STOPPED: frozenset({TrialState.RUNNING}),
    TrialState.FAILED: frozenset({TrialState.RUNNING}),
    TrialState.KILLED: frozenset({TrialState.RUNNING}),
    TrialState.INTERRUPTED: frozenset({TrialState.RUNNING}),
    TrialState.FINISHED: frozenset(),
    TrialState.REUSED: frozenset(),
    TrialState.NEVER_STARTED: frozenset(),
}


def interrupted_reason(signal_name: str) -> str:
    """What an interrupted trial's row and run say."""
    return (f"interrupted: the sweep was stopped ({signal_name}) before this trial finished; a rerun "
            "trains it, from its last checkpoint if it saved one")


class IllegalTransition(RuntimeError):
    """A state change the trial lifecycle does not allow (a bug, or two writers on one run)."""


def check_transition(current: TrialState, new: TrialState, what: str = "trial") -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"{what}: {current.value} → {new.value} is not allowed")


@dataclass(frozen=True)
class PlannedTrial:
    """One combination of the sweep and its trial key (the identity of its GPU work)."""

    index: int  # 1-based position in the combinations file
    hparams: Hparams
    key: str


@dataclass(frozen=True)
class TrialJob:
    """One attempt of one combination, as plain JSON-able data (it travels to a pool worker)."""

    sweep_id: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    index: int
    hparams: Hparams
    trial_key: str
    attempt: int
    settings: dict[str, Any]
    train: str
    val: str
    entrypoint: str | None = None
    command: list[str] | None = None
    time_limit_s: float | None = None
    gpus: int = 1
    run_id: str | None = None  # set from the second attempt on: retries continue the same run
    work_dir: str = ".hpsweep"
    versions: dict[str, str] = field(default_factory=dict)  # spec hash, data and code versions (tags)
    # DataRef dicts ("train", "val"): how a host without the sweep's files fetches them (DVC remote).
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    cwd: str = field(default_factory=lambda: str(Path.cwd()))
    # False: no unfinished attempt of this trial exists, so it starts from scratch (no checkpoints).
    resume: bool = True
    # Early stopping is on: {"metric": ..., "grace_s": ...}; the trial's host then watches for the
    # sweep's stop request (hpsweep.engine.process). None: the trial trains to its end.
    early_stop: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def display_name(self) -> str:
        """The attempt's name in Prefect: its MLflow run's (the hparams), plus the attempt from the second on."""
        return run_name(self.hparams) + (f" (attempt {self.attempt})" if self.attempt > 1 else "")


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended. ``f1`` is set when ``ok``, and for a ``stopped`` trial: its best
    reported value of the early-stopping metric (not comparable with a finished trial's)."""

    ok: bool
    f1: float | None
    reason: str | None = None
    retryable: bool = False  # the machine failed it (signal, lost host, tracking down), not the hparams
    killed: bool = False
    interrupted: bool = False  # the sweep was stopped (Ctrl-C, SIGTERM) before the trial could finish
    stopped: bool = False  # the early-stopping rule stopped it (``reason`` says why)
    stopped_at_step: int | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def state(self) -> TrialState:
        if self.ok:
            return TrialState.FINISHED
        if self.stopped:
            return TrialState.STOPPED
        if self.interrupted:
            return TrialState.INTERRUPTED
        return TrialState.KILLED if self.killed else TrialState.FAILED

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def timed(self, started_at: float, ended_at: float) -> "Outcome":
        return replace(self, started_at=started_at, ended_at=ended_at)


@dataclass(frozen=True)
class AttemptResult:
    """What a launcher hands back: the trial's MLflow run (None if it never got one) and the outcome."""

    run_id: str | None
    outcome: Outcome


# A trainer's F1 further than this from the F1 its own predictions give is flagged (tag and footnote).
F1_MISMATCH_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Significance:
    """A trial's F1 against the sweep's leader, from a paired bootstrap over its validation predictions
    (``hpsweep.report.significance``)."""

    ci_low: float  # the F1's percentile interval (95%)
    ci_high: float
    p_beats_best: float  # share of resamples where its F1 beats the leader's
    tied_with_best: bool  # the interval of its paired difference to the leader holds 0
    recomputed_f1: float  # F1 recomputed from the predictions with the spec's metric definition


@dataclass(frozen=True)
class TrialRow:
    """One trial as every view shows it: the report, `hpsweep status`, plan.json, the Prefect table.

    Built from a trial run (``hpsweep.store``) or from the plan; ``rank`` is set by ranking.
    """

    index: int
    hparams: Hparams
    state: TrialState
    run_id: str = ""
    run_name: str | None = None
    key: str | None = None
    f1: float | None = None
    reason: str | None = None
    attempt: int = 1
    duration_s: float | None = None
    started_at: float | None = None
    heartbeat: float | None = None
    rank: int | None = None
    # From the plan: the trial's duration estimate, where it came from, and its turn to start.
    expected_duration_s: float | None = None
    duration_source: str | None = None
    dispatch_position: int | None = None
    reused_run_id: str | None = None
    stopped_at_step: int | None = None  # STOPPED: the step the early-stopping rule stopped it at
    significance: Significance | None = None  # set by the report when the trial logged its predictions

    @property
    def has_f1(self) -> bool:
        return self.state.has_f1 and self.f1 is not None

    @property
    def f1_mismatch(self) -> bool:
        """The trainer's F1 is not what its own predictions give (the trainer's F1 stays the ranked one)."""
        return (self.has_f1 and self.significance is not None
                and abs(self.significance.recomputed_f1 - self.f1) > F1_MISMATCH_TOLERANCE)  # type: ignore[operator]

    @property
    def report_status(self) -> str:
        """FINISHED or REUSED with an F1, INTERRUPTED, STOPPED, else FAILED."""
        if self.state.has_f1 and self.f1 is None:
            return "FAILED"  # a finished run whose F1 is missing
        return self.state.report_status

    def leaderboard(self) -> dict[str, Any]:
        """The row in leaderboard.json (a public contract: keys are added, never renamed)."""
        row: dict[str, Any] = {"rank": self.rank, "hparams": self.hparams, "f1": self.f1 if self.has_f1 else None,
                               "status": self.report_status,
                               "run_id": self.run_id, "run_name": self.run_name, "attempts": self.attempt,
                               "duration_s": self.duration_s}
        sig = self.significance
        row.update({"f1_ci_low": sig.ci_low if sig else None, "f1_ci_high": sig.ci_high if sig else None,
                    "p_beats_best": sig.p_beats_best if sig else None,
                    "tied_with_best": sig.tied_with_best if sig else None,
                    "f1_recomputed": sig.recomputed_f1 if sig else None})
        if not self.has_f1:
            row["reason"] = self.reason or f"run ended {self.state.value}"
        if self.state is TrialState.STOPPED:  # its best reported value: shown, ranked below every FINISHED
            row.update(f1=self.f1, stopped_at_step=self.stopped_at_step, stop_reason=self.reason)
        return row

    def plan_entry(self) -> dict[str, Any]:
        """The row in the parent run's plan.json (what `status` and `report` read back)."""
        return {"index": self.index, "key": self.key, "hparams": self.hparams, "reused_run_id": self.reused_run_id,
                "expected_duration_s": self.expected_duration_s, "duration_source": self.duration_source,
                "dispatch_position": self.dispatch_position}

    @classmethod
    def from_plan_entry(cls, entry: dict[str, Any]) -> "TrialRow":
        reused = entry.get("reused_run_id")
        return cls(index=int(entry["index"]), hparams=entry["hparams"], key=entry.get("key"),
                   state=TrialState.REUSED if reused else TrialState.PLANNED, reused_run_id=reused,
                   run_id=reused or "", expected_duration_s=entry.get("expected_duration_s"),
                   duration_source=entry.get("duration_source"), dispatch_position=entry.get("dispatch_position"))


def run_name(hparams: Hparams) -> str:
    """A run name a person can read: the hparams, e.g. ``lr=0.01 depth=3``."""
    return " ".join(f"{k}={v}" for k, v in hparams.items())[:250]


def plan_json(rows: list[TrialRow]) -> str:
    return json.dumps([r.plan_entry() for r in rows], indent=1)
