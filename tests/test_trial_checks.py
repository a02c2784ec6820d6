"""What a trial checks at run time: that the data it reads is the version the sweep recorded (a
cheap seal, a re-hash only when the seal changed), and that the trainer's result file is a bounded
``{"f1": <number>}`` (each other shape has its own reason)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep import dvcdata, store
from hpsweep.dvcdata import data_ref
from hpsweep.engine.outcome import check_f1, read_result, result_json
from hpsweep.model import TrialJob
from hpsweep.runtime.datacheck import DATA_CHANGED, changed_reason, data_changes, version_read
from hpsweep.runtime.durable import CheckpointSync, restore_checkpoints
from hpsweep.store.tags import TAG_DATA_VERSION, TAG_TRIAL_KEY

# ---------------------------------------------------------------- the result file


def reason_for(path: Path, text: str | bytes) -> str | None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return check_f1(read_result(path)).reason


def test_a_result_that_is_not_an_object_says_what_it_holds(tmp_path: Path):
    result = tmp_path / "result.json"
    assert reason_for(result, "[0.5]") == 'result file holds [0.5], not {"f1": <float>}'
    assert reason_for(result, "0.5") == 'result file holds 0.5, not {"f1": <float>}'
    assert reason_for(result, "") == 'result file is empty (expected {"f1": <float>})'
    assert reason_for(result, "f1=0.5").startswith("result file is not JSON (Expecting value")
    assert reason_for(result, '{"f1": [0.5]}') == "F1 [0.5] is not a number"
    assert reason_for(result, '{"score": 0.5}').startswith("trainer wrote no F1")
    assert reason_for(result, '{"f1": 0.5}') is None


def test_an_integer_too_long_for_a_float_is_out_of_range_not_missing(tmp_path: Path):
    reason = reason_for(tmp_path / "result.json", '{"f1": ' + "1" * 5000 + "}")
    assert reason == "F1 11111111111111111111… (an integer of 5000 digits) is outside [0, 1]"
    # The same value returned by a Python trainer: written without raising, judged the same way.
    returned = reason_for(tmp_path / "returned.json", result_json(10 ** 5000))
    assert returned == "F1 (an integer of about 5001 digits) is outside [0, 1]"
    assert reason_for(tmp_path / "list.json", result_json([0.5])) == "F1 [0.5] is not a number"


def test_reasons_quote_at_most_200_characters_of_a_value(tmp_path: Path):
    for text in ['{"f1": "' + "x" * 10_000 + '"}', "[" * 100_000 + "]" * 100_000, "nonsense " * 10_000,
                 json.dumps([list(range(1000))] * 50)]:
        reason = reason_for(tmp_path / "result.json", text)
        assert reason is not None and len(reason) < 300, reason[:500]
    assert reason_for(tmp_path / "result.json", "[" * 100_000 + "]" * 100_000).startswith(
        "result file is not JSON (nested too deep)")


def test_a_result_file_over_the_limit_is_refused_without_being_read(tmp_path: Path):
    result = tmp_path / "result.json"
    with open(result, "wb") as f:
        f.truncate(200_000_000)  # sparse: 200 MB that cost no disk
    tracemalloc.start()
    try:
        outcome = check_f1(read_result(result))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.reason == "result file is 200.0 MB, more than the 1 MB limit"
    assert peak < 2_000_000  # bytes allocated while judging: the file was never read into memory
    result.write_text('{"f1": 0.5, "notes": "' + "x" * 1_000_000 + '"}')
    assert check_f1(read_result(result)).reason == "result file is 1.0 MB, more than the 1 MB limit"


# ---------------------------------------------------------------- the data seal


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Every file hpsweep hashes from now on (a fresh hash memo, so nothing is remembered)."""
    monkeypatch.setenv(dvcdata.MEMO_ENV, str(tmp_path / "memo.json"))
    hashed: list[Path] = []
    real = dvcdata.file_md5

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(dvcdata, "file_md5", counting)
    return hashed


