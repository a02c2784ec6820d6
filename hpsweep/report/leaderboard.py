"""The leaderboard: rank a sweep's trial rows and render them (md, csv, json, best.json, plots).

Pure functions over ``hpsweep.model.TrialRow`` except ``write_report`` (writes files) and
``learning_curves`` (reads metric histories through the store it is given); the figures are drawn
in ``hpsweep.report.plots``. ``leaderboard.json`` is a public contract (see the README): each row
is ``TrialRow.leaderboard()``, sorted by F1 descending, rows without an F1 last with
``"f1": null`` and a ``"reason"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from hpsweep.model import TrialRow, TrialState
from hpsweep.report import plots
from hpsweep.report.cells import csv_cell, md, short_text

F1_BY_COMBINATION = "f1_by_combination.png"
F1_BY_HPARAM = "f1_by_hparam.png"
LEARNING_CURVES = "learning_curves.png"
PLOT_FILES = (F1_BY_COMBINATION, F1_BY_HPARAM, LEARNING_CURVES)
LEADERBOARD_JSON, LEADERBOARD_CSV, LEADERBOARD_MD, BEST_JSON = ("leaderboard.json", "leaderboard.csv",
                                                               "leaderboard.md", "best.json")
CURVE_METRIC = "val_f1"
SIGNIFICANCE_KEYS = ("f1_ci_low", "f1_ci_high", "p_beats_best", "tied_with_best")  # null without predictions
TIED, MISMATCH = "≈", "⚠"  # marks in the F1 cell: tied with the best; F1 disagrees with the predictions
REASON_CHARS = 400  # a failure reason keeps more than a value: its end often names the cause

Curves = dict[str, list[tuple[int, float]]]

log = logging.getLogger("hpsweep")


class MetricHistories(Protocol):
    """What ``learning_curves`` reads from: ``hpsweep.store.SweepStore`` (or an in-memory stand-in)."""

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]: ...


def interval_text(low: float, high: float) -> str:
    """An F1's 95% interval as every view writes it (the report, the CLI's summary, Prefect's table)."""
    return f"[{low:.4f}, {high:.4f}]"


def rank_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The rows with ``rank`` set: those with an F1 (finished or reused) best first, ties in file
    order; then the trials early stopping STOPPED, by their best value so far (not comparable with a
    finished trial's F1, so below every one); then every other row (failed, killed, running, never
    started) in file order."""
    scored = sorted((r for r in rows if r.has_f1), key=lambda r: (-r.f1, r.index))  # type: ignore[operator]
    stopped = sorted((r for r in rows if r.state is TrialState.STOPPED),
                     key=lambda r: (r.f1 is None, -(r.f1 or 0.0), r.index))
    unscored = sorted((r for r in rows if not r.has_f1 and r.state is not TrialState.STOPPED), key=lambda r: r.index)
    return [replace(r, rank=rank) for rank, r in enumerate(scored + stopped + unscored, start=1)]


def report_status(row: TrialRow) -> str:
    """The row's status in the report: FINISHED or REUSED with an F1, INTERRUPTED, else FAILED."""
    return row.report_status


def counts(rows: Sequence[TrialRow]) -> dict[str, int]:
    """total, finished, failed, reused; and stopped when early stopping stopped any (not a failure)."""
    out = {"total": len(rows), "finished": 0, "failed": 0, "reused": 0}
    for r in rows:
        key = {"FINISHED": "finished", "REUSED": "reused", "STOPPED": "stopped"}.get(report_status(r), "failed")
        out[key] = out.get(key, 0) + 1
    return out


def leaderboard_json(sweep: dict[str, Any], rows: Sequence[TrialRow]) -> str:
    return json.dumps({**sweep, "counts": counts(rows), "rows": [r.leaderboard() for r in rows]}, indent=2,
                      default=str)


