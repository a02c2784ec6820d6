"""The leaderboard: rank a sweep's trial rows and render them (md, csv, json, best.json, plots).

Pure functions over ``hpsweep.model.TrialRow`` except ``write_report`` (writes files) and
``learning_curves`` (reads metric histories through the store it is given); the figures are drawn
in ``hpsweep.report.plots``. ``leaderboard.json`` is a public contract (see the README): each row
is ``TrialRow.leaderboard()``, sorted by F1 descending, rows without an F1 last with
``"f1": null`` and a ``"reason"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from hpsweep.model import TrialRow
from hpsweep.report import plots

F1_BY_COMBINATION = "f1_by_combination.png"
F1_BY_HPARAM = "f1_by_hparam.png"
LEARNING_CURVES = "learning_curves.png"
PLOT_FILES = (F1_BY_COMBINATION, F1_BY_HPARAM, LEARNING_CURVES)
CURVE_METRIC = "val_f1"

Curves = dict[str, list[tuple[int, float]]]


class MetricHistories(Protocol):
    """What ``learning_curves`` reads from: ``hpsweep.store.SweepStore`` (or an in-memory stand-in)."""

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]: ...


def rank_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The rows with ``rank`` set: those with an F1 (finished or reused) best first, ties in file
    order; then every row without an F1 (failed, killed, running, never started) in file order."""
    scored = sorted((r for r in rows if r.has_f1), key=lambda r: (-r.f1, r.index))  # type: ignore[operator]
    unscored = sorted((r for r in rows if not r.has_f1), key=lambda r: r.index)
    return [replace(r, rank=rank) for rank, r in enumerate(scored + unscored, start=1)]


def report_status(row: TrialRow) -> str:
    """The row's status in the report: FINISHED or REUSED with an F1, INTERRUPTED, else FAILED."""
    return row.report_status


def counts(rows: Sequence[TrialRow]) -> dict[str, int]:
    out = {"total": len(rows), "finished": 0, "failed": 0, "reused": 0}
    for r in rows:
        out[{"FINISHED": "finished", "REUSED": "reused"}.get(report_status(r), "failed")] += 1
    return out


def leaderboard_json(sweep: dict[str, Any], rows: Sequence[TrialRow]) -> str:
    return json.dumps({**sweep, "counts": counts(rows), "rows": [r.leaderboard() for r in rows]}, indent=2,
                      default=str)


def leaderboard_frame(rows: Sequence[TrialRow]) -> pd.DataFrame:
    keys = _hparam_keys(rows)
    board = [r.leaderboard() for r in rows]
    records = [
        {"rank": r["rank"], **{k: r["hparams"].get(k) for k in keys}, "f1": r["f1"], "status": r["status"],
         "reason": r.get("reason", ""), "attempts": r["attempts"], "duration_s": r["duration_s"],
         "run_id": r["run_id"]}
        for r in board
    ]
    return pd.DataFrame.from_records(records, columns=["rank", *keys, "f1", "status", "reason", "attempts",
                                                        "duration_s", "run_id"])


def render_markdown(sweep: dict[str, Any], rows: Sequence[TrialRow], plot_name: str | None = None, *,
                    images: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> str:
    """The leaderboard as markdown: sweep header, plots (``plot_name`` and ``images``: (caption,
    relative link) pairs, shown before the table so a long table never hides them), then every trial."""
    c = counts(rows)
    lines = [f"# Sweep `{sweep['name']}` — {sweep['sweep_id']}", ""]
    for label, key in (("MLflow experiment", "experiment_id"), ("parent run", "parent_run_id"),
                       ("tracking URI", "tracking_uri"), ("spec hash", "spec_hash"),
                       ("data version (train / val)", "data_version"), ("git commit", "git_commit"),
                       ("quota", "quota")):
        if sweep.get(key) is not None:
            lines.append(f"- {label}: `{sweep[key]}`")
    if sweep.get("settings"):
        lines.append("- settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(sweep["settings"].items())))
    lines += _champion_lines(sweep)
    lines.append(f"- trials: {c['total']} ({c['finished']} finished, {c['reused']} reused, {c['failed']} failed)")
    figures = ([("F1 per combination", plot_name)] if plot_name else []) + list(images)
    if figures or notes:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}]({link})\n" for caption, link in figures]
        lines += [f"{note}\n" for note in notes]
        lines += ["## Trials"]
    keys = _hparam_keys(rows)
    lines += ["", "| rank | " + " | ".join(keys) + " | F1 | status | attempts | run |",
              "|---:|" + "---|" * len(keys) + "---:|---|---:|---|"]
    for r in (row.leaderboard() for row in rows):
        hp = " | ".join(str(r["hparams"].get(k, "")) for k in keys)
        f1 = f"{r['f1']:.4f}" if r["f1"] is not None else "—"
        status = r["status"] + (f": {_one_line(r['reason'])}" if r.get("reason") else "")
        lines.append(f"| {r['rank']} | {hp} | {f1} | {status} | {r['attempts']} | `{r['run_id'][:8]}` |")
    return "\n".join(lines) + "\n"