def sweep_job(train: Path, val: Path) -> TrialJob:
    """A trial job as the sweep makes it: data refs (with seals) and the data version tag."""
    refs = {"train": data_ref(train).as_dict(), "val": data_ref(val).as_dict()}
    version = f"{refs['train']['md5']}/{refs['val']['md5']}"
    return TrialJob(sweep_id="s", experiment_id="", parent_run_id="", tracking_uri="", index=1, hparams={},
                    trial_key="k", attempt=1, settings={}, train=str(train), val=str(val),
                    versions={TAG_DATA_VERSION: version}, data=refs)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "train.csv").write_text("x,y\n1,0\n2,1\n")
    (tmp_path / "val.csv").write_text("x,y\n3,1\n")
    return tmp_path / "train.csv", tmp_path / "val.csv"


def test_unchanged_data_is_checked_without_reading_it(data, hashes):
    job = sweep_job(*data)
    hashes.clear()
    assert data_changes(job, {"train": job.train, "val": job.val}) == []
    assert hashes == []  # one stat per file, no re-hash


def test_data_rewritten_after_the_sweep_started_fails_the_trial(data, hashes):
    train, val = data
    job = sweep_job(train, val)
    recorded = job.data["val"]["md5"]
    val.write_text("x,y\n3,1\n4,0\n")
    changes = data_changes(job, {"train": job.train, "val": job.val})
    now = dvcdata.content_md5(val)
    assert changed_reason(changes) == f"{DATA_CHANGED}: {val} (recorded {recorded[:8]}, now {now[:8]})"
    assert version_read(job, changes) == f"{job.data['train']['md5']}/{now}"  # what the trial read, for its tag


