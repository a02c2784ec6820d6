"""Know before you spend: which trials a sweep will train, how long each should take, the
GPU-hours, the makespan under the quota and the cost; and the order to start them in.

Pure functions over plain data, shared by `hpsweep plan` (which starts nothing) and the `sweep`
flow (which starts the longest trials first when it can predict them). The only reads are
``reusable_runs``, ``duration_history`` and ``why_not_reused``: bounded MLflow queries through the
store given.

Where a trial's duration estimate comes from, best first:

- ``measured``: a FINISHED trial of the same experiment with the same hparams under the same
  spec (its ``hpsweep.duration_s``, the newest one);
- ``spec``: the spec's ``expected_duration_s``;
- ``median``: the median duration of the experiment's finished trials (those under the same spec
  when there are any, else all of them; the newest ``HISTORY_LIMIT``);
- ``unknown``: nothing to go on (no estimate, file order, no GPU-hours or cost).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from hpsweep.engine.early_stop import EarlyStopRule, expected_fraction
from hpsweep.inputs import Hparams, ModelSpec, SweepInputs, canonical_json
from hpsweep.model import PlannedTrial, TrialRow, TrialState

if TYPE_CHECKING:
    from hpsweep.store import SweepStore

# Assumed list prices (docs/design.md §2: g5.xlarge, us-east-1); pass your own on the command line.
DEFAULT_PRICE_PER_GPU_HOUR = 1.006
DEFAULT_SPOT_PRICE_PER_GPU_HOUR = 0.40
HISTORY_LIMIT = 1000  # finished trials read for estimates: planning never reads a whole history

LONGEST_FIRST, FILE_ORDER = "longest first", "file order"
# With early stopping the trials start in a shuffled order (seeded by their keys: the same on every
# rerun): the rules judge each trial against those that came before it, and a file sorted from weak to
# strong (small models and low learning rates first) lets every later trial through (bench/README.md).
SHUFFLED = "shuffled order (early stopping: each trial is judged against a fair sample)"

Source = Literal["measured", "spec", "median", "unknown"]


@dataclass(frozen=True)
class Estimate:
    seconds: float | None
    source: Source


@dataclass(frozen=True)
class DurationHistory:
    """Measured durations of earlier trials of the experiment, newest first: (hparams, seconds)."""

    same_spec: tuple[tuple[Hparams, float], ...] = ()  # trained under this spec hash
    other: tuple[tuple[Hparams, float], ...] = ()  # any spec; read only when same_spec is empty


@dataclass(frozen=True)
class Prices:
    on_demand: float = DEFAULT_PRICE_PER_GPU_HOUR  # $ per GPU-hour
    spot: float = DEFAULT_SPOT_PRICE_PER_GPU_HOUR


def plan_trials(inputs: SweepInputs) -> tuple[list[PlannedTrial], dict[str, str]]:
    """A trial key per combination, plus the versions it was derived from (provenance tags)."""
    from hpsweep.versions import TAG_ENV_VERSION, code_version, data_version, env_version, spec_hash, trial_key

    versions = {
        "hpsweep.spec_hash": spec_hash(inputs.spec),
        "hpsweep.data_version": f"{data_version(inputs.train)}/{data_version(inputs.val)}",
        "hpsweep.code_version": code_version(inputs.spec),
        TAG_ENV_VERSION: env_version(inputs.spec),
    }
    trials = [
        PlannedTrial(i, hp, trial_key(hp, versions["hpsweep.spec_hash"], versions["hpsweep.data_version"],
                                      versions["hpsweep.code_version"], versions[TAG_ENV_VERSION]))
        for i, hp in enumerate(inputs.combinations, start=1)
    ]
    return trials, versions


def trials_to_train(trials: list[PlannedTrial], reused: dict[str, TrialRow]) -> list[PlannedTrial]:
    """Every trial without a reusable FINISHED run, in file order."""
    return [t for t in trials if t.key not in reused]


# ---------------------------------------------------------------- why trials are not reused

# What a version tag covers, in the words of a reuse explanation (in this order).
CHANGE_LABELS = {"hpsweep.spec_hash": "spec", "hpsweep.data_version": "data", "hpsweep.code_version": "code",
                 "hpsweep.env_version": "environment"}
NAMED_FILES = 3  # changed files named in an explanation; the rest are counted


def reuse_explanation(previous: dict[str, str] | None, versions: dict[str, str],
                      changed_files: list[str] | None = None) -> str | None:
    """Why the previous runs' results do not carry over, e.g. ``code changed (trainer/model_def.py),
    environment changed``; None when there are no previous runs or nothing changed.

    ``previous``: the version tags of the experiment's newest finished trial run; ``changed_files``:
    the code files that differ from it (None: not known).
    """
    if not previous:
        return None
    reasons = []
    for tag, label in CHANGE_LABELS.items():
        if tag not in versions or previous.get(tag) == versions[tag]:
            continue
        if tag not in previous:
            reasons.append(f"{label} not recorded on earlier runs")
        elif tag == "hpsweep.data_version":
            pairs = zip(("train", "val"), previous[tag].split("/"), versions[tag].split("/"))
            parts = [name for name, old, new in pairs if old != new]
            reasons.append(f"data changed ({', '.join(parts)})" if parts else "data changed")
        elif tag == "hpsweep.code_version" and changed_files:
            named = ", ".join(changed_files[:NAMED_FILES])
            more = len(changed_files) - NAMED_FILES
            reasons.append(f"code changed ({named}{f' and {more} more' if more > 0 else ''})")
        else:
            reasons.append(f"{label} changed")
    return ", ".join(reasons) or None


def changed_code_files(previous_manifest: str | None, current: dict[str, str]) -> list[str] | None:
    """The code files that differ between a run's manifest tag (file → md5[:8], JSON) and ``current``
    (file → md5): edited, new or removed, sorted; None when the run recorded no manifest."""
    if not previous_manifest:
        return None
    try:
        before = json.loads(previous_manifest)
    except ValueError:
        return None
    if not isinstance(before, dict):
        return None
    now = {path: md5[:8] for path, md5 in current.items()}
    out = []
    for path in sorted(before.keys() | now.keys()):
        if path not in before:
            out.append(f"{path} (new)")
        elif path not in now:
            out.append(f"{path} (removed)")
        elif before[path] != now[path]:
            out.append(path)
    return out


def why_not_reused(store: "SweepStore", experiment_id: str | None, spec: ModelSpec, versions: dict[str, str],
                   retrain: bool) -> str | None:
    """``reuse_explanation`` against the experiment's newest finished trial run (one search)."""
    from hpsweep.versions import TAG_CODE_MANIFEST, code_manifest

    if experiment_id is None:
        return None
    if retrain:
        return "--retrain given"
    previous = store.latest_trial_tags(experiment_id, [*CHANGE_LABELS, TAG_CODE_MANIFEST])
    if previous is None:
        return None
    changed = None
    if previous.get("hpsweep.code_version") not in (None, versions.get("hpsweep.code_version")):
        changed = changed_code_files(previous.get(TAG_CODE_MANIFEST), code_manifest(spec))
    return reuse_explanation(previous, versions, changed)