def _champion_lines(sweep: dict[str, Any]) -> list[str]:
    """The registered champion, whether this sweep moved it, and why (or why not)."""
    if sweep.get("champion") is None and "champion_moved" not in sweep:
        return []
    name = f"`{sweep['champion']}`" if sweep.get("champion") is not None else "none"
    moved = "moved by this sweep" if sweep.get("champion_moved") else "not moved by this sweep"
    lines = [f"- champion: {name} ({moved})"]
    if sweep.get("champion_note"):
        lines.append(f"- champion decision: {sweep['champion_note']}")
    return lines


def _hparam_keys(rows: Sequence[TrialRow]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.hparams))


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_f1(rows: Sequence[TrialRow], path: Path) -> None:
    """Horizontal bars of the best ``plots.BAR_MAX`` trials; failed trials are listed in the report, not plotted."""
    plots.save(plots.f1_by_combination_figure(rows), path)


def plot_f1_by_hparam(rows: Sequence[TrialRow], path: Path) -> None:
    """One panel per hparam key: F1 against that hparam's values."""
    plots.save(plots.f1_by_hparam_figure(rows), path)


def plot_learning_curves(rows: Sequence[TrialRow], curves: Curves, path: Path, metric: str = CURVE_METRIC) -> None:
    """One line per run in ``curves``, labelled with its rank and F1."""
    plots.save(plots.learning_curves_figure(rows, curves, metric), path)


def learning_curves(store: MetricHistories, rows: Sequence[TrialRow], top: int = 5,
                    metric: str = CURVE_METRIC) -> Curves:
    """run_id → [(step, value)] of ``metric`` for the ``top`` best rows with an F1, in rank order.

    The histories come from ``store.metric_history`` (steps ascending, a step logged twice keeps
    its latest value, a run that no longer exists has none); other tracking errors propagate, and
    the caller decides whether a report without curves will do.
    """
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    return {r.run_id: store.metric_history(r.run_id, metric) for r in [r for r in rows if r.has_f1][:top]}


def write_report(report_dir: Path, sweep: dict[str, Any], rows: Sequence[TrialRow],
                 curves: Curves | None = None, curve_metric: str = CURVE_METRIC) -> dict[str, Path]:
    """Write the leaderboard (md, csv, json), best.json and the plots, each file atomically; return every file written.

    Always: ``leaderboard.{md,csv,json}``, ``best.json`` and ``f1_by_combination.png``;
    ``f1_by_hparam.png`` when the trials have hparams; ``learning_curves.png`` when ``curves``
    (from ``learning_curves``) hold at least one point. A plot not drawn this time is removed from
    ``report_dir`` so the folder never shows a stale one. The markdown links every plot by its relative name.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    plot_f1(rows, report_dir / F1_BY_COMBINATION)
    figures[F1_BY_COMBINATION] = report_dir / F1_BY_COMBINATION
    if _hparam_keys(rows):
        plot_f1_by_hparam(rows, report_dir / F1_BY_HPARAM)
        figures[F1_BY_HPARAM] = report_dir / F1_BY_HPARAM
    notes = []
    if curves and any(curves.values()):
        plot_learning_curves(rows, curves, report_dir / LEARNING_CURVES, curve_metric)
        figures[LEARNING_CURVES] = report_dir / LEARNING_CURVES
    elif curves is not None:
        notes.append(f"No learning curves: the top trials logged no per-step `{curve_metric}`.")
    for name in PLOT_FILES:
        if name not in figures:
            (report_dir / name).unlink(missing_ok=True)
    captions = {F1_BY_COMBINATION: "F1 per combination", F1_BY_HPARAM: "F1 against each hparam",
                LEARNING_CURVES: f"Learning curves ({curve_metric}) of the top trials"}
    images = [(captions[name], name) for name in figures]
    paths = {name: report_dir / name
             for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "best.json")}
    _write_text(paths["leaderboard.md"], render_markdown(sweep, rows, images=images, notes=notes))
    _write_text(paths["leaderboard.csv"], leaderboard_frame(rows).to_csv(index=False))
    _write_text(paths["leaderboard.json"], leaderboard_json(sweep, rows))
    _write_text(paths["best.json"], json.dumps(best_summary(sweep, rows), indent=2) + "\n")
    return {**paths, **figures}


def best_summary(sweep: dict[str, Any], rows: Sequence[TrialRow]) -> dict[str, Any]:
    """The small metrics file `dvc metrics show` / `dvc metrics diff` read: the winner, the counts and
    the registered champion (whether this sweep moved it, and why)."""
    best = next((r for r in rows if r.has_f1), None)
    return {"best_f1": best.f1 if best else None, "best_hparams": best.hparams if best else None,
            "best_run_id": best.run_id if best else None, "sweep_id": sweep.get("sweep_id"),
            **{f"trials_{k}": v for k, v in counts(rows).items()},
            **{k: sweep.get(k) for k in ("champion", "champion_moved", "champion_note") if k in sweep}}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
