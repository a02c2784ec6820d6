"""Early-stopping rules: pure functions of the trials' metric histories (no I/O, no clock).

A history is ``[(step, value)]`` in ascending steps, higher values better. Each rule is asked
about one trial at one step it reported (asynchronously: with whatever the other trials have
reported so far, never waiting for them) and answers with the reason to stop it, or None.

- median (Golovin et al., Google Vizier, 2017): stop at step s when the trial's best value so far
  is below the median of the other trials' running averages at s, once at least 3 others reached s.
- ASHA (Li et al., MLSys 2020): rungs at ``min_steps · rf^k`` below ``max_steps``; at a rung a trial
  goes on only if its value there is in the top 1/rf of the trials that reached the rung so far.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

History = Sequence[tuple[int, float]]
RuleName = Literal["none", "median", "asha"]
MEDIAN_MIN_OTHERS = 3  # the median of fewer trials says too little to stop anyone


@dataclass(frozen=True)
class EarlyStopRule:
    """The rule and its settings, as the sweep runs it (``none``: every trial trains to the end)."""

    rule: RuleName = "none"
    metric: str = "val_f1"
    min_steps: int = 3  # no stop before this many reported steps (ASHA's first rung)
    reduction_factor: int = 3  # ASHA: 1/rf of the trials at a rung go on
    max_steps: int | None = None  # ASHA: the steps a trial trains when never stopped (no rung at or past it)

    @property
    def enabled(self) -> bool:
        return self.rule != "none"

    def rungs(self) -> list[int]:
        """ASHA's rungs: ``min_steps · rf^k``, below ``max_steps`` (20 rungs at most without one)."""
        rungs, r = [], self.min_steps
        while (self.max_steps is None or r < self.max_steps) and len(rungs) < 20:
            rungs.append(r)
            r *= self.reduction_factor
        return rungs

    def decide(self, history: History, step: int, others: Sequence[History]) -> str | None:
        """Why the trial with ``history`` should stop at ``step`` (one it reported), or None."""
        if self.rule == "median":
            return median_rule(history, step, others, self.metric, self.min_steps)
        if self.rule == "asha":
            return asha_rule(history, step, others, self.metric, self.rungs(), self.reduction_factor)
        return None


def best_so_far(history: History, step: int | None = None) -> float | None:
    """The best finite value reported up to ``step`` (None: the whole history)."""
    values = [v for s, v in history if (step is None or s <= step) and math.isfinite(v)]
    return max(values) if values else None


def running_average(history: History, step: int) -> float | None:
    """The mean of the values reported up to ``step``, if the trial reached ``step``."""
    if not history or max(s for s, _ in history) < step:
        return None
    values = [v for s, v in history if s <= step and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def median_rule(history: History, step: int, others: Sequence[History], metric: str = "val_f1",
                min_steps: int = 3) -> str | None:
    """Stop when the best value so far is below the median of the others' running averages at ``step``."""
    if step < min_steps:
        return None
    best = best_so_far(history, step)
    averages = [a for a in (running_average(h, step) for h in others) if a is not None]
    if best is None or len(averages) < MEDIAN_MIN_OTHERS:
        return None
    median = statistics.median(averages)
    if best < median:
        return f"stopped at step {step}: {metric} {best:.4f} < median {median:.4f} of {len(averages)} trials"
    return None


def value_at(history: History, step: int) -> float | None:
    """The trial's value at a rung: its best up to ``step``, if it reached ``step``."""
    if not history or max(s for s, _ in history) < step:
        return None
    return best_so_far(history, step)


def asha_rule(history: History, step: int, others: Sequence[History], metric: str = "val_f1",
              rungs: Sequence[int] = (3, 9, 27), reduction_factor: int = 3) -> str | None:
    """At a rung, stop unless the trial is in the top 1/rf of the trials that reached it so far.

    The cut is the (1 - 1/rf) quantile of their values at the rung (itself included), as Ray Tune's
    asynchronous HyperBand does: the first trials at a rung have little to compare with and go on.
    """
    if step not in rungs:
        return None
    mine = value_at(history, step)
    if mine is None:
        return None
    values = [mine, *(v for v in (value_at(h, step) for h in others) if v is not None)]
    cutoff = quantile(values, 1 - 1 / reduction_factor)
    if mine < cutoff:
        rung = list(rungs).index(step) + 1
        return (f"stopped at step {step} (ASHA rung {rung}): {metric} {mine:.4f} not in the top 1/{reduction_factor}"
                f" of {len(values)} trials (cutoff {cutoff:.4f})")
    return None


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), of at least one value."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class StopTracker:
    """Which steps of which trials were already judged, so each reported step is judged once, in
    order, as it arrives (a rule never reconsiders a step another trial's later report would change)."""

    rule: EarlyStopRule
    judged: dict[str, int] = field(default_factory=dict)  # trial id → last step judged
    stopped: set[str] = field(default_factory=set)  # trials already told to stop: never judged again

    def decide(self, running: Sequence[str], histories: Mapping[str, History]) -> dict[str, tuple[int, str]]:
        """For each of the ``running`` trials (ids into ``histories``, which holds every trial the rule
        compares with), the first newly reported step at which the rule stops it and why."""
        decisions: dict[str, tuple[int, str]] = {}
        for trial in running:
            if trial in self.stopped:
                continue
            history = histories.get(trial, [])
            others = [h for other, h in histories.items() if other != trial]
            for step, _ in history:
                if step <= self.judged.get(trial, 0):
                    continue
                self.judged[trial] = step
                reason = self.rule.decide(history, step, others)
                if reason is not None:
                    decisions[trial] = (step, reason)
                    self.stopped.add(trial)
                    break
        return decisions


def expected_fraction(rule: EarlyStopRule, trials: int, slots: int) -> tuple[float, float]:
    """The share of the exhaustive sweep's steps a rule is expected to train: (low, high).

    ASHA: low is synchronous successive halving (exactly 1/rf of the trials go past each rung); high
    adds the asynchronous start-up, where about ``slots`` trials pass each rung with little to compare
    with. Median: between stopping every trial at ``min_steps`` and stopping none. None: all of it.
    """
    if not rule.enabled or trials == 0 or not rule.max_steps:
        return 1.0, 1.0
    top = rule.max_steps
    if rule.rule == "median":
        return min(1.0, rule.min_steps / top), 1.0
    bounds = [*rule.rungs(), top]

    def steps(extra: int) -> float:
        reaching, total, prev = float(trials), 0.0, 0
        for k, end in enumerate(bounds):
            total += reaching * (end - prev)
            prev = end
            if k < len(bounds) - 1:
                reaching = min(reaching, reaching / rule.reduction_factor + extra)
        return total

    whole = trials * top
    return steps(0) / whole, min(1.0, steps(slots) / whole)
