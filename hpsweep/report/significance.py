"""Is the winner real? A paired bootstrap over the validation examples the trials were scored on.

Every trial that logged its validation predictions is scored again on the same ``resamples``
resamplings of the validation set (the same indices for every trial, drawn from ``seed``), so two
trials are compared on exactly the same examples each time. Per trial: the F1's percentile interval,
the share of resamples where it beats the leader, and whether the interval of its paired difference
to the leader holds 0 (tied).

The cost is in per-resample confusion counts: resample-count weights (how often each example is drawn
in each resample) summed over each trial's mistakes by class give every resample's counts at once;
F1 follows from the counts. No Python loop runs over examples or resamples. Pure numpy: no MLflow,
no files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from hpsweep.model import Significance, TrialRow

__all__ = ["AVERAGES", "CONFIDENCE", "DEFAULT_RESAMPLES", "DEFAULT_SEED", "METHOD", "Assessment", "assess",
           "bootstrap_f1", "compare_to_leader", "f1_from_labels", "resample_indices", "tie_sentence"]

AVERAGES = ("binary", "macro", "micro", "weighted")
METHOD = "paired bootstrap"
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
# Bytes of float weights held at once (a resample block of W, and a trial chunk of indicators):
# a 1M-example validation set is resampled a few rows at a time instead of 8 GB at once.
_BLOCK_BYTES = 64 * 2**20
_EXACT_FLOAT32 = 2**24  # float32 sums of integer counts are exact below this
MAX_WORKERS = 8  # threads counting trials at once (at most the cores this process may use)


# ---------------------------------------------------------------- labels and F1 from counts


def _encode(y_true: np.ndarray, y_preds: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The labels seen anywhere (sorted), and every array as indices into them."""
    arrays = [y_true, *y_preds]
    if len({a.dtype.kind for a in arrays}) > 1:  # 1 and "1" name the same class
        arrays = [a.astype(str) for a in arrays]
        y_true, y_preds = arrays[0], arrays[1:]
    labels = np.unique(np.concatenate(arrays))
    return labels, np.searchsorted(labels, y_true), [np.searchsorted(labels, p) for p in y_preds]


def _positive(labels: np.ndarray, pos_label: Any) -> int:
    """The index of ``pos_label`` among ``labels`` for ``average='binary'`` (scikit-learn's checks)."""
    if len(labels) > 2:
        raise ValueError(f"average 'binary' needs two classes, the predictions have {len(labels)}: "
                         "set metric.average to macro, micro or weighted")
    matches = [i for i, label in enumerate(labels) if _same_label(label, pos_label)]
    if not matches:
        if len(labels) == 2:
            raise ValueError(f"metric.pos_label {pos_label!r} is not one of the labels {labels.tolist()}")
        return -1  # one class, not the positive one: no positive example, F1 0 (as scikit-learn says)
    return matches[0]


def _same_label(label: Any, pos_label: Any) -> bool:
    """A CSV's "1" and a spec's 1 name the same class."""
    return label == pos_label or str(label) == str(pos_label)


def _f1_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray, average: str, pos: int) -> np.ndarray:
    """F1 over the last axis (classes) of per-class counts, as ``sklearn.metrics.f1_score`` computes it
    on labels (zero_division=0): macro averages over the classes present (in truth or predictions)."""
    denom = pred + true
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    if average == "binary":
        return per_class[..., pos] if pos >= 0 else np.zeros(per_class.shape[:-1])
    if average == "micro":  # single-label: 2·Σtp / (Σpred + Σtrue) = accuracy
        return 2 * tp.sum(-1) / np.maximum(denom.sum(-1), 1)
    if average == "macro":
        present = (denom > 0).sum(-1)
        return per_class.sum(-1) / np.maximum(present, 1)
    if average == "weighted":
        support = np.broadcast_to(true, per_class.shape)
        return (per_class * support).sum(-1) / np.maximum(support.sum(-1), 1)
    raise ValueError(f"unknown average {average!r}: use one of {', '.join(AVERAGES)}")


def f1_from_labels(y_true: Any, y_pred: Any, average: str = "macro", pos_label: Any = 1) -> float:
    """F1 of one trial's predictions (equal to ``sklearn.metrics.f1_score`` with the same arguments)."""
    labels, ti, (pi,) = _encode(np.asarray(y_true), [np.asarray(y_pred)])
    pos = _positive(labels, pos_label) if average == "binary" else 0
    return _f1_of_encoded(ti, pi, len(labels), average, pos)


