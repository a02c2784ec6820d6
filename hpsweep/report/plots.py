"""The report's figures, drawn with matplotlib's Agg backend (no display, safe in workers and CI).

Each ``*_figure`` function is pure: ranked ``TrialRow``s (from ``hpsweep.report.leaderboard.rank_rows``)
in, a ``Figure`` out; ``save`` writes one atomically and closes it, ``draw`` also closes a figure whose
drawing failed. Every figure stays readable and fast for tens of thousands of trials: at most
``BAR_MAX`` bars, at most ``CATEGORY_MAX`` categories per panel, and scatter clouds whose opacity
falls with their size. Any value draws: labels are shortened (``LABEL_CHARS``), and numbers an axis
cannot hold (beyond ``AXIS_LIMIT``, huge integers, inf, NaN) make their panel categorical.
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: hpsweep never opens a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hpsweep.model import TrialRow  # noqa: E402
from hpsweep.report.cells import VALUE_CHARS, short_text  # noqa: E402

__all__ = ["AXIS_LIMIT", "BAR_MAX", "CATEGORY_MAX", "LABEL_CHARS", "draw", "f1_by_combination_figure", "f1_range",
           "f1_by_hparam_figure", "is_log_scale", "learning_curves_figure", "save"]

BAR_MAX = 60  # bars in the F1-per-combination plot: the best ones (the md/csv/json list every trial)
CATEGORY_MAX = 30  # categories per F1-vs-hparam panel: those with the best F1
LOG_SPAN = 100.0  # a positive numeric hparam whose max/min reaches this gets a log axis (lr, alpha, ...)
PANEL_COLUMNS = 3
LABEL_CHARS = 60  # a tick label, legend entry or panel title is cut here (with an ellipsis)
# Beyond this magnitude matplotlib's margins and tick locators overflow (1e308 gave `arange: cannot
# compute length`): such values are drawn as categories instead; below its inverse, no log axis.
AXIS_LIMIT = 1e100
BEST, OTHER = "#2a7", "#58a"

Curves = Mapping[str, Sequence[tuple[int, float]]]


def f1_by_combination_figure(rows: Sequence[TrialRow]) -> Figure:
    """Horizontal bars of the best ``BAR_MAX`` finished trials, best at the top, F1 on each bar.

    The F1 axis is zoomed to the F1s drawn (0.95 against 0.98 must be told apart) and widened just
    enough for every value label to fit inside it. Raises ``ValueError`` when no trial has an F1:
    there is nothing to draw, and the report says so instead of showing an empty plot.
    """
    done = [r for r in rows if r.has_f1]
    if not done:
        raise ValueError("no trial has an F1")
    shown = done[:BAR_MAX][::-1]
    low, high = f1_range([r.f1 for r in done])
    height = 0.3 * len(shown) + 1.2
    if len(done) <= BAR_MAX:
        fig, ax = plt.subplots(figsize=(8, height))
    else:  # the bars show the best; a strip below shows where they sit among all trials
        fig, (ax, all_ax) = plt.subplots(2, 1, figsize=(8, height + 2.2), height_ratios=[height, 2.2])
        all_ax.plot(range(1, len(done) + 1), [r.f1 for r in done], color=OTHER, linewidth=1)
        all_ax.axvspan(1, len(shown), color=BEST, alpha=0.2, label=f"top {len(shown)} (bars above)")
        all_ax.set_xlim(1, len(done))
        all_ax.set_ylim(low, high)
        all_ax.set_xlabel("rank")
        all_ax.set_ylabel("F1")
        all_ax.set_title(f"all {len(done)} finished trials, best first", fontsize=9)
        all_ax.legend(fontsize=7, loc="lower left")
        all_ax.grid(alpha=0.3)
    # Error bars: the F1's 95% bootstrap interval, where the trial logged its predictions.
    xerr = [[max(0.0, r.f1 - r.significance.ci_low) if r.significance else 0.0 for r in shown],
            [max(0.0, r.significance.ci_high - r.f1) if r.significance else 0.0 for r in shown]]
    bars = ax.barh(range(len(shown)), [r.f1 for r in shown],
                   color=[BEST if i == len(shown) - 1 else OTHER for i in range(len(shown))],
                   xerr=xerr if any(r.significance for r in shown) else None,
                   error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333"})
    ax.set_yticks(range(len(shown)), [_label(r) for r in shown], fontsize=7)
    whiskers = [r.significance for r in shown if r.significance]
    ax.set_xlim(min([low, *(s.ci_low for s in whiskers)]),  # zoomed to the data, whiskers included
                max([*(r.f1 for r in shown), *(s.ci_high for s in whiskers)]))
    ax.set_xlabel("validation F1" + (" (whiskers: 95% bootstrap interval)" if whiskers else ""))
    labels = ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=3)
    failed = len(rows) - len(done)
    ax.set_title(f"F1 per combination (top {len(shown)} of {len(rows)} trials"
                 + (f", {failed} failed" if failed else "") + ")", fontsize=10)
    fig.tight_layout()
    _fit_bar_labels(fig, ax, labels)
    return fig


def f1_range(f1s: Sequence[float]) -> tuple[float, float]:
    """An F1 axis zoomed to ``f1s``: a margin of a third of their spread (at least 0.01) each side, within [0, 1]."""
    low, high = min(f1s), max(f1s)
    margin = max((high - low) / 3, 0.01)
    return max(0.0, low - margin), min(1.0, high + margin)


def _fit_bar_labels(fig: Figure, ax: Any, labels: Sequence[Any]) -> None:
    """Widen the x-axis to the right, from the longest bar's end, just enough for every value label."""
    fig.canvas.draw()  # lays the text out, so its size in pixels is known
    left, right = ax.get_xlim()  # right: the longest bar's end, at the axes' right edge
    box = ax.get_window_extent()
    beyond = max((t.get_window_extent().x1 for t in labels), default=box.x1) - box.x1  # pixels past the edge
    free = box.width * 0.97 - max(beyond, 0.0)  # what the bars may take for the labels to fit, with a margin
    if free > 0:
        ax.set_xlim(left, left + (right - left) * box.width / free)


