"""A sweep's report, assembled from the store: shared by the sweep's end (which also applies the
champion rule) and `hpsweep report` (which writes the same files again and changes nothing in MLflow).

MLflow is the source of truth: the rows are read back from the trial runs, plus the reused runs
and a row for every combination that never got a run, so every combination appears once.
"""

from __future__ import annotations

import json
from collections import Counter
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsweep.model import PlannedTrial, TrialRow, TrialState, interrupted_reason, run_name
from hpsweep.report.cells import short_text
from hpsweep.report.leaderboard import (LEADERBOARD_JSON, counts, leaderboard_json, learning_curves, rank_rows,
                                        write_report)
from hpsweep.store.registry import MLMODEL_FILE, RegisteredVersion, champion_uri
from hpsweep.report import folders
from hpsweep.report import significance as stats
from hpsweep.store.tags import (TAG_DATA_VERSION, TAG_EARLY_STOP, TAG_GIT_COMMIT, TAG_GPUS_PER_TRIAL,
                                TAG_INTERRUPTED, TAG_METRIC, TAG_QUOTA, TAG_SETTINGS, TAG_SPEC_HASH, TAG_TIE_BREAK,
                                int_tag)
from hpsweep.store.uri import redact_uri

if TYPE_CHECKING:
    from hpsweep.report.status import SweepRecord
    from hpsweep.store import SweepStore

NEVER_STARTED_REASON = "never started (see the sweep's log)"
Report = tuple[list[TrialRow], dict[str, Any], dict[str, Path]]  # ranked rows, header written, files written
Publish = Callable[[str, str], None]  # (file name, text) → kept with the sweep in MLflow

log = logging.getLogger("hpsweep")


class ReportNotWritten(OSError):
    """`hpsweep report` could not write the leaderboard where it was asked to."""


def sweep_meta(sweep_id: str, name: str, experiment_id: str, parent_run_id: str, tracking_uri: str,
               provenance: Mapping[str, str], quota: int | str | None) -> dict[str, Any]:
    """The report's header (leaderboard.json's top-level keys; ``build_report`` fills in the ``champion*`` keys).
    ``provenance``: the parent run's tags (spec hash, data version, git commit)."""
    early_stop = _settings(provenance.get(TAG_EARLY_STOP))
    return {
        "sweep_id": sweep_id, "name": name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "tracking_uri": redact_uri(tracking_uri), "spec_hash": provenance.get(TAG_SPEC_HASH),
        "data_version": provenance.get(TAG_DATA_VERSION), "git_commit": provenance.get(TAG_GIT_COMMIT),
        "quota": int(quota) if quota is not None else None,
        "settings": _settings(provenance.get(TAG_SETTINGS)),
        "interrupted": provenance.get(TAG_INTERRUPTED),  # the signal that stopped the sweep, if one did
        "early_stop": describe_early_stop(early_stop),
        "early_stop_max_steps": early_stop.get("max_steps"),
        "gpus_per_trial": int_tag(provenance.get(TAG_GPUS_PER_TRIAL)),
        "metric": _metric(provenance.get(TAG_METRIC)), "tie_break": provenance.get(TAG_TIE_BREAK),
        "champion": None, "champion_moved": False, "champion_note": None,
    }


def describe_early_stop(rule: Mapping[str, Any]) -> str | None:
    """The rule in words for the header, e.g. ``asha (val_f1, min_steps 3, reduction_factor 3, max_steps 20)``."""
    if not rule.get("rule") or rule["rule"] == "none":
        return None
    keys = ("min_steps", "reduction_factor", "max_steps") if rule["rule"] == "asha" else ("min_steps",)
    return f"{rule['rule']} ({rule.get('metric')}, " + ", ".join(f"{k} {rule.get(k)}" for k in keys) + ")"


