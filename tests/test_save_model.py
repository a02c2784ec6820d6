"""``ctx.save_model``: the trial's MLflow model, saved with pinned requirements and the trusted types
skops needs, in the flavour the model calls for. Timings: bench/save_model_bench.py."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pytest
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier

from trainer.contract import TrainContext


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits(return_X_y=True)


def make_ctx(tmp_path: Path) -> TrainContext:
    (tmp_path / "model").mkdir()  # hpsweep hands the trainer an empty folder
    return TrainContext(checkpoint_dir=tmp_path / "ckpt", model_dir=tmp_path / "model")


class Majority(ClassifierMixin, BaseEstimator):
    """A trainer's own estimator class: skops loads it only when the trainer says it is trusted."""

    def fit(self, X, y):
        self.label_ = int(np.bincount(y).argmax())
        return self

    def predict(self, X):
        return np.full(len(X), self.label_)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("make", [lambda: RandomForestClassifier(n_estimators=5, random_state=0),
                                  lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0)],
                         ids=["random_forest", "mlp"])
def test_a_fitted_sklearn_model_saves_and_loads_back(make, digits, tmp_path: Path) -> None:
    X, y = digits
    model = make().fit(X, y)
    ctx = make_ctx(tmp_path)
    ctx.save_model(model)

    # The folder is the trial's `model` artifact: MLmodel at its top (what the champion rule looks for).
    mlmodel = yaml.safe_load((ctx.model_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["sklearn"]["serialization_format"] == "skops"
    expected = model.predict(X[:50])
    assert (mlflow.sklearn.load_model(str(ctx.model_dir)).predict(X[:50]) == expected).all()
    assert (np.asarray(mlflow.pyfunc.load_model(str(ctx.model_dir)).predict(X[:50])) == expected).all()
    # Pinned to what is installed, so MLflow never infers them in a subprocess (seconds per trial).
    requirements = (ctx.model_dir / "requirements.txt").read_text().split()
    for dist in ("scikit-learn", "numpy", "scipy", "skops"):
        assert f"{dist}=={version(dist)}" in requirements


def test_files_the_trainer_left_are_kept_and_a_second_save_replaces_the_first(digits, tmp_path: Path) -> None:
    X, y = digits
    ctx = make_ctx(tmp_path)
    (ctx.model_dir / "confusion.json").write_text(json.dumps([[1]]))
    ctx.save_model(RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y))
    better = RandomForestClassifier(n_estimators=8, random_state=1).fit(X, y)
    ctx.save_model(better)
    assert (ctx.model_dir / "confusion.json").read_text() == "[[1]]"
    loaded = mlflow.sklearn.load_model(str(ctx.model_dir))
    assert len(loaded.estimators_) == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_type_of_the_trainers_own_is_saved_only_when_trusted(digits, tmp_path: Path) -> None:
    X, y = digits
    model = Majority().fit(X, y)
    ctx = make_ctx(tmp_path)
    own = f"{Majority.__module__}.Majority"
    with pytest.raises(ValueError, match=own.replace(".", r"\.")):
        ctx.save_model(model)
    assert list(ctx.model_dir.iterdir()) == []
    ctx.save_model(model, trusted_types=[own])
    assert (mlflow.sklearn.load_model(str(ctx.model_dir)).predict(X[:3]) == model.label_).all()


def test_a_model_of_no_supported_kind_is_refused_by_name(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    with pytest.raises(TypeError, match=r"scikit-learn estimator.*torch\.nn\.Module.*builtins\.dict"):
        ctx.save_model({"weights": [1, 2]})
    assert list(ctx.model_dir.iterdir()) == []


def test_a_torch_module_saves_with_cpu_weights_and_loads_back(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed in this environment")
    import mlflow.pytorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ctx = make_ctx(tmp_path)
    ctx.save_model(model)
    x = torch.randn(5, 4)
    loaded = mlflow.pytorch.load_model(str(ctx.model_dir))
    assert torch.equal(loaded(x), model(x))
    requirements = (ctx.model_dir / "requirements.txt").read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in requirements


def test_the_readmes_command_trainer_snippet_saves_a_loadable_forest(digits, tmp_path: Path, monkeypatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    snippet = next(b for b in blocks if "HPSWEEP_MODEL_DIR" in b and "skops_trusted_types" in b)
    X, y = digits
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("HPSWEEP_MODEL_DIR", str(tmp_path / "model"))
    exec(compile(snippet, "README.md", "exec"), {"model": model})
    assert (mlflow.sklearn.load_model(str(tmp_path / "model")).predict(X[:20]) == model.predict(X[:20])).all()