def leaderboard_frame(rows: Sequence[TrialRow]) -> pd.DataFrame:
    """The leaderboard as leaderboard.csv holds it: one column per hparam key, every text cell
    shortened and neutralised for spreadsheets (``cells.csv_cell``); numbers stay numbers."""
    keys = _hparam_keys(rows)
    board = [r.leaderboard() for r in rows]
    records = [
        [r["rank"], *(csv_cell(r["hparams"].get(k)) for k in keys), r["f1"], r["status"],
         csv_cell(r.get("reason", ""), REASON_CHARS), r["attempts"], r["duration_s"], csv_cell(r["run_id"]),
         *(r[k] for k in SIGNIFICANCE_KEYS)]
        for r in board
    ]
    # Positional records: two keys that shorten to the same column name keep their own columns.
    columns = ["rank", *(csv_cell(k) for k in keys), "f1", "status", "reason", "attempts", "duration_s", "run_id",
               *SIGNIFICANCE_KEYS]
    return pd.DataFrame.from_records(records, columns=columns)


def render_markdown(sweep: dict[str, Any], rows: Sequence[TrialRow], plot_name: str | None = None, *,
                    images: Sequence[tuple[str, str]] = (), notes: Sequence[str] = (),
                    run_link: Callable[[str], str] | None = None) -> str:
    """The leaderboard as markdown: sweep header, plots (``plot_name`` and ``images``: (caption,
    relative link) pairs, shown before the table so a long table never hides them), then every trial.

    Every value from the sweep (names, hparam keys and values, reasons, settings) goes through
    ``cells.md``: shortened, one line, no HTML or markdown it did not mean. ``notes`` are written as given.
    ``run_link(run_id)``: the address each run id links to (none: plain ids).
    """
    c = counts(rows)
    lines = [f"# Sweep {md(sweep['name'], code=True)} — {md(sweep['sweep_id'])}", ""]
    for label, key in (("MLflow experiment", "experiment_id"), ("parent run", "parent_run_id"),
                       ("tracking URI", "tracking_uri"), ("spec hash", "spec_hash"),
                       ("data version (train / val)", "data_version"), ("git commit", "git_commit"),
                       ("quota", "quota")):
        if sweep.get(key) is not None:
            lines.append(f"- {label}: {md(sweep[key], code=True)}")
    if sweep.get("settings"):
        lines.append("- settings: " + ", ".join(md(f"{k}={short_text(v)}", code=True)
                                               for k, v in sorted(sweep["settings"].items())))
    lines += _champion_lines(sweep)
    if sweep.get("champion_rule"):
        lines.append(f"- champion picked by: {md(sweep['champion_rule'], REASON_CHARS)}")
    stopped = f", {c['stopped']} stopped early" if c.get("stopped") else ""
    lines.append(f"- trials: {c['total']} ({c['finished']} finished, {c['reused']} reused{stopped}, "
                 f"{c['failed']} failed)")
    if sweep.get("early_stop"):
        lines.append(f"- early stopping: {md(sweep['early_stop'], code=True)}")
    if sweep.get("gpu_hours_used") is not None:
        saved = sweep.get("gpu_hours_saved")
        lines.append(f"- GPU-hours: {sweep['gpu_hours_used']:.3f} used" +
                     (f", {saved:.3f} saved by early stopping (estimated from the stopped trials' planned steps)"
                      if saved is not None else ""))
    figures = ([("F1 per combination", plot_name)] if plot_name else []) + list(images)
    if figures or notes:
        lines += ["", "## Plots", ""]
        lines += [f"![{md(caption)}]({link})\n" for caption, link in figures]
        lines += [f"{note}\n" for note in notes]
        lines += ["## Trials"]
    keys = _hparam_keys(rows)
    sig = sweep.get("significance")
    if sig:
        lines += ["", _significance_legend(sig)]
    lines += ["", "| rank | " + " | ".join(md(k) for k in keys) + " | F1 |" + (" 95% CI |" if sig else "")
              + " status | attempts | duration | run |",
              "|---:|" + "---|" * len(keys) + "---:|" + ("---|" if sig else "") + "---|---:|---:|---|"]
    leader = sig.get("leader_run_id") if sig else None
    for row in rows:
        r = row.leaderboard()
        hp = " | ".join(md(r["hparams"].get(k, "")) for k in keys)
        f1 = f"{r['f1']:.4f}" if r["f1"] is not None else "—"
        f1 += f" {TIED}" if r["tied_with_best"] and r["run_id"] != leader else ""
        f1 += f" {MISMATCH}" if row.f1_mismatch else ""
        ci = ((f" {interval_text(r['f1_ci_low'], r['f1_ci_high'])} |" if r["f1_ci_low"] is not None else " |")
              if sig else "")
        status = r["status"] + (f": {md(r['reason'], REASON_CHARS)}" if r.get("reason") else "")
        run = md((r["run_id"] or "")[:8], code=True) if r["run_id"] else ""
        if run and run_link:
            run = f"[{run}]({run_link(r['run_id'])})"
        lines.append(f"| {r['rank']} | {hp} | {f1} |{ci} {status} | {r['attempts']} | {duration(r['duration_s'])} "
                     f"| {run} |")
    mismatched = [r for r in rows if r.f1_mismatch]
    if mismatched:
        lines += ["", f"{MISMATCH} The trainer's F1 is not the F1 of its own predictions (metric average "
                  f"{md(sig['average'])}); the trainer's is ranked: "
                  + "; ".join(f"rank {r.rank}: reported {r.f1:.6f}, predictions give "
                              f"{r.significance.recomputed_f1:.6f}" for r in mismatched[:20])  # type: ignore[union-attr]
                  + (f"; and {len(mismatched) - 20} more" if len(mismatched) > 20 else "") + "."]
    return "\n".join(lines) + "\n"


