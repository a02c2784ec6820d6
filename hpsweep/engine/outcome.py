"""How a trial attempt ended, judged from what its process left behind."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialOutcome:
    """How one attempt ended. ``f1`` is set exactly when ``ok``."""

    ok: bool
    f1: float | None
    reason: str | None = None
    # A failure of the machine, not of the hparams (signal, lost host): worth another attempt.
    retryable: bool = False
    killed: bool = False
    started_at: float = 0.0
    ended_at: float = 0.0


def judge(
    exitcode: int | None,
    timed_out: bool,
    time_limit_s: float | None,
    outcome: dict[str, Any] | None,
    result: dict[str, Any] | None,
) -> TrialOutcome:
    """Turn what a trial process left behind into an outcome with a reason a person can act on."""
    if timed_out:
        return TrialOutcome(False, None, f"time limit of {time_limit_s:g} s exceeded: killed", killed=True)
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return TrialOutcome(False, None, f"trainer process killed by {name} (out of memory or lost host?)",
                            retryable=True, killed=True)
    if outcome is None:
        return TrialOutcome(False, None, f"trainer process exited with code {exitcode} without reporting",
                            retryable=True)
    if "error" in outcome:
        if outcome.get("retryable"):
            return TrialOutcome(False, None, outcome["error"], retryable=True)
        return TrialOutcome(False, None, f"trainer raised {outcome['error']}")
    if outcome.get("exit_code"):
        code = outcome["exit_code"]
        if code < 0:
            return TrialOutcome(False, None, f"command killed by {signal.Signals(-code).name}",
                                retryable=True, killed=True)
        return TrialOutcome(False, None, f"command exited with code {code}")
    return check_f1(result)


def check_f1(result: dict[str, Any] | None) -> TrialOutcome:
    """F1 must be a finite number in [0, 1]; anything else fails the trial with that reason."""
    if result is None or "f1" not in result:
        return TrialOutcome(False, None, 'trainer wrote no F1 (expected {"f1": <float>} in HPSWEEP_RESULT)')
    f1 = result["f1"]
    if isinstance(f1, bool) or not isinstance(f1, (int, float)):
        return TrialOutcome(False, None, f"F1 {f1!r} is not a number")
    if not math.isfinite(f1) or not 0.0 <= f1 <= 1.0:
        return TrialOutcome(False, None, f"F1 {f1} is outside [0, 1]")
    return TrialOutcome(True, float(f1))