def gpu_hours(rows: Sequence[TrialRow], gpus_per_trial: int | None, max_steps: int | None
              ) -> tuple[float | None, float | None]:
    """(used, saved): the GPU-hours of the trials this sweep ran (their measured durations), and an
    estimate of what early stopping saved: each STOPPED trial's time per step times the steps it did
    not train of ``max_steps``. None where it cannot be told (no GPUs per trial known; no stopped trial
    or no ``max_steps``)."""
    if gpus_per_trial is None:
        return None, None
    ran = [r for r in rows if r.state is not TrialState.REUSED and r.duration_s]
    used = sum(r.duration_s for r in ran) * gpus_per_trial / 3600  # type: ignore[misc]
    stopped = [r for r in ran if r.state is TrialState.STOPPED and r.stopped_at_step]
    if not stopped or not max_steps:
        return used, None
    saved = sum(r.duration_s / r.stopped_at_step * max(0, max_steps - r.stopped_at_step)  # type: ignore[operator]
                for r in stopped) * gpus_per_trial / 3600
    return used, saved


def gpu_hour_metrics(header: Mapping[str, Any]) -> dict[str, float]:
    """The parent run's metrics ``gpu_hours_used`` and ``gpu_hours_saved`` (those the header has)."""
    return {k: header[k] for k in ("gpu_hours_used", "gpu_hours_saved") if header.get(k) is not None}


def _settings(tag: str | None) -> dict[str, Any]:
    """The spec's settings the sweep ran with ({} for sweeps from before the tag, or a damaged tag)."""
    try:
        value = json.loads(tag) if tag else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _metric(tag: str | None) -> dict[str, Any]:
    """The spec's metric block the sweep ran with (the defaults for sweeps from before the tag)."""
    from hpsweep.inputs import MetricSpec

    given = _settings(tag)  # the same JSON-object reading
    try:
        return MetricSpec.model_validate(given).model_dump(mode="json")
    except ValueError:
        return MetricSpec().model_dump(mode="json")


def reused_rows(trials: Sequence[PlannedTrial], reused: Mapping[str, TrialRow]) -> list[TrialRow]:
    """Reused trials keep the original run's id, F1 and attempts, and take this sweep's index and hparams."""
    return [replace(reused[t.key], state=TrialState.REUSED, index=t.index, hparams=t.hparams)
            for t in trials if t.key in reused]


def never_started(trials: Sequence[PlannedTrial], rows: Sequence[TrialRow],
                  stopped_by: str | None = None, never_started_reason: str = NEVER_STARTED_REASON) -> list[TrialRow]:
    """A row for each combination with no row yet (no run in MLflow), so every combination is reported:
    INTERRUPTED when a signal (``stopped_by``) stopped the sweep before it, else NEVER_STARTED."""
    seen = {r.index for r in rows}
    state, reason = ((TrialState.INTERRUPTED, interrupted_reason(stopped_by)) if stopped_by
                     else (TrialState.NEVER_STARTED, never_started_reason))
    return [TrialRow(index=t.index, hparams=t.hparams, state=state, run_name=run_name(t.hparams),
                     key=t.key, reason=reason, attempt=0)
            for t in trials if t.index not in seen]


def build_report(store: SweepStore, meta: dict[str, Any], trials: Sequence[PlannedTrial],
                 reused: Mapping[str, TrialRow], report_dir: Path, register: bool,
                 publish: Publish | None = None) -> Report:
    """Read a sweep's trials back from the store, rank them, settle the champion, write the report.

    ``reused``: trial key → the earlier FINISHED trial standing in for it. ``register``: apply the
    champion rule (``decide_champion``) and move ``@champion`` when it says so (the sweep's end);
    False (``--no-register``): no registry call at all. ``publish(name, text)``: where
    ``leaderboard.json`` goes before any local file is written (the sweep's parent run in MLflow),
    so a report folder that cannot be written, or a plot that fails, never loses it. Returns the
    ranked rows, the header written and every file written locally (best-effort: see ``write_report``).
    """
    return _report(store, meta, trials, reused, report_dir,
                   (lambda best: crown(store, meta, best)) if register else (lambda best: dict(REGISTRY_SKIPPED)),
                   publish)


