"""Reuse never returns a stale F1: a trial's key covers all of the trainer's code and the Python
environment, and a plan says why a previous sweep's results are not reused (real MLflow on a
temporary SQLite store; the last test through the real CLI)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep import plan, store
from hpsweep.inputs import SweepInputs, load_inputs
from hpsweep.model import Outcome
from hpsweep.store import SweepStore, runs
from hpsweep.versions import TAG_CODE_MANIFEST, TAG_ENV_VERSION, code_manifest_tag
from tests.conftest import Project
from tests.test_versions import install, write

PREVIOUS = {"hpsweep.spec_hash": "s1", "hpsweep.data_version": "t1/v1", "hpsweep.code_version": "c1",
            TAG_ENV_VERSION: "e1"}


# ---------------------------------------------------------------- the explanation


def test_the_explanation_names_each_version_that_changed():
    assert plan.reuse_explanation(None, PREVIOUS) is None  # no earlier sweep
    assert plan.reuse_explanation(PREVIOUS, dict(PREVIOUS)) is None  # nothing changed: new hparams only
    now = {**PREVIOUS, "hpsweep.data_version": "t1/v2", "hpsweep.code_version": "c2", TAG_ENV_VERSION: "e2"}
    assert plan.reuse_explanation(PREVIOUS, now, ["trainer/model_def.py"]) == \
        "data changed (val), code changed (trainer/model_def.py), environment changed"
    assert plan.reuse_explanation(PREVIOUS, {**PREVIOUS, "hpsweep.spec_hash": "s2"}) == "spec changed"
    assert plan.reuse_explanation(PREVIOUS, {**PREVIOUS, "hpsweep.code_version": "c2"}) == "code changed"
    assert plan.reuse_explanation(PREVIOUS, {**PREVIOUS, "hpsweep.code_version": "c2"},
                                  [f"m{i}.py" for i in range(5)]) == "code changed (m0.py, m1.py, m2.py and 2 more)"
    older = {k: v for k, v in PREVIOUS.items() if k != TAG_ENV_VERSION}  # runs of an hpsweep before env versions
    assert plan.reuse_explanation(older, PREVIOUS) == "environment not recorded on earlier runs"
    assert plan.describe_reuse(12, 0, "code changed (a.py)") == "12 to train: code changed (a.py), 0 reused"
    assert plan.describe_reuse(0, 12, "code changed (a.py)") == "0 to train, 12 reused"


def test_the_changed_files_are_the_edited_new_and_removed_ones():
    before = json.dumps({"a.py": "11111111", "b.py": "22222222", "gone.py": "33333333"})
    now = {"a.py": "11111111" + "a" * 24, "b.py": "99999999" + "b" * 24, "new.py": "4" * 32}
    assert plan.changed_code_files(before, now) == ["b.py", "gone.py (removed)", "new.py (new)"]
    assert plan.changed_code_files(None, now) is None  # the run recorded no manifest


def test_a_manifest_too_big_for_an_mlflow_tag_is_left_out(tmp_path: Path, monkeypatch):
    from hpsweep.inputs import ModelSpec

    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"src/small.py": ""})
    small = ModelSpec.model_validate({"trainer": {"command": ["python", "x.py"]}, "code": ["src"]})
    assert json.loads(code_manifest_tag(small)[TAG_CODE_MANIFEST]) == {"src/small.py": "d41d8cd9"}
    write(tmp_path, {f"src/{'module_' * 8}{i}.py": "" for i in range(100)})
    assert code_manifest_tag(small) == {}  # over 5000 characters: a later plan says only "code changed"


# ---------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    return MlflowClient(store.resolve_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"))


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_the_versions_compared_with_are_the_newest_finished_trials(client):
    exp = store.ensure_experiment(client, unique("versions"))
    names = ["hpsweep.code_version", TAG_ENV_VERSION]
    assert runs.latest_trial_tags(client, exp, names) is None
    for code, ok in (("c1", True), ("c2", True), ("c3", False), ("c4", None)):
        run_id = store.start_trial_run(client, exp, "parent", "sw", 1, {"lr": 0.1}, "k", 1,
                                       tags={"hpsweep.code_version": code})
        if ok is not None:
            store.finish_trial_run(client, run_id, Outcome(ok, 0.5 if ok else None, None if ok else "boom",
                                                           started_at=0, ended_at=1))
        time.sleep(0.01)  # start times a millisecond apart at least
    assert runs.latest_trial_tags(client, exp, names) == {"hpsweep.code_version": "c2"}  # not failed, not running


# ---------------------------------------------------------------- a plan after a previous sweep


def record_sweep(client: MlflowClient, name: str, inputs: SweepInputs) -> str:
    """A finished previous sweep of ``inputs``: its trial runs carry the tags a sweep gives them."""
    trials, versions = plan.plan_trials(inputs)
    exp = store.ensure_experiment(client, name)
    parent = store.start_parent_run(client, exp, f"{name}-1", versions)
    for t in trials:
        run_id = store.start_trial_run(client, exp, parent, f"{name}-1", t.index, t.hparams, t.key, 1,
                                       tags={**versions, **code_manifest_tag(inputs.spec)})
        store.finish_trial_run(client, run_id, Outcome(True, 0.5, started_at=0, ended_at=1))
    return exp


def replan(client: MlflowClient, exp: str, inputs: SweepInputs) -> tuple[int, str | None]:
    """(trials reused, why the others are not), as `hpsweep plan` and the sweep work them out."""
    trials, versions = plan.plan_trials(inputs)
    sweep_store = SweepStore(client)
    reused = plan.reusable_runs(sweep_store, exp, trials, versions, retrain=False)
    return len(reused), plan.why_not_reused(sweep_store, exp, inputs.spec, versions, retrain=False)


def command_project(root: Path, argv: str) -> SweepInputs:
    write(root, {"combos.yaml": "combinations:\n  - {lr: 0.1}\n  - {lr: 0.2}\n", "data/train.csv": "x\n1\n",
                 "data/val.csv": "x\n2\n", "spec.yaml": f"name: cmd\ntrainer:\n  command: {argv}\n"})
    return load_inputs(root / "combos.yaml", root / "spec.yaml", root / "data/train.csv", root / "data/val.csv", 1)


def test_the_in_memory_store_gives_the_same_explanation_and_retrain_is_one():
    from hpsweep.inputs import ModelSpec
    from tests.memstore import InMemoryStore

    mem = InMemoryStore()
    exp = mem.ensure_experiment("mem")
    spec = ModelSpec.model_validate({"trainer": {"command": ["true"]}})
    assert plan.why_not_reused(mem, exp, spec, PREVIOUS, retrain=False) is None  # no earlier trial
    run_id = mem.start_trial_run(exp, "sw", 1, {"lr": 0.1}, "k", versions=PREVIOUS)
    mem.finish_trial_run(run_id, Outcome(True, 0.5, started_at=0, ended_at=1))
    assert plan.why_not_reused(mem, exp, spec, {**PREVIOUS, "hpsweep.spec_hash": "s2"}, False) == "spec changed"
    assert plan.why_not_reused(mem, exp, spec, PREVIOUS, retrain=True) == "--retrain given"


def test_a_command_trainers_helper_edit_retrains_every_trial_and_says_which_file(client, tmp_path: Path, monkeypatch):
    root = tmp_path / "proj"
    write(root, {"trainer/train.py": "import helpers\n", "trainer/helpers.py": "SCALE = True\n"})
    monkeypatch.chdir(root)
    inputs = command_project(root, f"[{sys.executable!r}, trainer/train.py]")
    exp = record_sweep(client, unique("cmd"), inputs)
    assert replan(client, exp, inputs) == (2, None)
    (root / "trainer" / "helpers.py").write_text("SCALE = False\n")  # changes every F1
    assert replan(client, exp, inputs) == (0, "code changed (trainer/helpers.py)")
    (root / "trainer" / "helpers.py").write_text("SCALE = True\n")  # reverted: the same code again
    assert replan(client, exp, inputs) == (2, None)


def test_an_upgraded_package_retrains_every_trial(client, tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    install(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    root = tmp_path / "proj"
    write(root, {"train.py": ""})
    monkeypatch.chdir(root)
    inputs = command_project(root, f"[{sys.executable!r}, train.py]")
    exp = record_sweep(client, unique("cmd"), inputs)
    before = [t.key for t in plan.plan_trials(inputs)[0]]
    install(site, "1.1")  # pip install -U tinypkg
    assert [t.key for t in plan.plan_trials(inputs)[0]] != before
    assert replan(client, exp, inputs) == (0, "environment changed")


@pytest.mark.slow
def test_plan_names_the_edited_helper_of_an_entry_point(project: Project, monkeypatch):
    pkg = f"trainer_{uuid.uuid4().hex[:8]}"
    write(project.root, {f"{pkg}/__init__.py": "", f"{pkg}/model_def.py": "SCALE = True\n",
                         f"{pkg}/train.py": "from .model_def import SCALE\n\n\ndef train(hparams, data, ctx):\n"
                                            "    return 0.5\n",
                         "params/combinations.yaml": "combinations:\n  - {lr: 0.1}\n  - {lr: 0.2}\n  - {lr: 0.3}\n",
                         "params/spec.yaml": f"name: helpers\ntrainer:\n  entrypoint: {pkg}.train:train\n"})
    monkeypatch.chdir(project.root)
    inputs = load_inputs(Path("params/combinations.yaml"), Path("params/spec.yaml"), Path("data/train.csv"),
                         Path("data/val.csv"), 1)
    record_sweep(MlflowClient(store.resolve_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")), "helpers",
                 inputs)
    args = ("plan", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1")
    first = project.hpsweep(*args, "--json", timeout=300)
    assert first.returncode == 0, first.stderr
    assert (json.loads(first.stdout)["reused"], json.loads(first.stdout)["why_not_reused"]) == (3, None)

    (project.root / pkg / "model_def.py").write_text("SCALE = False\n")  # a module the entry point imports
    second = project.hpsweep(*args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"3 to train: code changed ({pkg}/model_def.py), 0 reused" in second.stdout
