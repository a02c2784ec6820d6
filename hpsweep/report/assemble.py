"""A sweep's report, assembled from the store: shared by the sweep's end (which also registers the
champion) and `hpsweep report` (which writes the same files again and changes nothing in MLflow).

MLflow is the source of truth: the rows are read back from the trial runs, plus the reused runs
and a row for every combination that never got a run, so every combination appears once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsweep.model import PlannedTrial, TrialRow, TrialState, run_name
from hpsweep.report.leaderboard import counts, learning_curves, rank_rows, write_report
from hpsweep.store.registry import champion_uri
from hpsweep.store.tags import TAG_DATA_VERSION, TAG_GIT_COMMIT, TAG_QUOTA, TAG_SPEC_HASH
from hpsweep.store.uri import redact_uri

if TYPE_CHECKING:
    from hpsweep.report.status import SweepRecord
    from hpsweep.store import SweepStore

NEVER_STARTED_REASON = "never started (see the sweep's log)"
Report = tuple[list[TrialRow], dict[str, Any], dict[str, Path]]  # ranked rows, header written, files written


def sweep_meta(sweep_id: str, name: str, experiment_id: str, parent_run_id: str, tracking_uri: str,
               provenance: Mapping[str, str], quota: int | str | None) -> dict[str, Any]:
    """The report's header (leaderboard.json's top-level keys; ``champion`` is filled in by ``build_report``).
    ``provenance``: the parent run's tags (spec hash, data version, git commit)."""
    return {
        "sweep_id": sweep_id, "name": name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "tracking_uri": redact_uri(tracking_uri), "spec_hash": provenance.get(TAG_SPEC_HASH),
        "data_version": provenance.get(TAG_DATA_VERSION), "git_commit": provenance.get(TAG_GIT_COMMIT),
        "quota": int(quota) if quota is not None else None, "champion": None,
    }


def reused_rows(trials: Sequence[PlannedTrial], reused: Mapping[str, TrialRow]) -> list[TrialRow]:
    """Reused trials keep the original run's id, F1 and attempts, and take this sweep's index and hparams."""
    return [replace(reused[t.key], state=TrialState.REUSED, index=t.index, hparams=t.hparams)
            for t in trials if t.key in reused]


def never_started(trials: Sequence[PlannedTrial], rows: Sequence[TrialRow]) -> list[TrialRow]:
    """A row for each combination with no row yet (no run in MLflow), so every combination is reported."""
    seen = {r.index for r in rows}
    return [TrialRow(index=t.index, hparams=t.hparams, state=TrialState.NEVER_STARTED, run_name=run_name(t.hparams),
                     key=t.key, reason=NEVER_STARTED_REASON, attempt=0)
            for t in trials if t.index not in seen]


def build_report(store: SweepStore, meta: dict[str, Any], trials: Sequence[PlannedTrial],
                 reused: Mapping[str, TrialRow], report_dir: Path, register: bool) -> Report:
    """Read a sweep's trials back from the store, rank them, name (or register) the champion, write the report.

    ``reused``: trial key → the earlier FINISHED trial standing in for it. ``register``: point the
    model's ``champion`` alias at the best trial (the sweep's end does); else only name the current
    champion when it is this sweep's best. Returns the ranked rows, the header written and every file written.
    """
    rows = store.sweep_trials(meta["experiment_id"], meta["sweep_id"]) + reused_rows(trials, reused)
    ranked = rank_rows(rows + never_started(trials, rows))
    best = next((r for r in ranked if r.has_f1), None)
    header = {**meta, "champion": champion(store, meta["name"], best, register)}
    paths = write_report(report_dir, header, ranked, curves=learning_curves(store, ranked))
    return ranked, header, paths


def rebuild_report(store: SweepStore, record: SweepRecord, report_dir: Path) -> Report:
    """`hpsweep report`: a past (or running) sweep's report written again from its plan.json and runs;
    an older sweep without a plan is reported from its runs alone. Registers nothing."""
    plan = store.load_plan(record.parent_run_id) or []
    trials = [PlannedTrial(p.index, p.hparams, p.key or "") for p in plan]
    reused_ids = {p.key: p.reused_run_id for p in plan if p.key and p.reused_run_id}
    found = store.trials_by_run_id(record.experiment_id, list(reused_ids.values()))
    reused = {key: found[run_id] for key, run_id in reused_ids.items() if run_id in found}
    meta = sweep_meta(record.sweep_id, record.name, record.experiment_id, record.parent_run_id,
                      store.tracking_uri, record.tags, record.tags.get(TAG_QUOTA))
    return build_report(store, meta, trials, reused, report_dir, register=False)


def champion(store: SweepStore, model_name: str, best: TrialRow | None, register: bool) -> str | None:
    """The champion line of the report, when it is ``best``'s model. ``register``: make it so first
    (a new model version, only when the run logged a ``model`` artifact)."""
    if best is None:
        return None
    if register:
        if not store.has_model(best.run_id):
            return None
        version = store.register_champion(model_name, best.run_id)
    else:
        current = store.champion(model_name)
        if current is None or current[1] != best.run_id:
            return None
        version = current[0]
    return champion_uri(model_name, version, best.run_id)


def sweep_summary(header: dict[str, Any], rows: Sequence[TrialRow], report_dir: Path,
                  paths: Mapping[str, Path]) -> dict[str, Any]:
    """What `hpsweep run` and `hpsweep report` print (and the sweep flow returns): the header, the
    counts, the top three leaderboard rows and where the files are."""
    return {**header, "counts": counts(rows), "report_dir": str(report_dir),
            "top": [r.leaderboard() for r in rows[:3]],
            "report_files": {name: str(path) for name, path in paths.items()}}