def f1_by_hparam_figure(rows: Sequence[TrialRow]) -> Figure:
    """One panel per hparam key (in file order): F1 of every finished trial against that hparam.

    Numeric hparams are a scatter (log x-axis when their values span ``LOG_SPAN`` or more); other
    hparams (str, bool, mixed) are a box per value with the trials jittered over it. Every panel draws
    the same things the same way, on the same F1 axis zoomed to the data: the trials as dots, and one
    statistic per value (the best F1, or the median when each value has many trials) as a green mark,
    explained by one legend for the whole figure. Failed trials have no F1 and are not drawn.
    """
    keys = list(dict.fromkeys(k for r in rows for k in r.hparams))
    done = [r for r in rows if r.has_f1]
    ncols = min(PANEL_COLUMNS, max(len(keys), 1))
    nrows = max(math.ceil(len(keys) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows + 0.4), squeeze=False)
    panels = axes.ravel()
    # One statistic for every panel, so a mark means the same thing wherever it is.
    most_values = max((len({_value_key(r.hparams.get(k)) for r in done}) for k in keys), default=1)
    many = len(done) >= 5 * most_values
    stat, stat_label = (statistics.median, "median F1 of the trials at each value") if many else \
        (max, "best F1 at each value")
    low, high = f1_range([r.f1 for r in done]) if done else (0.0, 1.0)
    for ax, key in zip(panels, keys):
        points = [(r.hparams[key], r.f1) for r in done if r.hparams.get(key) is not None]
        if points and all(_is_number(x) for x, _ in points):
            _numeric_panel(ax, [float(x) for x, _ in points], [y for _, y in points], stat)
        else:
            _categorical_panel(ax, points, stat)
        ax.set_title(short_text(key, LABEL_CHARS), fontsize=10)
        ax.set_ylim(low, high)
        ax.grid(axis="y", alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    for ax in panels[len(keys):]:
        fig.delaxes(ax)
    for row_axes in axes:
        if row_axes[0] in fig.axes:
            row_axes[0].set_ylabel("validation F1")
    fig.suptitle(f"F1 against each hparam ({len(done)} finished trials)", fontsize=11)
    if done:
        legend = [Line2D([], [], color=OTHER, marker="o", linestyle="", markersize=5, label="a trial"),
                  Line2D([], [], color=BEST, marker="_", markersize=12, linewidth=1.2, label=stat_label)]
        fig.legend(handles=legend, loc="lower center", ncols=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 / nrows, 1, 1))
    else:
        fig.tight_layout()
    return fig


def learning_curves_figure(rows: Sequence[TrialRow], curves: Curves, metric: str = "val_f1") -> Figure:
    """One line per trial in ``curves`` (run_id → [(step, value)]), in rank order, labelled by rank."""
    by_id = {r.run_id: r for r in rows}
    ranked = sorted(curves, key=lambda run_id: getattr(by_id.get(run_id), "rank", None) or math.inf)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run_id in ranked:
        points = [(step, value) for step, value in curves[run_id] if _is_number(step) and _is_number(value)]
        if not points:
            continue
        row = by_id.get(run_id)
        label = run_id[:8] if row is None else f"#{row.rank} {_f1_text(row)}  {_label(row)}"
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (epoch)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no {metric} history logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Learning curves of the top {len(ax.lines)} trials ({metric} per step)", fontsize=10)
    fig.tight_layout()
    return fig


