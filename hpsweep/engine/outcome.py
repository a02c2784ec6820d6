"""How a trial attempt ended, judged from what its process left behind.

This classifies a failure (the trainer's own, or the machine's: ``retryable``); whether to try
again is the engine's RetryPolicy's decision alone."""

from __future__ import annotations

import math
import signal
from typing import Any

from hpsweep.model import Outcome


def judge(
    exitcode: int | None,
    timed_out: bool,
    time_limit_s: float | None,
    outcome: dict[str, Any] | None,
    result: dict[str, Any] | None,
) -> Outcome:
    """Turn what a trial process left behind into an outcome with a reason a person can act on."""
    if timed_out:
        return Outcome(False, None, f"time limit of {time_limit_s:g} s exceeded: killed", killed=True)
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return Outcome(False, None, f"trainer process killed by {name} (out of memory or lost host?)",
                            retryable=True, killed=True)
    if outcome is None:
        return Outcome(False, None, f"trainer process exited with code {exitcode} without reporting",
                            retryable=True)
    if "error" in outcome:
        if outcome.get("retryable"):
            return Outcome(False, None, outcome["error"], retryable=True)
        return Outcome(False, None, f"trainer raised {outcome['error']}")
    if outcome.get("exit_code"):
        code = outcome["exit_code"]
        if code < 0:
            return Outcome(False, None, f"command killed by {signal.Signals(-code).name}",
                                retryable=True, killed=True)
        return Outcome(False, None, f"command exited with code {code}")
    return check_f1(result)


def check_f1(result: dict[str, Any] | None) -> Outcome:
    """F1 must be a finite number in [0, 1]; anything else fails the trial with that reason."""
    if result is None or "f1" not in result:
        return Outcome(False, None, 'trainer wrote no F1 (expected {"f1": <float>} in HPSWEEP_RESULT)')
    f1 = result["f1"]
    if isinstance(f1, bool) or not isinstance(f1, (int, float)):
        return Outcome(False, None, f"F1 {f1!r} is not a number")
    if not math.isfinite(f1) or not 0.0 <= f1 <= 1.0:
        return Outcome(False, None, f"F1 {f1} is outside [0, 1]")
    return Outcome(True, float(f1))