def describe_reuse(to_train: int, reused: int, why: str | None) -> str:
    """``12 to train: code changed (trainer/model_def.py), 0 reused``: the plan's and the sweep's start line."""
    return f"{to_train} to train{f': {why}' if why and to_train else ''}, {reused} reused"


# ---------------------------------------------------------------- estimates and order


def estimate_durations(trials: list[PlannedTrial], spec_duration_s: float | None,
                       history: DurationHistory) -> list[Estimate]:
    """One estimate per trial (see the module docstring for the order of sources)."""
    measured: dict[str, float] = {}
    for hparams, seconds in history.same_spec:
        measured.setdefault(canonical_json(hparams), seconds)  # newest first: the first one wins
    pool = [s for _, s in history.same_spec] or [s for _, s in history.other]
    median = statistics.median(pool) if pool else None
    out = []
    for t in trials:
        seconds = measured.get(canonical_json(t.hparams))
        if seconds is not None:
            out.append(Estimate(seconds, "measured"))
        elif spec_duration_s is not None:
            out.append(Estimate(float(spec_duration_s), "spec"))
        elif median is not None:
            out.append(Estimate(median, "median"))
        else:
            out.append(Estimate(None, "unknown"))
    return out


def dispatch_order(trials: list[PlannedTrial], estimates: list[Estimate], early_stop: bool = False
                   ) -> tuple[list[PlannedTrial], list[Estimate], str]:
    """Longest first when every trial has an estimate (a shorter makespan under a quota: the long
    ones do not end up alone at the tail); file order otherwise. Ties keep file order. With
    ``early_stop``: a shuffle seeded by the trial keys (``SHUFFLED``), whatever the estimates."""
    if early_stop and len(trials) > 1:  # ordered by a hash of each key: a shuffle no file order can undo
        pairs = sorted(zip(trials, estimates), key=lambda p: hashlib.sha256(p[0].key.encode()).digest())
        return [t for t, _ in pairs], [e for _, e in pairs], SHUFFLED
    if not trials or any(e.seconds is None for e in estimates):
        return list(trials), list(estimates), FILE_ORDER
    if len({e.seconds for e in estimates}) == 1:
        return list(trials), list(estimates), FILE_ORDER  # all equal: longest first is file order
    pairs = sorted(zip(trials, estimates), key=lambda p: -(p[1].seconds or 0.0))  # stable
    return [t for t, _ in pairs], [e for _, e in pairs], LONGEST_FIRST


