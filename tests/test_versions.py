"""The versions that name a trial: DVC's content hash of the data (memoized), the spec hash and
the trial key. The same inputs must always give the same key: reuse of finished trials depends on it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from dvc_data.hashfile.hash import file_md5 as dvc_file_md5

from hpsweep import dvcdata
from hpsweep.dvcdata import content_md5
from hpsweep.inputs import ModelSpec
from hpsweep.versions import data_version, spec_hash, trial_key


@pytest.fixture(autouse=True)
def memo(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "memo" / "hashes.json"
    monkeypatch.setenv(dvcdata.MEMO_ENV, str(path))
    return path


def count_hashing(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    real = dvcdata.file_md5

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(dvcdata, "file_md5", counting)
    return hashed


# ---------------------------------------------------------------- content_md5


def test_content_md5_is_dvcs_md5_of_the_file(tmp_path: Path):
    data = tmp_path / "train.csv"
    data.write_bytes(b"x,y\r\n1,2\r\n" * 1000)  # CRLF: DVC 3 hashes the raw bytes (no dos2unix)
    assert content_md5(data) == dvc_file_md5(str(data)) == hashlib.md5(data.read_bytes()).hexdigest()


def test_content_md5_is_memoized_while_the_file_is_unchanged(tmp_path: Path, monkeypatch, memo: Path):
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    hashed = count_hashing(monkeypatch)
    first = content_md5(data)
    assert content_md5(data) == first and content_md5(tmp_path / "." / "train.csv") == first
    assert len(hashed) == 1
    assert memo.is_file()  # kept on disk: the next sweep (another process) does not hash it either


def test_content_md5_changes_when_the_file_does(tmp_path: Path, monkeypatch):
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    before = content_md5(data)
    hashed = count_hashing(monkeypatch)
    st = data.stat()
    data.write_text("a,b\n1,3\n")  # same size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = content_md5(data)
    assert after != before and after == hashlib.md5(b"a,b\n1,3\n").hexdigest()
    assert hashed  # the stamp changed, so the memo was not trusted


def test_content_md5_without_a_writable_memo_still_hashes(tmp_path: Path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(dvcdata.MEMO_ENV, str(blocker / "hashes.json"))
    data = tmp_path / "val.csv"
    data.write_text("a\n")
    assert content_md5(data) == hashlib.md5(b"a\n").hexdigest()


def test_data_version_of_a_file_is_its_content_md5_and_of_a_folder_follows_its_files(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("1\n")
    assert data_version(tmp_path / "d" / "a.csv") == content_md5(tmp_path / "d" / "a.csv")
    folder = data_version(tmp_path / "d")
    (tmp_path / "d" / "b.csv").write_text("2\n")
    assert data_version(tmp_path / "d") != folder


# ---------------------------------------------------------------- spec_hash and trial_key

SPEC = {"name": "digits-mlp", "trainer": {"entrypoint": "tests.trainers:sleepy"},
        "settings": {"epochs": 10, "seed": 0}, "resources": {"gpus": 1}, "time_limit_s": 7200}
HPARAMS = {"lr": 0.01, "layers": 2, "act": "relu", "bn": True}


def test_spec_hash_is_stable_across_releases():
    # Pinned: if this changes, every trial of every earlier sweep gets a new key and is trained again.
    assert spec_hash(ModelSpec.model_validate(SPEC)) == "048c730bf63bddf2"


def test_spec_hash_follows_content_not_spelling():
    reordered = dict(reversed(list(SPEC.items())))
    assert spec_hash(ModelSpec.model_validate(reordered)) == spec_hash(ModelSpec.model_validate(SPEC))
    assert spec_hash(ModelSpec.model_validate({**SPEC, "time_limit_s": 7200.0})) == spec_hash(
        ModelSpec.model_validate(SPEC))
    for change in ({"settings": {"epochs": 11, "seed": 0}}, {"resources": {"gpus": 2}}, {"name": "other"},
                   {"trainer": {"entrypoint": "tests.trainers:other"}}):
        assert spec_hash(ModelSpec.model_validate({**SPEC, **change})) != spec_hash(ModelSpec.model_validate(SPEC))


def test_trial_key_is_stable_across_releases():
    # Pinned for the same reason: the key is how a rerun finds the trials it may reuse.
    assert trial_key(HPARAMS, "spec0", "data0", "code0") == "bdfa9e4623703d02edac484b"


def test_trial_key_ignores_hparam_order_and_follows_every_part():
    key = trial_key(HPARAMS, "spec0", "data0", "code0")
    assert trial_key(dict(reversed(list(HPARAMS.items()))), "spec0", "data0", "code0") == key
    others = {trial_key({**HPARAMS, "lr": 0.02}, "spec0", "data0", "code0"),
              trial_key(HPARAMS, "spec1", "data0", "code0"),
              trial_key(HPARAMS, "spec0", "data1", "code0"),
              trial_key(HPARAMS, "spec0", "data0", "code1"),
              trial_key(HPARAMS, "spec0data0", "", "code0")}  # parts are delimited, not concatenated
    assert key not in others and len(others) == 5
    assert len(key) == 24 and int(key, 16) >= 0
