"""hpsweep.predictions: what a trainer may hand over, and what is stored."""

from __future__ import annotations

import numpy as np
import pytest

from hpsweep import predictions
from hpsweep.predictions import PredictionsError


def test_a_csv_and_an_npz_from_a_command_trainer_read_the_same(tmp_path):
    csv = tmp_path / "predictions.csv"
    csv.write_text("y_true,y_pred\n1,1\n0,1\n2,2\n")
    npz = tmp_path / "other.csv"  # the name says nothing: the content does
    with open(npz, "wb") as f:
        np.savez(f, y_true=np.array([1, 0, 2]), y_pred=np.array([1, 1, 2]))
    for path in (csv, npz):
        y_true, y_pred = predictions.load(path)
        assert y_true.tolist() == [1, 0, 2] and y_pred.tolist() == [1, 1, 2]


def test_stored_predictions_are_compressed_and_keep_text_labels(tmp_path):
    stored = predictions.save(tmp_path / predictions.STORED_NAME, ["cat", "dog"] * 50_000, ["cat"] * 100_000)
    assert stored.stat().st_size < 50_000  # 100,000 rows
    y_true, y_pred = predictions.load(stored)
    assert y_true[:2].tolist() == ["cat", "dog"] and set(y_pred.tolist()) == {"cat"}


@pytest.mark.parametrize("text, message", [
    ("truth,guess\n1,1\n", "the header must name y_true and y_pred"),
    ("y_true,y_pred\n", "no predictions"),
    ("y_true,y_pred\n1,1\n2\n", "line 3: a label is missing"),
])
def test_unusable_csv_says_why(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(PredictionsError, match=message):
        predictions.load(path)


def test_lengths_must_match():
    with pytest.raises(PredictionsError, match="y_true has 3 labels but y_pred has 2"):
        predictions.checked([1, 2, 3], [1, 2])


def test_a_command_trainers_file_is_stored_compressed_and_an_unusable_one_is_left_out(tmp_path, caplog):
    from hpsweep.runtime.runner import TrialPaths, _stored_predictions

    paths = TrialPaths(tmp_path)
    assert not _stored_predictions(paths)  # the trainer wrote none: nothing to upload
    paths.trainer_predictions.write_text("y_true,y_pred\n1,1\n2,1\n")
    assert _stored_predictions(paths)
    assert predictions.load(paths.predictions)[1].tolist() == [1, 1]

    other = TrialPaths(tmp_path / "other")
    other.root.mkdir()
    other.trainer_predictions.write_text("y_true,y_pred\n1\n")
    assert not _stored_predictions(other) and not other.predictions.exists()
    assert "predictions in HPSWEEP_PREDICTIONS left out" in caplog.text