def is_log_scale(values: Sequence[float]) -> bool:
    """Positive values spanning ``LOG_SPAN`` or more (learning rates, weight decays) read best on a log axis
    (not below ``1 / AXIS_LIMIT``, where a log axis's margins underflow: those stay linear)."""
    return bool(values) and min(values) >= 1 / AXIS_LIMIT and max(values) / min(values) >= LOG_SPAN


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (a crash never leaves half an image) and close it."""
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def draw(make: Callable[[], Figure], path: Path, dpi: int = 110) -> Path:
    """``save(make(), path)``; when ``make`` fails half-way, the figures it opened are closed too."""
    before = set(plt.get_fignums())
    try:
        return save(make(), path, dpi)
    except BaseException:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
        raise


def _numeric_panel(ax: Any, xs: list[float], ys: list[float], stat: Callable[[list[float]], float]) -> None:
    log = is_log_scale(xs)
    groups: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        groups.setdefault(x, []).append(y)
    values = sorted(groups)
    drawn_xs = xs
    if 1 < len(values) <= CATEGORY_MAX:  # a grid: spread each value's trials a little so they do not stack
        where = [math.log10(v) for v in values] if log else values
        half = 0.15 * min(b - a for a, b in zip(where, where[1:]))
        rng = random.Random(0)  # the same report draws the same image
        shift = [rng.uniform(-half, half) for _ in xs]
        drawn_xs = [x * 10 ** d if log else x + d for x, d in zip(xs, shift)]
    ax.scatter(drawn_xs, ys, s=_marker_size(len(xs)), alpha=_alpha(len(xs)), color=OTHER, linewidths=0)
    if len(values) <= 50:
        ax.plot(values, [stat(groups[v]) for v in values], color=BEST, marker="_", markersize=12, linewidth=1.2)
    if log:
        ax.set_xscale("log")


def _categorical_panel(ax: Any, points: list[tuple[Any, float]], stat: Callable[[list[float]], float]) -> None:
    groups: dict[str, list[float]] = {}
    for x, y in points:  # values alike in their first VALUE_CHARS characters share a box
        groups.setdefault(short_text(x, VALUE_CHARS), []).append(y)
    names = sorted(groups, key=lambda n: max(groups[n]), reverse=True)[:CATEGORY_MAX]
    if len(groups) > len(names):
        ax.set_xlabel(f"best {len(names)} of {len(groups)} values", fontsize=8)
    names.sort(key=_natural_key)
    if not names:
        ax.set_xticks([])
        return
    ax.boxplot([groups[n] for n in names], positions=range(len(names)), widths=0.6, showfliers=False,
               medianprops={"color": "#888"}, boxprops={"color": "#888"}, whiskerprops={"color": "#888"},
               capprops={"color": "#888"})
    rng = random.Random(0)  # the same report draws the same image
    n_points = sum(len(groups[n]) for n in names)
    for i, name in enumerate(names):
        ys = groups[name]
        ax.scatter([i + rng.uniform(-0.2, 0.2) for _ in ys], ys, s=_marker_size(n_points), alpha=_alpha(n_points),
                   color=OTHER, linewidths=0, zorder=3)
    ax.plot(range(len(names)), [stat(groups[n]) for n in names], color=BEST, marker="_", markersize=12,
            linestyle="", markeredgewidth=1.5, zorder=4)
    ax.set_xticks(range(len(names)), [short_text(n, LABEL_CHARS) for n in names],
                  rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize=7)


def _is_number(value: Any) -> bool:
    """A number a linear axis can hold: not a bool, finite, at most ``AXIS_LIMIT`` in size."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return abs(float(value)) <= AXIS_LIMIT  # False for NaN and inf too
    except OverflowError:  # an int beyond any float
        return False


def _value_key(value: Any) -> str:
    """How a panel groups an hparam's values (numbers by value, the rest by their shortened text)."""
    return repr(float(value)) if _is_number(value) else short_text(value, VALUE_CHARS)


def _natural_key(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _alpha(n: int) -> float:
    return max(0.08, min(0.9, 20 / math.sqrt(n))) if n else 0.9


def _marker_size(n: int) -> float:
    return 24.0 if n <= 100 else 10.0 if n <= 2000 else 4.0


def _label(row: TrialRow) -> str:
    text = row.run_name or ", ".join(f"{short_text(k)}={short_text(v)}" for k, v in row.hparams.items())
    return short_text(text, LABEL_CHARS)


def _f1_text(row: TrialRow) -> str:
    return f"F1 {row.f1:.3f}" if row.has_f1 else "failed"