def _significance_legend(sig: dict[str, Any]) -> str:
    """What the interval column and the marks mean, in one paragraph."""
    from hpsweep.report.significance import tie_sentence

    text = (f"95% CI: percentile interval of each F1 by {md(sig['method'])} over the {sig['validation_size']:,} "
            f"validation examples (B={sig['resamples']}, seed {sig['seed']}, average {md(sig['average'])}); "
            f"{TIED}: statistically tied with the best (the 95% interval of the paired difference holds 0).")
    sentence = tie_sentence(sig)
    return text + (f" **{md(sentence)}.**" if sentence else "")


def duration(seconds: float | None) -> str:
    """A trial's wall time as a person reads it: ``0.4 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``; ``—`` unknown."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 1:
        return f"{secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _champion_lines(sweep: dict[str, Any]) -> list[str]:
    """The registered champion, whether this sweep moved it, and why (or why not)."""
    if sweep.get("champion") is None and "champion_moved" not in sweep:
        return []
    name = md(sweep["champion"], code=True) if sweep.get("champion") is not None else "none"
    moved = "moved by this sweep" if sweep.get("champion_moved") else "not moved by this sweep"
    lines = [f"- champion: {name} ({moved})"]
    if sweep.get("champion_note"):
        lines.append(f"- champion decision: {md(sweep['champion_note'], REASON_CHARS)}")
    return lines


def _hparam_keys(rows: Sequence[TrialRow]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.hparams))


def plot_f1(rows: Sequence[TrialRow], path: Path) -> None:
    """Horizontal bars of the best ``plots.BAR_MAX`` trials; failed trials are listed in the report, not plotted."""
    plots.draw(lambda: plots.f1_by_combination_figure(rows), path)


def plot_f1_by_hparam(rows: Sequence[TrialRow], path: Path) -> None:
    """One panel per hparam key: F1 against that hparam's values."""
    plots.draw(lambda: plots.f1_by_hparam_figure(rows), path)


