"""The champion only ever gets better, and always loads: the rule (pure, and over the in-memory
store), then sweeps' reports built over a real MLflow registry (SQLite) with real sklearn models."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hpsweep.model import Outcome, PlannedTrial, TrialRow, TrialState
from hpsweep.report.assemble import build_report, crown, decide_champion, recall, sweep_meta
from hpsweep.store import TAG_DATA_VERSION, SweepStore, runs
from hpsweep.store.registry import RegisteredVersion
from tests.memstore import InMemoryStore

TRAIN, VAL, OTHER_VAL = "1" * 32, "a" * 32, "b" * 32
DATA = f"{TRAIN}/{VAL}"


def best(f1: float, run_id: str = "new") -> TrialRow:
    return TrialRow(index=1, hparams={}, state=TrialState.FINISHED, run_id=run_id, f1=f1)


def held(f1: float | None = 0.98, data_version: str | None = DATA) -> RegisteredVersion:
    return RegisteredVersion("1", "old", f1, data_version, "s-1")


# ---------------------------------------------------------------- the rule


def test_the_champion_moves_only_to_a_better_model_on_the_same_validation_data():
    stay = decide_champion(held(0.98), best(0.9757), DATA, loadable=True)
    assert not stay.move
    assert stay.note == "champion unchanged (F1 0.9800 from sweep s-1): this sweep's best F1 0.9757 does not beat it"
    assert not decide_champion(held(0.98), best(0.98), DATA, loadable=True).move  # a tie keeps the champion
    # Other training data, same validation data: the F1s mean the same, the worse one still loses.
    assert not decide_champion(held(0.98), best(0.97), f"{'2' * 32}/{VAL}", loadable=True).move
    better = decide_champion(held(0.98), best(0.99), DATA, loadable=True)
    assert better.move and better.note == "champion moved: F1 0.9900 beats 0.9800 (version 1 from sweep s-1)"
    first = decide_champion(None, best(0.5), DATA, loadable=True)
    assert first.move and first.note.startswith("champion registered: the first")


def test_a_champion_measured_on_other_or_unknown_validation_data_is_replaced_and_the_note_says_why():
    other = decide_champion(held(0.99), best(0.6), f"{TRAIN}/{OTHER_VAL}", loadable=True)
    assert other.move and "measured on other validation data" in other.note and "not comparable" in other.note
    unknown = decide_champion(held(0.99, data_version=None), best(0.6), DATA, loadable=True)
    assert unknown.move and "unknown validation data" in unknown.note


def test_the_champion_stays_when_the_best_is_not_loadable_or_is_the_champion_already():
    plain = decide_champion(held(0.5), best(0.9), DATA, loadable=False)
    assert not plain.move and plain.note.startswith("champion unchanged (F1 0.5000 from sweep s-1)")
    assert "not an MLflow model (no model/MLmodel)" in plain.note and "mlflow.<flavor>.save_model" in plain.note
    assert decide_champion(None, best(0.9), DATA, loadable=False).note.startswith("no champion: ")
    same = decide_champion(held(0.98), best(0.98, run_id="old"), DATA, loadable=True)
    assert not same.move and "is the champion already" in same.note
    assert not decide_champion(held(), None, DATA, loadable=True).move  # no trial has an F1


# ---------------------------------------------------------------- over the in-memory store


def mem_sweep(store: InMemoryStore, sweep_id: str, f1: float, val: str = VAL) -> tuple[dict, TrialRow]:
    exp = store.ensure_experiment("m")
    run_id = store.start_trial_run(exp, sweep_id, 1, {"i": 1}, f"{sweep_id}-k",
                                   {TAG_DATA_VERSION: f"{TRAIN}/{val}"})
    store.finish_trial_run(run_id, Outcome(True, f1, started_at=0.0, ended_at=1.0))
    meta = {"name": "m", "sweep_id": sweep_id, "data_version": f"{TRAIN}/{val}"}
    return meta, store.runs[run_id].row


def test_hpsweep_report_recalls_whether_a_past_sweep_moved_the_champion():
    store = InMemoryStore()
    meta1, best1 = mem_sweep(store, "s-1", 0.9)
    moved = crown(store, meta1, best1)
    meta2, best2 = mem_sweep(store, "s-2", 0.8)
    assert crown(store, meta2, best2)["champion_moved"] is False and store.versions["m"] == 1
    assert recall(store, meta1, best1) == moved  # nothing changed since: the same header again
    assert recall(store, meta2, best2)["champion_note"].startswith("champion unchanged (F1 0.9000 from sweep s-1)")
    meta3, best3 = mem_sweep(store, "s-3", 0.95)
    assert crown(store, meta3, best3)["champion_moved"] is True
    again = recall(store, meta1, best1)
    assert again["champion_moved"] is True and again["champion_note"].endswith(
        "; the champion is now version 2 (F1 0.9500 from sweep s-3)")


def test_no_register_leaves_the_registry_alone(tmp_path):
    store = InMemoryStore()
    meta, row = mem_sweep(store, "s-1", 0.9)

    def untouchable(*_args):
        raise AssertionError("--no-register called the registry")
    store.champion = store.has_model = store.register_champion = store.version_of = untouchable
    header = build_report(store, {**sweep_meta("s-1", "m", "1", "p", "memory://", {}, 1), **meta}, [], {},
                          tmp_path, register=False)[1]
    assert (header["champion"], header["champion_moved"]) == (None, False)
    assert header["champion_note"] == "registry skipped (--no-register)"
    assert json.loads((tmp_path / "best.json").read_text())["champion_note"] == "registry skipped (--no-register)"


def test_no_register_flag_and_params_yaml_set_the_config(tmp_path):
    from hpsweep.cli import build_parser
    from hpsweep.config import build_config

    paths = ["--combinations", "c.yaml", "--spec", "s.yaml", "--train", "t.csv", "--val", "v.csv"]
    fields = ("combinations", "spec", "train", "val", "register")

    def config(argv: list[str], params: Path):
        args = build_parser().parse_args(["run", *paths, *argv])
        return build_config({k: getattr(args, k) for k in fields}, params)
    params = tmp_path / "params.yaml"
    assert config([], params).register is True
    assert config(["--no-register"], params).register is False
    params.write_text("sweep: {register: false}\n")
    assert config([], params).register is False


# ---------------------------------------------------------------- over a real MLflow registry


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("champion")


@pytest.fixture(scope="module")
def store(root: Path) -> SweepStore:
    return SweepStore(MlflowClient(f"sqlite:///{root / 'mlflow.db'}"))


X = np.array([[0.0], [1.0], [2.0], [3.0]])


@pytest.fixture(scope="module")
def mlflow_model(root: Path) -> Path:
    """A tiny sklearn model saved as an MLflow model (what a trainer leaves in HPSWEEP_MODEL_DIR)."""
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    path = root / "saved-model"
    mlflow.sklearn.save_model(LogisticRegression().fit(X, [0, 0, 1, 1]), str(path), pip_requirements=["scikit-learn"])
    return path


@pytest.fixture(scope="module")
def plain_model(root: Path) -> Path:
    """A plain file (a joblib dump): not an MLflow model."""
    path = root / "plain-model"
    path.mkdir()
    (path / "model.joblib").write_bytes(b"\x80\x04not an MLflow model")
    return path


class Sweeps:
    """Sweeps of one name, each a parent run and trial runs as the sweep writes them, closed by build_report."""

    def __init__(self, store: SweepStore, root: Path, name: str):
        self.store, self.root, self.name = store, root, name
        self.exp = store.client.create_experiment(name, artifact_location=str(root / "artifacts" / name))
        self.count = 0

    def run(self, f1s: list[float], model: Path, val: str = VAL, reuse: tuple[str, ...] = ()) -> tuple[dict, list]:
        self.count += 1
        sweep_id, client = f"{self.name}-{self.count}", self.store.client
        provenance = {TAG_DATA_VERSION: f"{TRAIN}/{val}"}
        parent = self.store.start_parent_run(self.exp, sweep_id, provenance)
        trials = []
        for i, f1 in enumerate(f1s, start=1):
            key = f"{sweep_id}-k{i}"
            run_id = runs.start_trial_run(client, self.exp, parent, sweep_id, i, {"i": i}, key, 1, provenance)
            client.log_artifacts(run_id, str(model), "model")
            self.store.finish_trial_run(run_id, Outcome(True, f1, started_at=0.0, ended_at=1.0))
            trials.append(PlannedTrial(i, {"i": i}, key))
        reused = {}
        for run_id in reuse:  # an earlier FINISHED run standing in for a combination of this sweep
            row = self.store.trials_by_run_id(self.exp, [run_id])[run_id]
            trials.append(PlannedTrial(len(trials) + 1, row.hparams, row.key))
            reused[row.key] = row
        meta = sweep_meta(sweep_id, self.name, self.exp, parent, client.tracking_uri, provenance, 1)
        rows, header, _ = build_report(self.store, meta, trials, reused, self.root / "reports" / sweep_id,
                                       register=True)
        return header, rows

    def report(self, file: str) -> str:
        return (self.root / "reports" / f"{self.name}-{self.count}" / file).read_text()

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.store.client.search_model_versions(f"name = '{self.name}'"))

    def champion_run(self) -> str:
        return self.store.client.get_model_version_by_alias(self.name, "champion").run_id


def test_a_worse_sweep_leaves_the_champion_and_registers_no_new_version(store, root, mlflow_model):
    sweeps = Sweeps(store, root, "worse")
    first, rows = sweeps.run([0.95, 0.98], mlflow_model)
    assert first["champion_moved"] is True and sweeps.champion_run() == rows[0].run_id and sweeps.versions() == ["1"]

    second, _ = sweeps.run([0.9757, 0.5], mlflow_model)
    assert sweeps.versions() == ["1"] and sweeps.champion_run() == rows[0].run_id
    note = "champion unchanged (F1 0.9800 from sweep worse-1): this sweep's best F1 0.9757 does not beat it"
    assert (second["champion"], second["champion_moved"], second["champion_note"]) == (first["champion"], False, note)
    written = json.loads(sweeps.report("best.json"))
    assert (written["champion"], written["champion_moved"], written["champion_note"]) == (first["champion"], False,
                                                                                          note)
    assert json.loads(sweeps.report("leaderboard.json"))["champion_note"] == note
    assert f"- champion: `{first['champion']}` (not moved by this sweep)" in sweeps.report("leaderboard.md")
    assert f"- champion decision: {note}" in sweeps.report("leaderboard.md")


def test_a_better_sweep_moves_the_champion(store, root, mlflow_model):
    sweeps = Sweeps(store, root, "better")
    sweeps.run([0.98], mlflow_model)
    header, rows = sweeps.run([0.99, 0.7], mlflow_model)
    assert sweeps.versions() == ["1", "2"] and sweeps.champion_run() == rows[0].run_id
    assert header["champion"] == f"models:/better@champion (version 2, run {rows[0].run_id})"
    assert header["champion_moved"] is True
    assert header["champion_note"] == "champion moved: F1 0.9900 beats 0.9800 (version 1 from sweep better-1)"


def test_the_champion_version_is_described_by_its_f1_sweep_and_hparams(store, root, mlflow_model):
    sweeps = Sweeps(store, root, "described")
    _, rows = sweeps.run([0.7, 0.93], mlflow_model)
    version = store.client.get_model_version_by_alias("described", "champion")
    assert version.description == (f"F1 0.9300 on the validation data, trial {rows[0].run_name} of sweep "
                                   "described-1: i=2")
    assert version.tags["f1"] == "0.93" and version.tags["hpsweep.sweep_id"] == "described-1"
    assert json.loads(version.tags["hpsweep.hparams"]) == {"i": 2}


def test_a_registered_run_is_never_registered_again(store, root, mlflow_model):
    sweeps = Sweeps(store, root, "again")
    _, rows = sweeps.run([0.98], mlflow_model)
    winner = rows[0].run_id
    rerun, _ = sweeps.run([], mlflow_model, reuse=(winner,))  # a re-run that reuses the winner
    assert sweeps.versions() == ["1"] and rerun["champion_moved"] is False
    assert "is the champion already" in rerun["champion_note"]
    # New validation data: its best replaces the champion, however low, and the report says why.
    other, _ = sweeps.run([0.5], mlflow_model, val=OTHER_VAL)
    assert other["champion_moved"] is True and "measured on other validation data" in other["champion_note"]
    assert sweeps.versions() == ["1", "2"]
    # Back on the first validation data, the winner comes back under its own version: no version 3.
    back, _ = sweeps.run([], mlflow_model, reuse=(winner,))
    assert back["champion_moved"] is True and sweeps.champion_run() == winner and sweeps.versions() == ["1", "2"]
    assert back["champion"] == f"models:/again@champion (version 1, run {winner})"


def test_a_model_mlflow_cannot_load_is_not_registered_and_the_report_says_so(store, root, mlflow_model, plain_model):
    sweeps = Sweeps(store, root, "plain")
    header, rows = sweeps.run([0.9], plain_model)
    assert sweeps.versions() == [] and (header["champion"], header["champion_moved"]) == (None, False)
    assert header["champion_note"].startswith("no champion: this sweep's best") and "no model/MLmodel" in \
        header["champion_note"]
    assert "not an MLflow model" in json.loads(sweeps.report("best.json"))["champion_note"]
    assert "not an MLflow model" in sweeps.report("leaderboard.md")
    # Nor does a better plain file displace a loadable champion.
    first, _ = sweeps.run([0.8], mlflow_model)
    better_plain, _ = sweeps.run([0.95], plain_model)
    assert sweeps.versions() == ["1"] and better_plain["champion"] == first["champion"]
    assert better_plain["champion_note"].startswith("champion unchanged (F1 0.8000 from sweep plain-2)")
    assert "mlflow.<flavor>.save_model into HPSWEEP_MODEL_DIR" in better_plain["champion_note"]


def test_the_champion_loads_with_pyfunc_and_predicts(store, root, mlflow_model, monkeypatch):
    sweeps = Sweeps(store, root, "loads")
    sweeps.run([0.9], mlflow_model)
    before = mlflow.get_tracking_uri()
    # set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ: put that back too, or every
    # process a later test starts from this one (a Prefect worker) inherits this store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(store.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model("models:/loads@champion")
    finally:
        mlflow.set_tracking_uri(before)
    assert list(model.predict(X)) == [0, 0, 1, 1]