def rebuild_report(store: SweepStore, record: SweepRecord, report_dir: Path) -> Report:
    """`hpsweep report`: a past (or running) sweep's report written again from its plan.json and runs;
    an older sweep without a plan is reported from its runs alone. Registers nothing. Writing the files
    is this command's whole job: a ``leaderboard.json`` that cannot be written raises ``ReportNotWritten``
    (a plot or the markdown left out is a warning, as at a sweep's end)."""
    plan = store.load_plan(record.parent_run_id) or []
    trials = [PlannedTrial(p.index, p.hparams, p.key or "") for p in plan]
    reused_ids = {p.key: p.reused_run_id for p in plan if p.key and p.reused_run_id}
    found = store.trials_by_run_id(record.experiment_id, list(reused_ids.values()))
    reused = {key: found[run_id] for key, run_id in reused_ids.items() if run_id in found}
    meta = sweep_meta(record.sweep_id, record.name, record.experiment_id, record.parent_run_id,
                      store.tracking_uri, record.tags, record.tags.get(TAG_QUOTA))
    report = _report(store, meta, trials, reused, report_dir, lambda best: recall(store, meta, best))
    if LEADERBOARD_JSON not in report[2]:
        raise ReportNotWritten(f"{report_dir / LEADERBOARD_JSON} could not be written (the warning above says why)")
    return report


def _report(store: SweepStore, meta: dict[str, Any], trials: Sequence[PlannedTrial],
            reused: Mapping[str, TrialRow], report_dir: Path,
            settle: Callable[[TrialRow | None], dict[str, Any]], publish: Publish | None = None) -> Report:
    rows = store.sweep_trials(meta["experiment_id"], meta["sweep_id"]) + reused_rows(trials, reused)
    ranked = rank_rows(rows + never_started(trials, rows, meta.get("interrupted"),
                                            meta.get("never_started_reason") or NEVER_STARTED_REASON))
    ranked, significance = _significance(store, ranked, meta.get("metric") or _metric(None))
    champion, rule = pick_champion(ranked, meta.get("tie_break"))  # only ever a FINISHED (or reused) trial
    used, saved = gpu_hours(ranked, meta.get("gpus_per_trial"), meta.get("early_stop_max_steps"))
    header = {**meta, "significance": significance, "champion_rule": rule, "gpu_hours_used": used,
              "gpu_hours_saved": saved, **settle(champion)}
    if publish is not None:
        publish(LEADERBOARD_JSON, leaderboard_json(header, ranked))
    paths = write_report(report_dir, header, ranked, curves=_curves(store, ranked))
    return ranked, header, paths


def _significance(store: SweepStore, ranked: list[TrialRow],
                  metric: Mapping[str, Any]) -> tuple[list[TrialRow], dict[str, Any] | None]:
    """The ranked rows with their F1 intervals, and the header's ``significance`` block (None when no
    trial logged predictions), from the trials' stored predictions."""
    with_f1 = [r for r in ranked if r.has_f1 and r.run_id]
    predictions: dict[str, Any] = {}
    if with_f1:
        with ThreadPoolExecutor(max_workers=8) as pool:  # one artifact download per trial
            for run_id, found in zip([r.run_id for r in with_f1],
                                     pool.map(lambda r: _predictions(store, r.run_id), with_f1)):
                if found is not None:
                    predictions[run_id] = found
    result = stats.assess(ranked, predictions, metric["average"], metric["pos_label"], metric["resamples"],
                          metric["seed"])
    if result.problem:
        log.warning("report: no F1 intervals: %s", short_text(result.problem))
    return result.rows, result.header


def _predictions(store: SweepStore, run_id: str) -> Any:
    try:
        return store.load_predictions(run_id)
    except Exception as e:  # noqa: BLE001 - an interval is not worth the report
        log.warning("report: the predictions of run %s could not be read (%s): no interval for it", run_id,
                    short_text(f"{type(e).__name__}: {e}"))
        return None