def plot_learning_curves(rows: Sequence[TrialRow], curves: Curves, path: Path, metric: str = CURVE_METRIC) -> None:
    """One line per run in ``curves``, labelled with its rank and F1."""
    plots.draw(lambda: plots.learning_curves_figure(rows, curves, metric), path)


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
    """Write the leaderboard (json, csv, md), best.json and the plots, each file atomically; return every file written.

    ``leaderboard.json`` first (the contract, and what MLflow keeps), then ``best.json`` and the csv,
    the plots, and the markdown last so it links only the plots that were drawn: ``f1_by_combination.png``
    and (when the trials have hparams) ``f1_by_hparam.png`` when a trial has an F1, ``learning_curves.png``
    when a curve in ``curves`` (from ``learning_curves``) has at least two steps. A plot not drawn this
    time is removed from ``report_dir`` so the folder never shows a stale one. Best-effort all through: a file that cannot be written (a
    full or read-only folder) or a plot that cannot be drawn is left out with one warning line saying
    what and why, and the rest is still written; nothing here raises for it.
    """
    skipped: list[tuple[str, str]] = []  # (file, why)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("report: nothing written: the folder %s cannot be made: %s", report_dir, _why(e))
        return {}
    written: dict[str, Path] = {}

    def attempt(name: str, write: Callable[[Path], Any]) -> None:
        try:
            write(report_dir / name)
        except Exception as e:  # noqa: BLE001 - one file (a plot, a full disk) never costs the others
            skipped.append((name, _why(e)))
        else:
            written[name] = report_dir / name

    attempt(LEADERBOARD_JSON, lambda p: _write_text(p, leaderboard_json(sweep, rows)))
    attempt(BEST_JSON, lambda p: _write_text(p, json.dumps(best_summary(sweep, rows), indent=2, default=str) + "\n"))
    attempt(LEADERBOARD_CSV, lambda p: _write_text(p, leaderboard_frame(rows).to_csv(index=False)))
    notes = []
    if any(r.has_f1 for r in rows):
        attempt(F1_BY_COMBINATION, lambda p: plot_f1(rows, p))
        if _hparam_keys(rows):
            attempt(F1_BY_HPARAM, lambda p: plot_f1_by_hparam(rows, p))
    elif rows:
        notes.append("No F1 plots: no trial has an F1 (the table below says why each one failed).")
    # A curve needs two steps: trials that log their metric once (at the end) get no plot and no note.
    if curves and any(len(points) > 1 for points in curves.values()):
        attempt(LEARNING_CURVES, lambda p: plot_learning_curves(rows, curves, p, curve_metric))
    elif curves is not None and not any(curves.values()):
        notes.append(f"No learning curves: the top trials logged no per-step {md(curve_metric, code=True)}.")
    for name in PLOT_FILES:
        if name not in written:
            with suppress(OSError):  # a read-only folder keeps its old plot; the markdown no longer links it
                (report_dir / name).unlink(missing_ok=True)
    captions = {F1_BY_COMBINATION: "F1 per combination", F1_BY_HPARAM: "F1 against each hparam",
                LEARNING_CURVES: f"Learning curves ({short_text(curve_metric)}) of the top trials"}
    images = [(captions[name], name) for name in PLOT_FILES if name in written]
    attempt(LEADERBOARD_MD, lambda p: _write_text(p, render_markdown(sweep, rows, images=images, notes=notes)))
    _warn_skipped(report_dir, skipped)
    order = (LEADERBOARD_MD, LEADERBOARD_CSV, LEADERBOARD_JSON, BEST_JSON, *PLOT_FILES)
    return {name: written[name] for name in order if name in written}


def _why(error: BaseException) -> str:
    return short_text(" ".join(f"{type(error).__name__}: {error}".split()))


def _warn_skipped(report_dir: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """One line per cause (a read-only folder fails every file the same way), naming the files it cost."""
    by_why: dict[str, list[str]] = {}
    for name, why in skipped:
        by_why.setdefault(why, []).append(name)
    for why, names in by_why.items():
        log.warning("report: skipped %s in %s: %s", ", ".join(names), report_dir, why)


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
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # a full disk leaves no half-written .tmp behind
            tmp.unlink(missing_ok=True)
        raise
