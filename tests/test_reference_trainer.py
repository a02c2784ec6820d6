"""The demo data preparation and the reference MLP trainer, against the trainer contract."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest

from trainer.contract import DataRefs, TrainContext
from trainer import reference
from trainer.prepare import load_xy, prepare
from trainer.reference import train

FAST = {"hidden": 32, "lr": 0.01}  # reaches a high F1 within a few epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataRefs:
    train_csv, val_csv = prepare(tmp_path_factory.mktemp("data"))
    return DataRefs(train=train_csv, val=val_csv)


class Recorder:
    """A ``_reporter`` that records metrics and can simulate a crash at a given step."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.fail_at = fail_at

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.fail_at:
            raise RuntimeError(f"simulated crash at step {step}")
        self.steps.append((step, metrics))

    def f1s(self) -> dict[int, float]:
        return {step: m["val_f1"] for step, m in self.steps}


def make_ctx(root: Path, rec: Recorder, **settings: Any) -> TrainContext:
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)  # hpsweep hands the trainer an empty folder
    return TrainContext(
        checkpoint_dir=root / "ckpt",
        model_dir=model_dir,
        settings={"epochs": 3, "seed": 0, **settings},
        _reporter=rec,
    )


def test_prepare_writes_stratified_disjoint_split(data: DataRefs) -> None:
    tr, val = pd.read_csv(data.train), pd.read_csv(data.val)
    assert list(tr.columns) == [f"p{i}" for i in range(64)] + ["label"]
    assert (len(tr), len(val)) == (1347, 450)  # 1797 digits, 25% held out
    assert set(val["label"]) == set(range(10))
    # Every digit image in the dataset is unique, so shared rows would mean leakage.
    features = [f"p{i}" for i in range(64)]
    assert not set(map(tuple, tr[features].values)) & set(map(tuple, val[features].values))
    assert not list(Path(data.train).parent.glob(".*"))  # no temp files left behind

    X, y = load_xy(data.val)
    assert X.shape == (450, 64) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert y.shape == (450,) and np.issubdtype(y.dtype, np.integer)


def test_load_xy_names_the_file_without_label(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"p0": [1, 2]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="bad.csv.*label"):
        load_xy(bad)


def test_train_reports_every_epoch_and_returns_last_f1(data: DataRefs, tmp_path: Path) -> None:
    rec = Recorder()
    f1 = train(FAST, data, make_ctx(tmp_path, rec))
    assert isinstance(f1, float) and 0.0 <= f1 <= 1.0
    assert [step for step, _ in rec.steps] == [1, 2, 3]
    assert all(set(m) == {"val_f1", "train_loss"} for _, m in rec.steps)
    assert f1 == rec.f1s()[3]
    assert f1 > 0.9


def test_hparams_change_the_result(data: DataRefs, tmp_path: Path) -> None:
    good = train(FAST, data, make_ctx(tmp_path / "a", Recorder()))
    starved = train({"hidden": 2, "lr": 1e-3}, data, make_ctx(tmp_path / "b", Recorder()))
    assert starved < good - 0.3


def test_resumed_run_matches_uninterrupted(
    data: DataRefs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = Recorder()
    expected = train(FAST, data, make_ctx(tmp_path / "full", full, epochs=5))

    # Crash while reporting epoch 3: its checkpoint is never written, so epoch 2 is newest.
    root = tmp_path / "crashy"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(FAST, data, make_ctx(root, Recorder(fail_at=3), epochs=5))

    resumed = Recorder()
    with caplog.at_level(logging.INFO, logger="hpsweep.trainer"):
        got = train(FAST, data, make_ctx(root, resumed, epochs=5))
    assert "resumed from epoch 2" in caplog.text
    assert [step for step, _ in resumed.steps] == [3, 4, 5]  # only the remaining epochs
    assert resumed.steps == full.steps[2:]  # identical metrics, epoch by epoch
    assert got == expected

    # A retry after the last checkpoint trains nothing and still returns the same F1.
    again = Recorder()
    assert train(FAST, data, make_ctx(root, again, epochs=5)) == expected
    assert again.steps == []


def test_model_dir_holds_a_loadable_mlflow_model(data: DataRefs, tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Recorder())
    f1 = train(FAST, data, ctx)
    assert (ctx.model_dir / "MLmodel").is_file()
    model = mlflow.sklearn.load_model(str(ctx.model_dir))
    X, y = load_xy(data.val)
    assert (model.predict(X) == y).mean() == pytest.approx(f1, abs=0.05)

    # A retry that finds this earlier save replaces it rather than failing.
    train(FAST, data, make_ctx(tmp_path, Recorder()))
    assert (ctx.model_dir / "MLmodel").is_file()


class Clock:
    """``trainer.reference``'s view of the time module, recording sleeps instead of sleeping them."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_epoch_sleep_setting_slows_each_epoch(data: DataRefs, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(reference, "time", clock)
    rec = Recorder()
    train(FAST, data, make_ctx(tmp_path, rec, epochs=2, epoch_sleep_s=0.2))
    assert clock.slept == [0.2, 0.2]  # a pause after each epoch, 0.4 s in all
    assert [step for step, _ in rec.steps] == [1, 2]


def test_the_reference_trainer_logs_the_predictions_its_f1_comes_from(data: DataRefs, tmp_path: Path) -> None:
    from hpsweep.report.significance import f1_from_labels
    from trainer.prepare import load_xy

    logged: list[tuple[Any, Any]] = []
    ctx = make_ctx(tmp_path, Recorder())
    ctx._predictions = lambda y_true, y_pred: logged.append((y_true, y_pred))
    f1 = train(FAST, data, ctx)
    ((y_true, y_pred),) = logged
    assert list(y_true) == list(load_xy(data.val)[1]) and len(y_pred) == len(y_true)
    assert f1_from_labels(y_true, y_pred, "macro") == pytest.approx(f1, abs=1e-12)  # the spec's default metric