def pick_champion(ranked: Sequence[TrialRow], tie_break: str | None) -> tuple[TrialRow | None, str]:
    """The row the champion rule considers, and which rule picked it, in words: the highest F1, or with
    ``tie_break`` (``"hidden:asc,lr:desc"``) the first by those hparams among the trials statistically
    tied with the best (the best alone when none is tied, or nothing could be compared)."""
    from hpsweep.config import parse_tie_break

    best = next((r for r in ranked if r.has_f1), None)
    if best is None or not tie_break:
        return best, "highest F1"
    tied = [r for r in ranked if r.has_f1 and r.significance is not None and r.significance.tied_with_best]
    if len(tied) < 2:
        return best, f"highest F1 (tie-break {tie_break} unused: no trial is statistically tied with the best)"
    keys = parse_tie_break(tie_break)
    pick = min(tied, key=lambda r: (*(_order(r.hparams.get(k), desc) for k, desc in keys), r.rank or 0))
    return pick, (f"tie-break {tie_break} among the {len(tied)} trials statistically tied with the best "
                  f"(ranks {', '.join(str(r.rank) for r in tied)}): rank {pick.rank}")


def _order(value: Any, descending: bool) -> tuple[int, Any]:
    """A sort key for one hparam value: numbers by value (negated for desc), else text; missing last."""
    if value is None:
        return (2, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, -value if descending else value)
    text = str(value)
    return (1, (*(-ord(c) for c in text), 1) if descending else text)  # 1: a prefix sorts after


def _curves(store: SweepStore, ranked: Sequence[TrialRow]) -> dict[str, list[tuple[int, float]]] | None:
    """The top trials' learning curves; None (the report goes without them) when the store cannot say."""
    try:
        return learning_curves(store, ranked)
    except Exception as e:  # noqa: BLE001 - a plot is not worth the report
        log.warning("report: skipped learning_curves.png: reading the metric histories failed: %s",
                    short_text(" ".join(f"{type(e).__name__}: {e}".split())))
        return None


# ---------------------------------------------------------------- the champion


@dataclass(frozen=True)
class ChampionCall:
    """What the champion rule says about a sweep's best."""

    move: bool  # point @champion at this sweep's best run
    note: str  # why, in one line: the terminal, the report header and best.json show it


REGISTRY_SKIPPED = {"champion": None, "champion_moved": False, "champion_note": "registry skipped (--no-register)"}
SAVE_HINT = ("a trainer saves a loadable one with ctx.save_model(model), or mlflow.<flavor>.save_model into "
             "HPSWEEP_MODEL_DIR")


def validation_version(data_version: str | None) -> str | None:
    """The validation half of ``hpsweep.data_version`` (``"<train md5>/<val md5>"``); None when unknown."""
    if not data_version or "/" not in data_version:
        return None
    return data_version.rsplit("/", 1)[1] or None


def decide_champion(current: RegisteredVersion | None, best: TrialRow | None, data_version: str | None,
                    loadable: bool) -> ChampionCall:
    """The champion rule: ``@champion`` moves only to a better model that MLflow can load.

    ``current``: the version ``@champion`` points at (None: there is none); ``best``: this sweep's
    best row (None: no trial has an F1); ``data_version``: this sweep's ``hpsweep.data_version``;
    ``loadable``: ``best``'s ``model`` artifact is an MLflow model. F1s are compared only on the same
    validation data (training data may differ: the F1 means the same); a champion measured on other
    or unknown validation data is replaced. Ties keep the champion.
    """
    unchanged = _unchanged(current)
    if best is None or best.f1 is None:
        return ChampionCall(False, f"{unchanged}: no trial has an F1")
    if current is not None and current.run_id == best.run_id:
        return ChampionCall(False, f"{unchanged}: this sweep's best (run {best.run_id}) is the champion already")
    ours, theirs = validation_version(data_version), validation_version(current.data_version if current else None)
    if current is None:
        why = f"champion registered: the first one (F1 {best.f1:.4f})"
    elif theirs is None or ours is None or theirs != ours:
        measured = "on unknown validation data" if theirs is None or ours is None else \
            f"on other validation data (val md5 {theirs[:12]}, this sweep's {ours[:12]})"
        why = (f"champion replaced: version {current.version} ({_held(current)}) was measured {measured}, "
               f"so its F1 is not comparable")
    elif current.f1 is None:
        why = f"champion replaced: version {current.version} has no recorded F1"
    elif best.f1 > current.f1:
        why = f"champion moved: F1 {best.f1:.4f} beats {current.f1:.4f} (version {current.version} from sweep " \
              f"{current.sweep_id or 'unknown'})"
    else:
        return ChampionCall(False, f"{unchanged}: this sweep's best F1 {best.f1:.4f} does not beat it")
    if not loadable:
        return ChampionCall(False, f"{unchanged}: this sweep's best (run {best.run_id}) is not registered: its "
                                   f"`model` artifact is not an MLflow model (no {MLMODEL_FILE}); {SAVE_HINT}")
    return ChampionCall(True, why)