def test_data_touched_with_the_same_bytes_passes_after_one_rehash(data, hashes):
    train, val = data
    job = sweep_job(train, val)
    val.write_bytes(val.read_bytes())  # same bytes, new mtime
    os.utime(val, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    hashes.clear()
    assert data_changes(job, {"train": job.train, "val": job.val}) == []
    assert hashes == [val.resolve()]


def test_a_deleted_data_file_is_a_change(data, hashes):
    job = sweep_job(*data)
    data[1].unlink()
    assert changed_reason(data_changes(job, {"val": job.val})).endswith("now missing)")


def test_a_folder_dataset_is_sealed_file_by_file(tmp_path: Path, hashes):
    shards = tmp_path / "shards"
    (shards / "part").mkdir(parents=True)
    for i in range(3):
        (shards / "part" / f"{i}.csv").write_text(f"row {i}\n")
    val = tmp_path / "val.csv"
    val.write_text("v\n")
    job = sweep_job(shards, val)
    hashes.clear()
    assert data_changes(job, {"train": job.train}) == [] and hashes == []
    os.utime(shards / "part" / "1.csv", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert data_changes(job, {"train": job.train}) == []
    assert hashes == [(shards / "part" / "1.csv").resolve()]  # only the touched shard is read again
    (shards / "part" / "3.csv").write_text("a new shard\n")
    assert [c.name for c in data_changes(job, {"train": job.train})] == ["train"]


def test_a_cached_copy_is_the_version_it_was_staged_as(data, hashes, tmp_path: Path):
    """A pool host reads its data cache's copy (named by md5, checked when staged), not the sweep's file."""
    job = sweep_job(*data)
    copy = tmp_path / "cache" / "copy.csv"
    copy.parent.mkdir()
    copy.write_text("anything")
    hashes.clear()
    assert data_changes(job, {"val": str(copy)}) == [] and hashes == []


def test_a_run_that_read_changed_data_is_never_resumed_from(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("ckpt", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id, tags={TAG_TRIAL_KEY: "k", TAG_DATA_VERSION: "new/new"}).info.run_id
    folder = tmp_path / "trial" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pkl").write_bytes(b"epoch 1, on the new bytes")
    CheckpointSync(client, run_id, folder, interval_s=3600).stop()
    assert restore_checkpoints(client, exp_id, "k", tmp_path / "a", data_version="old/old") is None
    assert restore_checkpoints(client, exp_id, "k", tmp_path / "b", data_version="new/new") == run_id


# ---------------------------------------------------------------- through a real trial process


@pytest.fixture(scope="module")
def launcher():
    from hpsweep.engine.launcher import LocalLauncher

    return LocalLauncher(preload=["tests.trainers"])


def test_the_trial_process_refuses_changed_data_and_tags_what_it_read(launcher, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(dvcdata.MEMO_ENV, str(tmp_path / "memo.json"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = store.ensure_experiment(client, "checks")
    parent = store.start_parent_run(client, exp, "sweep-1", {})
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("x,y\n1,0\n")
    val.write_text("x,y\n3,1\n")
    record = tmp_path / "record.jsonl"

    def job(index: int, **settings) -> TrialJob:
        return replace(sweep_job(train, val), experiment_id=exp, parent_run_id=parent, tracking_uri=uri,
                       index=index, trial_key=f"key-{index}", sweep_id="sweep-1",
                       entrypoint="tests.trainers:rewrites_data", work_dir=str(tmp_path / "work"),
                       cwd=str(tmp_path), settings={"record_path": str(record), **settings})

    # The trainer rewrites the validation file while it runs: its F1 belongs to no recorded version.
    during = launcher.launch(job(1, rewrite_path=str(val)), ())
    assert not during.outcome.ok and not during.outcome.retryable
    assert during.outcome.reason.startswith(f"{DATA_CHANGED}: {val.resolve()} (recorded ")
    tags = client.get_run(during.run_id).data.tags
    assert tags[TAG_DATA_VERSION].split("/")[1] == dvcdata.content_md5(val)  # tagged with what it read
    assert tags[store.TAG_REASON] == during.outcome.reason

    # A trial planned before the change: refused before its trainer starts.
    planned = job(2)
    val.write_text("x,y\n3,1\n5,5\n")
    before = launcher.launch(planned, ())
    assert before.outcome.reason.startswith(f"{DATA_CHANGED}: {val.resolve()} (recorded ")
    assert not before.outcome.retryable
    starts = [json.loads(line)["hparams"] for line in record.read_text().splitlines()]
    assert len(starts) == 1  # only the first trial's trainer ran

    # A command trainer's result of the wrong shape: the precise reason, through the real process.
    (tmp_path / "writes_list.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['HPSWEEP_RESULT']).write_text('[0.5]')\n")
    shaped = launcher.launch(replace(job(3), entrypoint=None, command=[sys.executable, "writes_list.py"]), ())
    assert shaped.outcome.reason.startswith('result file holds [0.5], not {"f1": <float>}')


# ---------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_a_sweep_whose_validation_file_changes_fails_the_later_trials_and_reuses_none(project):
    original = (project.root / "data" / "val.csv").read_bytes()
    project.write("params/combinations.yaml", "combinations:\n" + "".join(f"  - {{f1: 0.{i}}}\n" for i in (5, 6, 7)))
    project.write("params/spec.yaml", "name: changing\ntrainer:\n  entrypoint: tests.trainers:rewrites_data\n")
    args = ("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1")
    env = {"HPSWEEP_TEST_REWRITE": str(project.root / "data" / "val.csv"),
           "HPSWEEP_HASH_MEMO": str(project.root / "memo.json")}
    first = project.hpsweep(*args, env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    rows = json.loads((project.root / "reports" / "changing" / "latest" / "leaderboard.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["FAILED"] * 3
    assert all(r["reason"].startswith(f"{DATA_CHANGED}: ") for r in rows), [r["reason"] for r in rows]

    # The file back as it was: the same version, so the same trial keys; none of the failed trials is reused.
    (project.root / "data" / "val.csv").write_bytes(original)
    second = project.hpsweep(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = json.loads((project.root / "reports" / "changing" / "latest" / "leaderboard.json").read_text())["rows"]
    assert sorted(r["status"] for r in rows) == ["FINISHED"] * 3
    db = sqlite3.connect(project.root / "mlflow.db")
    versions = {v for (v,) in db.execute("select value from tags where key = ?", (TAG_DATA_VERSION,))}
    assert len(versions) == 2  # the version the sweeps planned with, and the one the first trial read
