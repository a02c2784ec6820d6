"""How a trial attempt ended, judged from what its process left behind.

This classifies a failure (the trainer's own, or the machine's: ``retryable``); whether to try
again is the engine's RetryPolicy's decision alone."""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import signal
from pathlib import Path
from typing import Any

from hpsweep.limits import cut_at_word
from hpsweep.model import Outcome

# The trainer's own error text in a reason: enough for a Python exception line, short enough for a table cell.
MAX_ERROR_CHARS = 300
MAX_VALUE_CHARS = 200  # a value the trainer wrote, quoted in a reason
# A result is {"f1": <float>} and a few more keys at most: a bigger file is never read into memory.
MAX_RESULT_BYTES = 1_000_000
# What read_result hands check_f1 for a result file it could not take as an object.
UNREADABLE = "hpsweep.unreadable_result"
_LONGEST_INT = 400  # digits: ints longer than this cannot be a float (Python refuses to parse > 4300)

_TRACEBACK = "Traceback (most recent call last):"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def error_line(text: str | None) -> str | None:
    """The trainer's own last error, from its stderr: the ``Type: message`` line of the last Python
    traceback (what follows it may be an exit handler's output), else the last line with a letter or
    digit in it; at most MAX_ERROR_CHARS long. None when there is nothing to show."""
    if not text:
        return None
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if starts:  # a traceback's frames are indented; its exception line is the first one that is not
        line = next((line for line in lines[starts[-1] + 1:] if line and not line[0].isspace()), None)
        if line is not None:
            return bounded(line)
    shown = [line for line in lines if any(c.isalnum() for c in line)]
    return bounded(shown[-1]) if shown else None


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with an ellipsis."""
    return cut_at_word(" ".join(text.split()), limit)


def judge(
    exitcode: int | None,
    timed_out: bool,
    time_limit_s: float | None,
    outcome: dict[str, Any] | None,
    result: dict[str, Any] | None,
    *,
    log_tail: str | None = None,
    log_hint: str | None = None,
) -> Outcome:
    """Turn what a trial process left behind into an outcome with a reason a person can act on.

    ``log_tail``: the end of the trial log (the cause when the process died without reporting);
    ``log_hint``: where the full log is, appended to the reason of a failure the log can explain.
    """
    see_log = f" (full log: {log_hint})" if log_hint else ""
    if timed_out:
        return Outcome(False, None, f"time limit of {time_limit_s:g} s exceeded: killed{see_log}", killed=True)
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return Outcome(False, None, f"trainer process killed by {name} (out of memory or lost host?){see_log}",
                       retryable=True, killed=True)
    if outcome is None:
        return Outcome(False, None, f"trainer process exited with code {exitcode} without reporting"
                                    f"{_cause(error_line(log_tail))}{see_log}", retryable=True)
    if "refused" in outcome:  # hpsweep refused to run or keep it (its data changed): final, not the trainer's
        return Outcome(False, None, str(outcome["refused"]))
    if "error" in outcome:
        if outcome.get("retryable"):
            return Outcome(False, None, outcome["error"], retryable=True)
        return Outcome(False, None, f"trainer raised {bounded(str(outcome['error']))}{see_log}")
    if outcome.get("exit_code"):
        code = outcome["exit_code"]
        if code < 0:
            return Outcome(False, None, f"command killed by {signal.Signals(-code).name}{see_log}",
                           retryable=True, killed=True)
        cause = _cause(error_line(outcome.get("stderr_tail")))
        return Outcome(False, None, f"command exited with code {code}{cause}{see_log}")
    checked = check_f1(result)
    if see_log and (result is None or "f1" not in result):  # a trainer that wrote no F1 may have said why
        return Outcome(False, None, f"{checked.reason}{see_log}")
    return checked


def _cause(line: str | None) -> str:
    return f": {line}" if line else ""


def check_f1(result: dict[str, Any] | None) -> Outcome:
    """F1 must be a finite number in [0, 1]; anything else fails the trial with that reason."""
    if result is not None and UNREADABLE in result:
        return Outcome(False, None, str(result[UNREADABLE]))
    if result is None or "f1" not in result:
        return Outcome(False, None, 'trainer wrote no F1 (expected {"f1": <float>} in HPSWEEP_RESULT)')
    f1 = result["f1"]
    if isinstance(f1, LongInteger):
        return Outcome(False, None, f"F1 {shown(f1)} is outside [0, 1]")
    if isinstance(f1, bool) or not isinstance(f1, (int, float)):
        return Outcome(False, None, f"F1 {shown(f1)} is not a number")
    if not math.isfinite(f1) or not 0.0 <= f1 <= 1.0:
        return Outcome(False, None, f"F1 {shown(f1)} is outside [0, 1]")
    return Outcome(True, float(f1))


# ---------------------------------------------------------------- the result file

class LongInteger:
    """An integer in a result file too long to be a float (not converted: that costs quadratic time)."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"{self.digits[:20]}… (an integer of {len(self.digits.lstrip('+-'))} digits)"


def _parse_int(text: str) -> int | LongInteger:
    return int(text) if len(text) <= _LONGEST_INT else LongInteger(text)


class _ShortRepr(reprlib.Repr):
    """Short reprs that never fail: ``repr`` refuses ints of more than 4300 digits."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 3 * _LONGEST_INT:
            return f"(an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits)"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = MAX_VALUE_CHARS
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 10


def shown(value: Any) -> str:
    """``value`` for a reason: its repr, at most MAX_VALUE_CHARS long, nested containers elided."""
    return bounded(_SHORT.repr(value), MAX_VALUE_CHARS)


def read_result(path: Path) -> dict[str, Any] | None:
    """The trainer's result file as an object, reading at most MAX_RESULT_BYTES; None when there is
    none. A file that is too big, not JSON or not an object comes back as ``{UNREADABLE: reason}``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(MAX_RESULT_BYTES + 1) if size <= MAX_RESULT_BYTES else b""
    except FileNotFoundError:
        return None
    except OSError as e:
        return {UNREADABLE: f"result file cannot be read: {type(e).__name__}: {e}"}
    size = max(size, len(data))  # a file still growing
    if size > MAX_RESULT_BYTES:
        return {UNREADABLE: f"result file is {size / 1e6:.1f} MB, more than the {MAX_RESULT_BYTES / 1e6:g} MB limit"}
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        return {UNREADABLE: 'result file is empty (expected {"f1": <float>})'}
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        return {UNREADABLE: f"result file is not JSON (nested too deep): {shown(text)}"}
    except ValueError as e:
        return {UNREADABLE: f"result file is not JSON ({e}): {shown(text)}"}
    if not isinstance(value, dict):
        return {UNREADABLE: f'result file holds {shown(value)}, not {{"f1": <float>}}'}
    return value


def result_json(f1: Any) -> str:
    """The result file for what a Python trainer returned, never raising: a number as JSON; for
    anything else (an int too long for a float too), the reason check_f1 would give."""
    if isinstance(f1, (bool, float)) or (isinstance(f1, int) and f1.bit_length() <= 3 * _LONGEST_INT):
        return json.dumps({"f1": f1})
    problem = "is outside [0, 1]" if isinstance(f1, int) else "is not a number"
    return json.dumps({UNREADABLE: f"F1 {shown(f1)} {problem}"})