def _f1_of_encoded(ti: np.ndarray, pi: np.ndarray, k: int, average: str, pos: int) -> float:
    """F1 of one trial's predictions already encoded as indices into ``k`` labels."""
    tp = np.bincount(ti[ti == pi], minlength=k).astype(float)
    pred = np.bincount(pi, minlength=k).astype(float)
    true = np.bincount(ti, minlength=k).astype(float)
    if average != "binary":
        # Only the classes in this pair (labels that other trials alone predict are left out): the
        # same per-class terms, summed in the same order, as when the pair is encoded on its own.
        seen = pred + true > 0
        tp, pred, true = tp[seen], pred[seen], true[seen]
    return float(_f1_from_counts(tp, pred, true, average, pos))


# ---------------------------------------------------------------- the bootstrap


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's resamples of ``n`` examples: blocks of rows of example indices (``resamples``
    rows in all), drawn from ``numpy.random.default_rng(seed)``. The blocking depends on ``n`` alone, so
    a seed always means the same indices (a test may loop over them to check the vectorised result)."""
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, _BLOCK_BYTES // (4 * max(n, 1))))
    for start in range(0, resamples, block):
        yield rng.integers(0, n, size=(min(block, resamples - start), n), dtype=np.int32 if n < 2**31 else np.int64)


def _weights(indices: np.ndarray, dtype: type) -> np.ndarray:
    """How often each example is drawn in each resample, examples × resamples (a row per example, so
    gathering examples reads contiguous rows): one bincount for the block of ``indices`` rows."""
    b, n = indices.shape
    flat = indices * b + np.arange(b)[:, None]  # example i of resample r is bin i·b + r
    return np.bincount(flat.ravel(), minlength=n * b).reshape(n, b).astype(dtype)


def _onehot(classes: Sequence[np.ndarray], k: int, dtype: type) -> np.ndarray:
    """The labellings in ``classes`` (each of the same examples) stacked as indicators, (k·len(classes),
    examples): row i·k + c marks the examples labelling i puts in class c."""
    m = len(classes[0])
    onehot = np.zeros((k * len(classes), m), dtype=dtype)
    for i, c in enumerate(classes):
        onehot[i * k + c, np.arange(m)] = 1
    return onehot


def _class_sums(weights: np.ndarray, examples: np.ndarray, classes: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Per resample, how many of ``examples`` were drawn, by class, for each labelling in ``classes``
    (each (resamples, k)): one gather of the examples' weights, one matrix product with their classes."""
    b = weights.shape[1]
    if not len(examples):
        return [np.zeros((b, k)) for _ in classes]
    sums = (_onehot(classes, k, weights.dtype) @ weights[examples]).astype(np.float64)  # (k·len(classes), b)
    return [sums[i * k:(i + 1) * k].T for i in range(len(classes))]


