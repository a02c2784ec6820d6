"""The paired bootstrap (hpsweep.report.significance) against an independent, loop-based one."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from hpsweep.model import TrialRow, TrialState
from hpsweep.report.leaderboard import rank_rows
from hpsweep.report.significance import (assess, bootstrap_f1, compare_to_leader, f1_from_labels, resample_indices,
                                         tie_sentence)


def _noisy(y: np.ndarray, accuracy: float, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(y)) >= accuracy
    return np.where(wrong, (y + rng.integers(1, classes, len(y))) % classes, y)


def _slow_bootstrap(y_true, preds, average, pos_label, resamples, seed):
    """One sklearn f1_score per trial per resample, on the very indices hpsweep draws."""
    kwargs = {"pos_label": pos_label} if average == "binary" else {}
    rows = []
    for block in resample_indices(len(y_true), resamples, seed):
        for idx in block:
            rows.append([f1_score(y_true[idx], p[idx], average=average, zero_division=0, **kwargs) for p in preds])
    return np.array(rows)


@pytest.mark.parametrize("average", ["binary", "macro", "micro", "weighted"])
def test_intervals_and_p_beats_best_match_a_loop_based_bootstrap_and_sklearn(average):
    classes = 2 if average == "binary" else 4
    y = np.random.default_rng(7).integers(0, classes, 60)
    preds = [_noisy(y, 0.8, classes, 1), _noisy(y, 0.7, classes, 2)]
    point, boot = bootstrap_f1(y, preds, average, pos_label=1, resamples=300, seed=11)
    slow = _slow_bootstrap(y, preds, average, 1, 300, 11)
    np.testing.assert_allclose(boot, slow, atol=1e-12)
    kwargs = {"pos_label": 1} if average == "binary" else {}
    np.testing.assert_allclose(point, [f1_score(y, p, average=average, **kwargs) for p in preds], atol=1e-12)

    stats = compare_to_leader(point, boot, leader=0)
    low, high = np.percentile(slow, [2.5, 97.5], axis=0)
    diff = slow[:, 1] - slow[:, 0]
    assert [s.ci_low for s in stats] == pytest.approx(low.tolist(), abs=1e-12)
    assert [s.ci_high for s in stats] == pytest.approx(high.tolist(), abs=1e-12)
    assert stats[1].p_beats_best == pytest.approx(float(np.mean(slow[:, 1] > slow[:, 0])))
    d_low, d_high = np.percentile(diff, [2.5, 97.5])
    assert stats[1].tied_with_best == bool(d_low <= 0 <= d_high)
    assert stats[0].p_beats_best == 0 and stats[0].tied_with_best  # the leader against itself


def test_string_labels_and_a_binary_pos_label():
    y = np.array(["cat", "dog"] * 20)
    p = np.array(["cat", "dog", "dog", "dog"] * 10)
    assert f1_from_labels(y, p, "binary", "dog") == pytest.approx(f1_score(y, p, pos_label="dog"))
    with pytest.raises(ValueError, match="pos_label 1 is not one of the labels"):
        f1_from_labels(y, p, "binary", 1)
    mixed = bootstrap_f1(np.array([1, 2] * 20), [np.array([1, 2] * 20), np.array(["1", "1"] * 20)], "macro",
                         resamples=100)[0]
    assert mixed.tolist() == pytest.approx([1.0, f1_score([1, 2] * 20, [1, 1] * 20, average="macro")])
    with pytest.raises(ValueError, match="needs two classes"):
        bootstrap_f1(np.arange(30) % 3, [np.arange(30) % 3], "binary")


def test_identical_predictions_are_tied():
    y = np.random.default_rng(0).integers(0, 10, 500)
    p = _noisy(y, 0.9, 10, 3)
    point, boot = bootstrap_f1(y, [p, p.copy()], "macro")
    stats = compare_to_leader(point, boot, 0)
    assert stats[1].tied_with_best and stats[1].p_beats_best == 0.0
    assert stats[1].ci_low == stats[0].ci_low and stats[1].ci_high == stats[0].ci_high


def test_95_percent_right_is_not_tied_with_60_percent_right_on_1000_examples():
    y = np.random.default_rng(0).integers(0, 10, 1000)
    point, boot = bootstrap_f1(y, [_noisy(y, 0.95, 10, 1), _noisy(y, 0.60, 10, 2)], "macro")
    stats = compare_to_leader(point, boot, 0)
    assert not stats[1].tied_with_best
    assert stats[1].p_beats_best == 0.0
    assert stats[1].ci_high < stats[0].ci_low


def test_the_same_seed_gives_the_same_intervals_and_another_seed_other_ones():
    y = np.random.default_rng(0).integers(0, 3, 200)
    preds = [_noisy(y, 0.8, 3, 1)]
    assert np.array_equal(bootstrap_f1(y, preds, seed=5)[1], bootstrap_f1(y, preds, seed=5)[1])
    assert not np.array_equal(bootstrap_f1(y, preds, seed=5)[1], bootstrap_f1(y, preds, seed=6)[1])


def _row(index, f1, run_id, state=TrialState.FINISHED):
    return TrialRow(index=index, hparams={"hidden": index}, state=state, run_id=run_id, f1=f1)


def test_assess_sets_the_leaderboard_keys_and_leaves_rows_without_predictions_null():
    y = np.random.default_rng(0).integers(0, 10, 360)
    good, same, bad = _noisy(y, 0.95, 10, 1), None, _noisy(y, 0.6, 10, 2)
    same = good.copy()
    rows = rank_rows([_row(1, f1_score(y, good, average="macro"), "a"), _row(2, f1_score(y, same, average="macro"), "b"),
                      _row(3, f1_score(y, bad, average="macro"), "c"), _row(4, 0.99, "d"),
                      _row(5, None, "e", TrialState.FAILED)])
    result = assess(rows, {"a": (y, good), "b": (y, same), "c": (y, bad)}, "macro", resamples=500)
    board = {r.run_id: r.leaderboard() for r in result.rows}
    assert board["a"]["tied_with_best"] and board["b"]["tied_with_best"] and not board["c"]["tied_with_best"]
    for run_id in "de":
        assert all(board[run_id][k] is None for k in ("f1_ci_low", "f1_ci_high", "p_beats_best", "tied_with_best"))
    assert board["a"]["f1_ci_low"] < board["a"]["f1"] < board["a"]["f1_ci_high"]
    header = result.header
    assert header["method"] == "paired bootstrap" and header["resamples"] == 500 and header["seed"] == 0
    assert header["validation_size"] == 360 and header["leader_run_id"] == "a"
    assert header["tied_with_best_count"] == 2 and header["tied_ranks"] == [2, 3]
    assert header["f1_mismatch_run_ids"] == []
    assert tie_sentence(header) == ("2 trials (ranks 2, 3) are statistically tied with the best (paired bootstrap, "
                                    "360 val examples): the order among them is noise")


def test_a_reported_f1_that_disagrees_with_the_predictions_is_flagged():
    y = np.arange(100) % 4
    p = _noisy(y, 0.9, 4, 1)
    rows = rank_rows([_row(1, f1_score(y, p, average="macro") + 0.01, "a")])
    result = assess(rows, {"a": (y, p)}, "macro", resamples=100)
    assert result.rows[0].f1_mismatch and result.header["f1_mismatch_run_ids"] == ["a"]
    rows = rank_rows([_row(1, f1_score(y, p, average="macro"), "a")])
    assert not assess(rows, {"a": (y, p)}, "macro", resamples=100).rows[0].f1_mismatch


def test_top_k_tied_sentence():
    header = {"method": "paired bootstrap", "validation_size": 360, "tied_with_best_count": 3, "tied_ranks": [1, 2, 3]}
    assert tie_sentence(header) == ("top 3 are statistically tied (paired bootstrap, 360 val examples): the order "
                                    "among them is noise")
    assert tie_sentence({**header, "tied_with_best_count": 1, "tied_ranks": [1]}) is None
    assert tie_sentence(None) is None


def test_the_f1_bars_get_error_bars_from_the_intervals():
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from hpsweep.report import plots

    y = np.arange(200) % 3
    preds = {"a": _noisy(y, 0.9, 3, 1), "b": _noisy(y, 0.7, 3, 2)}
    rows = rank_rows([_row(i, f1_score(y, p, average="macro"), k) for i, (k, p) in enumerate(preds.items(), 1)]
                     + [_row(3, 0.5, "c")])
    result = assess(rows, {k: (y, p) for k, p in preds.items()}, resamples=200)
    fig = plots.f1_by_combination_figure(result.rows)
    (ax,) = fig.axes
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers) and "95% bootstrap interval" in ax.get_xlabel()
    plt.close(fig)
    fig = plots.f1_by_combination_figure(rows)  # no predictions: plain bars
    assert not any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)
    plt.close(fig)


def test_the_tie_break_picks_among_the_tied_trials_only():
    from hpsweep.config import SweepConfig, parse_tie_break
    from hpsweep.model import Significance
    from hpsweep.report.assemble import pick_champion

    def row(index, f1, hidden, lr, tied):
        sig = Significance(f1 - 0.01, f1 + 0.01, 0.0, tied, f1)
        return TrialRow(index=index, hparams={"hidden": hidden, "lr": lr}, state=TrialState.FINISHED,
                        run_id=f"r{index}", f1=f1, significance=sig)

    ranked = rank_rows([row(1, 0.95, 64, 0.1, True), row(2, 0.949, 16, 0.01, True), row(3, 0.948, 16, 0.1, True),
                        row(4, 0.90, 8, 0.1, False)])
    assert pick_champion(ranked, None) == (ranked[0], "highest F1")
    pick, rule = pick_champion(ranked, "hidden:asc,lr:desc")
    assert pick.index == 3 and rule == ("tie-break hidden:asc,lr:desc among the 3 trials statistically tied with "
                                        "the best (ranks 1, 2, 3): rank 3")  # never the untied smaller model
    assert pick_champion(ranked, "hidden:desc")[0].index == 1
    alone = rank_rows([row(1, 0.95, 64, 0.1, True), row(4, 0.90, 8, 0.1, False)])
    assert pick_champion(alone, "hidden:asc")[1].startswith("highest F1 (tie-break hidden:asc unused")
    assert parse_tie_break(" hidden:asc , lr:desc") == [("hidden", False), ("lr", True)]
    with pytest.raises(ValueError, match="write hparam:asc or hparam:desc"):
        SweepConfig(combinations="c", spec="s", train="t", val="v", tie_break="hidden:up")
