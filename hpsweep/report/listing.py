"""`hpsweep list`: past sweep executions, newest first, read from MLflow (each parent run's tags
and the counts it logged when it closed; the registry for which one holds @champion)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from hpsweep.store.tags import TAG_INTERRUPTED, TAG_SWEEP_ID

if TYPE_CHECKING:
    from mlflow.entities import Run

    from hpsweep.store import SweepStore

COUNTS = ("total", "finished", "failed", "reused")


def list_sweeps(store: SweepStore, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` sweeps (of experiment ``name``, else of every experiment with sweeps)."""
    names = store.experiment_names()
    ids = [i for i, n in names.items() if name is None or n == name]
    if not ids:
        return []
    runs = store.parent_runs(ids, limit)
    champions = {names[i]: store.champion(names[i]) for i in {r.info.experiment_id for r in runs}}
    return [_row(run, names[run.info.experiment_id], champions[names[run.info.experiment_id]]) for run in runs]


def _row(run: Run, name: str, champion: Any) -> dict[str, Any]:
    sweep_id = run.data.tags.get(TAG_SWEEP_ID, "")
    metrics = run.data.metrics
    holds = champion is not None and (champion.sweep_id == sweep_id or sweep_id in champion.moved_by)
    return {
        "sweep_id": sweep_id, "name": name, "parent_run_id": run.info.run_id,
        "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds"),
        "state": "interrupted" if run.data.tags.get(TAG_INTERRUPTED) else run.info.status.lower(),
        **{k: int(metrics[f"trials_{k}"]) if f"trials_{k}" in metrics else None for k in COUNTS},
        "best_f1": metrics.get("best_f1"),
        "champion": f"version {champion.version}" if holds else None,
    }


def render_list(rows: list[dict[str, Any]]) -> str:
    """One line per sweep: what a terminal shows (``--json`` gives the rows)."""
    if not rows:
        return "no sweeps yet"
    lines = [f"{'sweep':<44} {'started (UTC)':<25} {'state':<12} {'trials':>6} {'done':>5} {'failed':>6} "
             f"{'reused':>6} {'best F1':>8}  champion"]
    for r in rows:
        f1 = "—" if r["best_f1"] is None else f"{r['best_f1']:.4f}"
        counts = [("—" if r[k] is None else str(r[k])) for k in COUNTS]
        lines.append(f"{r['sweep_id']:<44} {r['started']:<25} {r['state']:<12} {counts[0]:>6} {counts[1]:>5} "
                     f"{counts[2]:>6} {counts[3]:>6} {f1:>8}  {r['champion'] or ''}")
    return "\n".join(lines)
