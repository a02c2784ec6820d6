"""The leaderboard: rank trial rows read back from MLflow and render them (md, csv, json, png).

Pure functions except ``write_report``; nothing here talks to MLflow or Prefect.
``leaderboard.json`` is a public contract:
``{"sweep_id": ..., "rows": [{"rank", "hparams", "f1", "status", "run_id", ...}]}``,
rows sorted by F1 descending, failed trials last with ``"f1": null`` and a ``"reason"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

PLOT_MAX = 60
REPORT_FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "f1_by_combination.png")


def rank_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials by F1 (best first; ties keep file order), then failed ones in file order."""
    def ok_row(r: dict[str, Any]) -> bool:
        return r["status"] in ("FINISHED", "REUSED") and r["f1"] is not None

    finished = sorted((r for r in runs if ok_row(r)), key=lambda r: (-r["f1"], r["index"]))
    failed = sorted((r for r in runs if not ok_row(r)), key=lambda r: r["index"])
    ranked = []
    for rank, r in enumerate(finished + failed, start=1):
        ok = ok_row(r)
        row = {
            "rank": rank,
            "hparams": r["hparams"],
            "f1": r["f1"] if ok else None,
            "status": r["status"] if ok else "FAILED",
            "run_id": r["run_id"],
            "run_name": r.get("run_name"),
            "attempts": r.get("attempt", 1),
            "duration_s": r.get("duration_s"),
        }
        if not ok:
            row["reason"] = r.get("reason") or f"run ended {r.get('mlflow_status', 'without an F1')}"
        ranked.append(row)
    return ranked


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"total": len(rows), "finished": 0, "failed": 0, "reused": 0}
    for r in rows:
        out[{"FINISHED": "finished", "REUSED": "reused"}.get(r["status"], "failed")] += 1
    return out


def leaderboard_json(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    return json.dumps({**sweep, "counts": counts(rows), "rows": rows}, indent=2, default=str)


def leaderboard_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    keys = list(dict.fromkeys(k for r in rows for k in r["hparams"]))
    records = [
        {"rank": r["rank"], **{k: r["hparams"].get(k) for k in keys}, "f1": r["f1"], "status": r["status"],
         "reason": r.get("reason", ""), "attempts": r["attempts"], "duration_s": r["duration_s"],
         "run_id": r["run_id"]}
        for r in rows
    ]
    return pd.DataFrame.from_records(records, columns=["rank", *keys, "f1", "status", "reason", "attempts",
                                                        "duration_s", "run_id"])


def render_markdown(sweep: dict[str, Any], rows: list[dict[str, Any]], plot_name: str | None = None) -> str:
    c = counts(rows)
    lines = [f"# Sweep `{sweep['name']}` — {sweep['sweep_id']}", ""]
    for label, key in (("MLflow experiment", "experiment_id"), ("parent run", "parent_run_id"),
                       ("tracking URI", "tracking_uri"), ("spec hash", "spec_hash"),
                       ("data version (train / val)", "data_version"), ("git commit", "git_commit"),
                       ("quota", "quota"), ("champion", "champion")):
        if sweep.get(key) is not None:
            lines.append(f"- {label}: `{sweep[key]}`")
    lines.append(f"- trials: {c['total']} ({c['finished']} finished, {c['reused']} reused, {c['failed']} failed)")
    keys = _hparam_keys(rows)
    lines += ["", "| rank | " + " | ".join(keys) + " | F1 | status | attempts | run |",
              "|---:|" + "---|" * len(keys) + "---:|---|---:|---|"]
    for r in rows:
        hp = " | ".join(str(r["hparams"].get(k, "")) for k in keys)
        f1 = f"{r['f1']:.4f}" if r["f1"] is not None else "—"
        status = r["status"] + (f": {_one_line(r['reason'])}" if r.get("reason") else "")
        lines.append(f"| {r['rank']} | {hp} | {f1} | {status} | {r['attempts']} | `{r['run_id'][:8]}` |")
    if plot_name:
        lines += ["", f"![F1 per combination]({plot_name})"]
    return "\n".join(lines) + "\n"


def _hparam_keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r["hparams"]))


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_f1(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars, best at the top; failed trials are listed in the report, not plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A readable plot has at most PLOT_MAX bars: the best ones (the files list every trial).
    done = [r for r in rows if r["f1"] is not None][:PLOT_MAX]
    labels = [r.get("run_name") or json.dumps(r["hparams"]) for r in done][::-1]
    values = [r["f1"] for r in done][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(done) + 1.2))
    bars = ax.barh(range(len(done)), values, color=["#2a7" if i == len(done) - 1 else "#58a"
                                                    for i in range(len(done))])
    ax.set_yticks(range(len(done)), labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation F1")
    ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=2)
    ax.set_title(f"F1 per combination (top {len(done)} of {len(rows)} trials)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report_dir: Path, sweep: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write the four report files, each atomically (a crash never leaves half a file)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: report_dir / name for name in REPORT_FILES}
    plot_f1(rows, paths["f1_by_combination.png"])
    _write_text(paths["leaderboard.md"], render_markdown(sweep, rows, "f1_by_combination.png"))
    _write_text(paths["leaderboard.csv"], leaderboard_frame(rows).to_csv(index=False))
    _write_text(paths["leaderboard.json"], leaderboard_json(sweep, rows))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
