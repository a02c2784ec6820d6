"""Folders as data, as real datasets of shards are: versioned with exactly the md5 DVC records for them
(`dvc add`'s `.dir` hash), named with their DVC remote, and a sweep on them plans, stages and trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hpsweep import dvcdata
from hpsweep.dvcdata import data_ref
from hpsweep.versions import data_version
from tests.conftest import Project
from tests.test_datacache import SHARDS, dvc_pushed_folder, folder_bytes
from tests.test_sweep_e2e import leaderboard


@pytest.fixture(autouse=True)
def memo(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(dvcdata.MEMO_ENV, str(tmp_path / "memo" / "hashes.json"))


def dvc_recorded(folder: Path) -> dict:
    """What `dvc add` recorded for ``folder`` in its `.dvc` file."""
    return yaml.safe_load(folder.with_name(folder.name + ".dvc").read_text())["outs"][0]


def test_a_folders_version_is_the_md5_dvc_records_for_it(tmp_path: Path):
    files = {**SHARDS, ".git/HEAD": b"ref: x\n"}  # DVC never lists a .git folder
    folder = dvc_pushed_folder(tmp_path / "project", tmp_path / "remote", files)
    recorded = dvc_recorded(folder)
    assert data_version(folder) == recorded["md5"] and recorded["md5"].endswith(".dir")
    ref = data_ref(folder)
    assert (ref.md5, ref.size, ref.remote.url) == (recorded["md5"], recorded["size"], str(tmp_path / "remote"))
    assert (tmp_path / "remote" / "files" / "md5" / ref.md5[:2] / ref.md5[2:]).is_file()  # the listing DVC pushed

    (folder / "part-1.csv").write_bytes(b"label,p0\n0,8\n")  # edited without `dvc add`
    changed = data_ref(folder)
    assert changed.md5 != recorded["md5"] and changed.md5 == data_version(folder)
    assert changed.remote is None  # the remote holds the old bytes: a host without them cannot train
    (folder / "part-1.csv").unlink()
    assert data_version(folder) not in (recorded["md5"], changed.md5)


SPEC = """
name: shards
trainer:
  entrypoint: tests.trainers:shards
settings: {record_path: "%s"}
"""


@pytest.mark.slow
def test_a_sweep_on_folder_datasets_plans_stages_and_trains(served_project: Project):
    project = served_project
    remote = project.root.parent / "dvc-remote"
    val_shards = {"v-0.csv": b"label,p0\n1,2\n" * 50, "v-1.csv": b"label,p0\n0,5\n" * 40}
    train = dvc_pushed_folder(project.root, remote, SHARDS, "train")
    val = dvc_pushed_folder(project.root, remote, val_shards, "val")
    record = project.root / "read.jsonl"
    project.write("params/combinations.yaml", "combinations:\n  - {f1: 0.7}\n  - {f1: 0.9}\n")
    project.write("params/spec.yaml", SPEC % record)
    cache = project.root.parent / "host-cache"
    env = {"HPSWEEP_STAGE_DATA": "always", "HPSWEEP_DATA_CACHE": str(cache), "HPSWEEP_HASH_MEMO":
           str(project.root.parent / "memo.json")}  # trials fetch from the DVC remote, as on a host without the data
    args = ["--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml", "--train", "data/train",
            "--val", "data/val", "--quota", "2"]

    planned = project.hpsweep("plan", *args, env=env)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    result = project.hpsweep("run", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    rows = leaderboard(project, "shards")["rows"]
    assert [(r["f1"], r["status"]) for r in rows] == [(0.9, "FINISHED"), (0.7, "FINISHED")]
    reads = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(reads) == 2
    for read in reads:  # each trial read every shard of both folders, from this host's cache
        assert read["train"]["files"] == sorted(SHARDS) and read["val"]["files"] == sorted(val_shards)
        assert read["train"]["lines"] == sum(len(d.splitlines()) for d in SHARDS.values())
        assert Path(read["train"]["path"]).is_relative_to(cache) and Path(read["val"]["path"]).is_relative_to(cache)
    assert folder_bytes(Path(reads[0]["train"]["path"])) == SHARDS

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    runs = [client.get_run(r["run_id"]) for r in rows]
    assert {r.data.tags["hpsweep.data_source"] for r in runs} == {"cache"}
    # Two trials on one host: each folder downloaded once.
    total = sum(map(len, SHARDS.values())) + sum(map(len, val_shards.values()))
    assert sum(int(r.data.tags["hpsweep.data_fetched_bytes"]) for r in runs) == total
    versions = f"{dvc_recorded(train)['md5']}/{dvc_recorded(val)['md5']}"
    assert {r.data.tags["hpsweep.data_version"] for r in runs} == {versions}
