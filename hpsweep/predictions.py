"""A trial's validation predictions as files: what a trainer hands over, and what hpsweep stores.

A trainer gives ``(y_true, y_pred)`` (class labels, one pair per validation example, in the same
order for every trial): a Python trainer through ``ctx.log_predictions``, a command trainer as a file
at ``$HPSWEEP_PREDICTIONS``, either CSV with the header ``y_true,y_pred`` or a NumPy ``.npz``
(``numpy.savez``) with arrays ``y_true`` and ``y_pred``; hpsweep tells them apart by content. It is
stored as one compressed ``.npz`` (``STORED_NAME``), the trial run's ``predictions/`` artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

STORED_NAME = "predictions.npz"
TRAINER_FILE = "predictions.csv"  # the name $HPSWEEP_PREDICTIONS points at (CSV or .npz content)
_ZIP_MAGIC = b"PK\x03\x04"

Predictions = tuple[np.ndarray, np.ndarray]


class PredictionsError(ValueError):
    """Predictions that cannot be used (the trial's F1 still counts; the report leaves its interval out)."""


def as_labels(values: Any, name: str) -> np.ndarray:
    """A 1-D array of class labels: integers stay integers (as small a type as holds them), anything
    else becomes text (labels are compared, never added)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise PredictionsError(f"{name} must be one label per example (1-D), got shape {arr.shape}")
    if arr.dtype.kind == "f" and len(arr) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)  # 1.0 from a CSV column or a float tensor is the class 1
    if arr.dtype.kind in "iub":
        if arr.dtype.kind == "b":
            arr = arr.astype(np.int8)
        small = np.result_type(np.min_scalar_type(arr.min()), np.min_scalar_type(arr.max())) if len(arr) else arr.dtype
        return arr.astype(small)
    return arr.astype(str)


def checked(y_true: Any, y_pred: Any) -> Predictions:
    """``(y_true, y_pred)`` as label arrays of one length; PredictionsError says what is wrong."""
    t, p = as_labels(y_true, "y_true"), as_labels(y_pred, "y_pred")
    if len(t) != len(p):
        raise PredictionsError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    if not len(t):
        raise PredictionsError("no predictions (0 validation examples)")
    if t.dtype.kind != p.dtype.kind:  # 1 and "1" must compare equal: both as text
        t, p = t.astype(str), p.astype(str)
    return t, p


def save(path: Path, y_true: Any, y_pred: Any) -> Path:
    """Store predictions compressed at ``path`` (atomically: a crash leaves no half file)."""
    t, p = checked(y_true, y_pred)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, y_true=t, y_pred=p)
    os.replace(tmp, path)
    return path


def load(path: Path) -> Predictions:
    """Predictions from a stored ``.npz`` or a trainer's file (CSV with header ``y_true,y_pred``, or .npz)."""
    with open(path, "rb") as f:
        is_npz = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        f.seek(0)
        if is_npz:
            try:
                with np.load(f, allow_pickle=False) as npz:
                    if "y_true" not in npz or "y_pred" not in npz:
                        raise PredictionsError(f"{path.name}: an .npz needs arrays 'y_true' and 'y_pred', it has "
                                               f"{sorted(npz.files)}")
                    return checked(npz["y_true"], npz["y_pred"])
            except (OSError, ValueError) as e:
                raise PredictionsError(f"{path.name}: not a readable .npz: {e}") from e
        return _read_csv(path, f)


def _read_csv(path: Path, f: BinaryIO) -> Predictions:
    import pandas as pd

    try:
        frame = pd.read_csv(f, skipinitialspace=True, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise PredictionsError(f"{path.name}: not CSV with a header y_true,y_pred: {str(e)[:200]}") from e
    missing = [c for c in ("y_true", "y_pred") if c not in frame.columns]
    if missing:
        raise PredictionsError(f"{path.name}: the header must name y_true and y_pred (missing: {', '.join(missing)}; "
                               f"found: {', '.join(map(str, frame.columns[:5]))})")
    empty = (frame[["y_true", "y_pred"]].astype(str).apply(lambda c: c.str.strip()) == "").any(axis=1)
    if empty.any():  # a short line: a label is missing, and "" is no class
        raise PredictionsError(f"{path.name}: line {int(empty.to_numpy().argmax()) + 2}: a label is missing")
    return checked(frame["y_true"].to_numpy(), frame["y_pred"].to_numpy())