def crown(store: SweepStore, meta: Mapping[str, Any], best: TrialRow | None) -> dict[str, Any]:
    """Apply the champion rule to ``best`` and move ``@champion`` when it says so (reusing the run's
    model version when it has one). Returns the header's champion keys."""
    name = meta["name"]
    current = store.champion(name)
    loadable = best is not None and store.has_model(best.run_id)
    call = decide_champion(current, best, meta.get("data_version"), loadable)
    if call.move:
        version = store.register_champion(name, best.run_id, meta["sweep_id"], call.note)
        return _champion_keys(name, version, best.run_id, True, call.note)
    return _champion_keys(name, current.version if current else None, current.run_id if current else None,
                          False, call.note)


def recall(store: SweepStore, meta: Mapping[str, Any], best: TrialRow | None) -> dict[str, Any]:
    """The header's champion keys of a past sweep, from the registry as it is now (nothing moves):
    whether the sweep moved ``@champion`` is kept on the model version it moved it to."""
    name = meta["name"]
    current = store.champion(name)
    at = (current.version, current.run_id) if current else (None, None)
    mine = store.version_of(name, best.run_id) if best is not None and best.run_id else None
    if mine is not None and meta["sweep_id"] in mine.moved_by:
        note = mine.moved_by[meta["sweep_id"]]
        if current is not None and current.version != mine.version:
            note += f"; the champion is now version {current.version} ({_held(current)})"
        return _champion_keys(name, *at, True, note)
    loadable = best is not None and store.has_model(best.run_id)
    call = decide_champion(current, best, meta.get("data_version"), loadable)
    note = call.note if not call.move else f"{_unchanged(current)}: this sweep did not register its best (run " \
                                           f"{best.run_id})"
    return _champion_keys(name, *at, False, note)


def _champion_keys(name: str, version: str | None, run_id: str | None, moved: bool, note: str) -> dict[str, Any]:
    return {"champion": champion_uri(name, version, run_id) if version is not None else None,
            "champion_moved": moved, "champion_note": note}


def _unchanged(current: RegisteredVersion | None) -> str:
    return f"champion unchanged ({_held(current)})" if current is not None else "no champion"


def _held(v: RegisteredVersion) -> str:
    return f"F1 {'unknown' if v.f1 is None else f'{v.f1:.4f}'} from sweep {v.sweep_id or 'unknown'}"


def sweep_summary(header: dict[str, Any], rows: Sequence[TrialRow], report_dir: Path,
                  paths: Mapping[str, Path]) -> dict[str, Any]:
    """What `hpsweep run` and `hpsweep report` print (and the sweep flow returns): the header, the
    counts, the top three leaderboard rows that have an F1 (a failed trial is never "top"), each failure reason once with how many trials it ended
    (most frequent first), and where the files are."""
    reasons = Counter(r.reason or f"run ended {r.state.value}" for r in rows  # a stopped trial did not fail
                      if not r.has_f1 and r.state is not TrialState.STOPPED)
    return {**header, "counts": counts(rows), "report_dir": str(report_dir),
            "tie_note": stats.tie_sentence(header.get("significance")),
            "top": [r.leaderboard() for r in rows if r.has_f1][:3],
            "failure_reasons": [{"reason": reason, "trials": n} for reason, n in reasons.most_common()],
            "report_files": {name: str(path) for name, path in paths.items()}}


def show_as_latest(summary: dict[str, Any], report_dir: Path) -> None:
    """Point ``reports/<name>/latest`` at ``report_dir`` (best-effort: ``folders.move_latest``) and
    put it in the summary's ``latest`` (None: it could not be moved), which `run` and `report` print."""
    latest = folders.move_latest(report_dir)
    summary["latest"] = str(latest) if latest else None