def bootstrap_f1(y_true: Any, y_preds: Sequence[Any], average: str = "macro", pos_label: Any = 1,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(F1 of each trial on the whole set, shape (T,); F1 of each trial on each resample, shape
    (resamples, T)). Every trial is scored against the same ``y_true`` on the same resamples.

    Per resample, a trial's confusion counts come from its wrong predictions alone: the drawn
    examples of each true class (shared by all trials) minus those it got wrong give its true
    positives; plus its wrong predictions of each class, its predictions. The cost per trial is two
    passes over its mistakes, not over the whole set."""
    t = np.asarray(y_true)
    preds = [np.asarray(p) for p in y_preds]
    n = len(t)
    if n == 0:
        raise ValueError("no validation examples")
    if any(len(p) != n for p in preds):
        raise ValueError("every trial's predictions must cover the same validation examples")
    labels, ti, pis = _encode(t, preds)
    k, n_trials = len(labels), len(preds)
    pos = _positive(labels, pos_label) if average == "binary" else 0
    dtype = np.float32 if n < _EXACT_FLOAT32 else np.float64  # counts summed exactly either way
    wrongs = [np.flatnonzero(pi != ti) for pi in pis]
    boot = np.empty((resamples, n_trials))
    row = 0
    # Trials are split over the cores (numpy's gathers and products release the GIL); BLAS itself
    # gets one thread, as its own threads only fight these on small products.
    workers = max(1, min(usable_cores(), n_trials, MAX_WORKERS))
    true_onehot = _onehot([ti], k, dtype)  # every example's true class, the same for every block
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(workers) as pool:
        for indices in resample_indices(n, resamples, seed):
            w = _weights(indices, dtype)
            b = w.shape[1]
            true = (true_onehot @ w).astype(np.float64).T  # (b, k): each resample's examples per true class
            tp = np.empty((b, n_trials, k))
            pred = np.empty((b, n_trials, k))

            def count(trials: range) -> None:
                for j in trials:
                    # The trial's drawn mistakes by true class (missed) and by predicted class (wrongly claimed).
                    wrong = wrongs[j]
                    missed, claimed = _class_sums(w, wrong, [ti[wrong], pis[j][wrong]], k)
                    tp[:, j] = true - missed
                    pred[:, j] = tp[:, j] + claimed

            list(pool.map(count, [range(i, n_trials, workers) for i in range(workers)]))
            boot[row:row + b] = _f1_from_counts(tp, pred, true[:, None, :], average, pos)
            row += b
    point = np.array([_f1_of_encoded(ti, pi, k, average, pos) for pi in pis])
    return point, boot


def usable_cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say, as on macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compare_to_leader(point: np.ndarray, boot: np.ndarray, leader: int,
                      confidence: float = CONFIDENCE) -> list[Significance]:
    """Each trial against trial ``leader``: its F1's percentile interval, the share of resamples
    where it beats the leader, tied when the interval of the paired difference holds 0."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    diff = boot - boot[:, [leader]]
    d_low, d_high = np.percentile(diff, [tail, 100 - tail], axis=0)
    beats = (diff > 0).mean(axis=0)
    return [Significance(float(low[i]), float(high[i]), float(beats[i]), bool(d_low[i] <= 0 <= d_high[i]),
                         float(point[i])) for i in range(len(point))]


# ---------------------------------------------------------------- a sweep's leaderboard


@dataclass(frozen=True)
class Assessment:
    """What the bootstrap said about a sweep: ranked rows with their ``significance`` set, and the
    header's ``significance`` block (None: no trial with an F1 logged usable predictions)."""

    rows: list[TrialRow]
    header: dict[str, Any] | None
    problem: str | None = None  # why nothing was computed although predictions exist


def assess(ranked: Sequence[TrialRow], predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
           average: str = "macro", pos_label: Any = 1, resamples: int = DEFAULT_RESAMPLES,
           seed: int = DEFAULT_SEED) -> Assessment:
    """Rank-ordered rows (``rank_rows``) with each scored row's ``significance`` set, from
    ``predictions`` (run id → (y_true, y_pred)). The leader is the best-ranked row with predictions;
    rows whose ``y_true`` is not the leader's (another validation set) are left out, like rows without."""
    scored = [r for r in ranked if r.has_f1 and r.run_id in predictions]
    if not scored:
        return Assessment(list(ranked), None)
    reference = np.asarray(predictions[scored[0].run_id][0])
    same = [r for r in scored if _same_truth(np.asarray(predictions[r.run_id][0]), reference)]
    try:
        point, boot = bootstrap_f1(reference, [predictions[r.run_id][1] for r in same], average, pos_label,
                                   resamples, seed)
    except ValueError as e:  # e.g. binary average over ten classes: the report says so
        return Assessment(list(ranked), None, str(e))
    stats = dict(zip((r.run_id for r in same), compare_to_leader(point, boot, 0)))
    rows = [replace(r, significance=stats.get(r.run_id)) for r in ranked]
    tied = [r for r in rows if r.significance is not None and r.significance.tied_with_best]
    header = {"method": METHOD, "resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
              "validation_size": int(len(reference)), "average": average, "pos_label": pos_label,
              "leader_run_id": same[0].run_id, "trials_compared": len(same),
              "tied_with_best_count": len(tied), "tied_ranks": [r.rank for r in tied],
              "f1_mismatch_run_ids": [r.run_id for r in rows if r.f1_mismatch]}
    return Assessment(rows, header)


def _same_truth(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all(a.astype(str) == b.astype(str)) if a.dtype != b.dtype
                                       else np.array_equal(a, b))


def tie_sentence(significance: Mapping[str, Any] | None) -> str | None:
    """One line for the terminal and the report: which trials the order among is noise; None when
    the best stands alone (or nothing was compared)."""
    if not significance or significance.get("tied_with_best_count", 0) < 2:
        return None
    ranks = significance["tied_ranks"]
    how = f"{significance['method']}, {significance['validation_size']:,} val examples"
    if ranks == list(range(1, len(ranks) + 1)):
        return f"top {len(ranks)} are statistically tied ({how}): the order among them is noise"
    shown = ", ".join(str(r) for r in ranks[:10]) + (", …" if len(ranks) > 10 else "")
    return (f"{len(ranks)} trials (ranks {shown}) are statistically tied with the best ({how}): "
            "the order among them is noise")