def describe_order(order: str, estimates: list[Estimate]) -> str:
    """The dispatch order and where its durations came from, e.g. 'longest first (3 measured, 2 median)'."""
    if order == SHUFFLED:
        return order
    sources = source_counts(estimates)
    if estimates and sources.get("unknown") == len(estimates):
        return f"{order} (no durations known yet)"
    detail = ", ".join(f"{n} {s}" for s, n in sources.items() if n)
    return f"{order} ({detail})" if detail else order


def source_counts(estimates: list[Estimate]) -> dict[str, int]:
    out = {"measured": 0, "spec": 0, "median": 0, "unknown": 0}
    for e in estimates:
        out[e.source] += 1
    return out


def list_schedule(durations: Sequence[float], slots: int, busy: Sequence[float] = ()) -> float:
    """Makespan of starting ``durations`` in the given order, each on the first free slot.

    ``busy``: seconds until each already-occupied slot frees up (running trials; status's ETA).
    Greedy list scheduling, exactly what the GPU workers do with their queue.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    free = sorted(list(busy)[:slots]) + [0.0] * max(0, slots - len(busy))
    heapq.heapify(free)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) if free else 0.0


def slots_for(quota: int, gpus_per_trial: int, host: tuple[int, ...] = ()) -> int:
    """Trials that can run at once: floor(quota / gpus), fewer if this host has fewer GPUs."""
    cap = quota // gpus_per_trial
    if host:
        cap = min(cap, len(host) // gpus_per_trial)
    return max(1, cap)


# ---------------------------------------------------------------- the plan


def plan_rows(trials: list[PlannedTrial], reused: dict[str, TrialRow], to_train: list[PlannedTrial],
              estimates: list[Estimate]) -> list[TrialRow]:
    """Every trial in file order, with its reuse, its estimate and its turn (``to_train`` in dispatch
    order, ``estimates`` alongside): plan.json's rows, and `hpsweep plan --json`'s."""
    est = {t.index: e for t, e in zip(to_train, estimates)}
    turn = {t.index: i for i, t in enumerate(to_train, start=1)}
    return [TrialRow(index=t.index, hparams=t.hparams, key=t.key,
                     state=TrialState.REUSED if t.key in reused else TrialState.PLANNED,
                     reused_run_id=reused[t.key].run_id if t.key in reused else None,
                     expected_duration_s=est[t.index].seconds if t.index in est else None,
                     duration_source=est[t.index].source if t.index in est else None,
                     dispatch_position=turn.get(t.index)) for t in trials]


def make_plan(trials: list[PlannedTrial], reused: dict[str, TrialRow], estimates: list[Estimate],
              slots: int, gpus_per_trial: int, prices: Prices, why: str | None = None,
              early_stop: EarlyStopRule = EarlyStopRule()) -> dict[str, Any]:
    """The plan as plain JSON-able data. ``estimates`` are for ``trials_to_train(trials, reused)``;
    ``why``: ``why_not_reused``'s explanation of the trials not reused; ``early_stop``: the rule the
    sweep would run with (the expected GPU-hours range under it)."""
    to_train = trials_to_train(trials, reused)
    if len(estimates) != len(to_train):
        raise ValueError(f"{len(estimates)} estimates for {len(to_train)} trials to train")
    ordered, ordered_est, order = dispatch_order(to_train, estimates, early_stop.enabled)
    known = all(e.seconds is not None for e in estimates)
    seconds = [e.seconds or 0.0 for e in estimates]
    gpu_hours = sum(seconds) * gpus_per_trial / 3600 if known else None
    saved = [r.duration_s for r in reused.values()]
    return {
        "trials": len(trials),
        "reused": len(trials) - len(to_train),
        "to_train": len(to_train),
        "why_not_reused": why if to_train else None,
        "slots": slots,
        "gpus_per_trial": gpus_per_trial,
        "duration_sources": source_counts(estimates),
        "gpu_hours": gpu_hours,
        "reuse_saves_gpu_hours": (sum(saved) * gpus_per_trial / 3600
                                  if saved and all(s is not None for s in saved) else None),
        "makespan_s": list_schedule([e.seconds or 0.0 for e in ordered_est], slots) if known else None,
        "makespan_file_order_s": list_schedule(seconds, slots) if known else None,
        "lower_bound_s": max(sum(seconds) / slots, max(seconds, default=0.0)) if known else None,
        "cost": {
            "price_per_gpu_hour": prices.on_demand,
            "spot_price_per_gpu_hour": prices.spot,
            "on_demand": gpu_hours * prices.on_demand if gpu_hours is not None else None,
            "spot": gpu_hours * prices.spot if gpu_hours is not None else None,
        },
        "dispatch_order": order,
        "early_stop": _early_stop_plan(early_stop, len(to_train), slots, gpu_hours),
        "rows": [r.plan_entry() for r in plan_rows(trials, reused, ordered, ordered_est)],
    }


def _early_stop_plan(rule: EarlyStopRule, to_train: int, slots: int, gpu_hours: float | None) -> dict[str, Any] | None:
    """The rule and the GPU-hours expected under it: [low, high] (``early_stop.expected_fraction``)."""
    if not rule.enabled:
        return None
    known = gpu_hours is not None and rule.max_steps is not None
    low, high = expected_fraction(rule, to_train, slots) if known else (None, None)
    return {**asdict(rule), "gpu_hours_range": [gpu_hours * low, gpu_hours * high] if known else None}


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: dict[str, Any], name: str, quota: int, host: tuple[int, ...], launcher: str) -> str:
    """The terminal view of ``make_plan``'s output."""
    src = plan["duration_sources"]
    labels = {"measured": "measured (same hparams, same spec)", "spec": "from the spec's expected_duration_s",
              "median": "median of earlier trials", "unknown": "unknown"}
    lines = [f"plan for sweep {name} (nothing has been started)",
             f"  trials      {plan['trials']} combinations: "
             f"{describe_reuse(plan['to_train'], plan['reused'], plan.get('why_not_reused'))} "
             "(a FINISHED run with the same trial key)"]
    if plan["to_train"]:
        lines.append("  durations   " + ", ".join(f"{n} {labels[s]}" for s, n in src.items() if n))
        known = [r["expected_duration_s"] for r in plan["rows"] if r["expected_duration_s"] is not None]
        if known:
            lines.append(f"  per trial   min {human_duration(min(known))}, median "
                         f"{human_duration(statistics.median(known))}, max {human_duration(max(known))}")
    where = (f"host GPUs: {','.join(map(str, host))}" if host else "CPU host") if launcher == "local" \
        else "on the work pool"
    lines.append(f"  slots       {plan['slots']} trial(s) at once (quota {quota} / {plan['gpus_per_trial']} "
                 f"GPU(s) per trial; {where})")
    if plan["to_train"] and plan["gpu_hours"] is None:
        lines.append("  GPU-hours   unknown: set expected_duration_s in the spec, or run some trials of this "
                     "experiment first")
    elif plan["to_train"]:
        saved = plan["reuse_saves_gpu_hours"]
        lines.append(f"  GPU-hours   {_amount(plan['gpu_hours'])}" + (f" (reuse saves {_amount(saved)})" if saved else ""))
        lines.append(f"  makespan    {human_duration(plan['makespan_s'])} {plan['dispatch_order']} "
                     f"(file order: {human_duration(plan['makespan_file_order_s'])}; lower bound "
                     f"{human_duration(plan['lower_bound_s'])}), plus start-up")
        c = plan["cost"]
        lines.append(f"  cost        ${_amount(c['on_demand'])} on demand at ${c['price_per_gpu_hour']:g}/GPU-h, "
                     f"${_amount(c['spot'])} on spot at ${c['spot_price_per_gpu_hour']:g}/GPU-h (spot: before "
                     "rework after interruptions)")
    if not plan["to_train"]:
        lines.append("  GPU-hours   0: every trial is reused (--retrain trains them again)")
    es = plan.get("early_stop")
    if es and plan["to_train"]:
        if es["gpu_hours_range"] is None:
            lines.append(f"  early stop  {es['rule']}: expected GPU-hours unknown (needs the durations and max_steps: "
                         "settings.epochs or --early-stop-max-steps)")
        else:
            low, high = es["gpu_hours_range"]
            lines.append(f"  early stop  {es['rule']}: expected GPU-hours {_amount(low)} to {_amount(high)} (of "
                         f"{_amount(plan['gpu_hours'])} exhaustive; stopped trials resume on a later sweep)")
    lines.append(f"  dispatch    {plan['dispatch_order']}")
    if plan.get("trainer_interpreter"):
        lines.append(f"  trainer     runs with {plan['trainer_interpreter']}")
    return "\n".join(lines)


def _amount(x: float) -> str:
    """Two decimals, but never 0.00 for a small non-zero amount (a short sweep still costs something)."""
    return f"{x:,.2f}" if x >= 1 or x == 0 else f"{x:.2g}"


# ---------------------------------------------------------------- the two reads


def reusable_runs(store: "SweepStore", experiment_id: str | None, trials: list[PlannedTrial],
                  versions: dict[str, str], retrain: bool) -> dict[str, TrialRow]:
    """Trial key → the FINISHED run the sweep will reuse instead of training (none with --retrain)."""
    if retrain or experiment_id is None:
        return {}
    return store.finished_trials_by_key(experiment_id, {t.key for t in trials}, versions)


def duration_history(store: "SweepStore", experiment_id: str | None, spec_hash: str) -> DurationHistory:
    """The newest finished trials' durations: under this spec first, any spec only when there are none."""
    if experiment_id is None:
        return DurationHistory()
    same = store.finished_trial_durations(experiment_id, spec_hash, HISTORY_LIMIT)
    if same:
        return DurationHistory(tuple(same))
    return DurationHistory((), tuple(store.finished_trial_durations(experiment_id, None, HISTORY_LIMIT)))
