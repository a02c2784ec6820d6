"""The versions that name a trial: DVC's content hash of the data (memoized), the spec hash and
the trial key. The same inputs must always give the same key: reuse of finished trials depends on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from dvc_data.hashfile.hash import file_md5 as dvc_file_md5

from hpsweep import dvcdata
from hpsweep.dvcdata import content_md5
from hpsweep import versions
from hpsweep.inputs import ModelSpec, SweepInputError, load_spec
from hpsweep.versions import code_files, code_version, data_version, env_version, spec_hash, trial_key


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


def test_the_environment_is_a_part_of_the_trial_key():
    key = trial_key(HPARAMS, "spec0", "data0", "code0", "env0")
    assert key == "6ca90fd4a67edaaa60b3af5d"  # pinned, like the key without it
    assert key != trial_key(HPARAMS, "spec0", "data0", "code0", "env1")
    assert key != trial_key(HPARAMS, "spec0", "data0", "code0")


# ---------------------------------------------------------------- code_version: every file of the trainer


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def command(*argv: str, **extra) -> ModelSpec:
    return ModelSpec.model_validate({"trainer": {"command": list(argv)}, **extra})


def test_an_entry_points_whole_package_is_its_code(tmp_path: Path, monkeypatch):
    pkg = f"pkg_{uuid.uuid4().hex[:8]}"
    write(tmp_path, {f"{pkg}/__init__.py": "", f"{pkg}/train.py": "from .model_def import build\n",
                     f"{pkg}/model_def.py": "SCALE = True\n", f"{pkg}/nets/deep.py": "X = 1\n",
                     "other/unrelated.py": "", "notes.txt": "not the package"})
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.model_validate({"trainer": {"entrypoint": f"{pkg}.train:train"}})
    assert list(code_files(spec)) == [f"{pkg}/__init__.py", f"{pkg}/model_def.py", f"{pkg}/nets/deep.py",
                                      f"{pkg}/train.py"]
    before = code_version(spec)
    (tmp_path / pkg / "model_def.py").write_text("SCALE = False\n")  # the module the entry point imports
    assert code_version(spec) != before
    (tmp_path / "other" / "unrelated.py").write_text("changed = True\n")  # outside the package
    after = code_version(spec)
    assert code_version(spec) == after


def test_a_command_scripts_folder_is_its_code_less_what_is_never_code(tmp_path: Path, monkeypatch):
    write(tmp_path, {"train.py": "import helper\n", "helper.py": "SCALER = 'standard'\n", "lib/util.py": "",
                     ".gitignore": "outputs/\n*.log\n", "outputs/model.bin": "x", "run.log": "x",
                     "lib/.gitignore": "scratch.py\n", "lib/scratch.py": "", "__pycache__/helper.cpython-311.pyc": "",
                     ".cache/x": "", "venv/pyvenv.cfg": "", "venv/lib/site.py": "", "mlflow.db": "1",
                     "mlruns/0/meta.yaml": "", "reports/sweep/leaderboard.md": "", "dvc.lock": ""})
    monkeypatch.chdir(tmp_path)
    spec = command(sys.executable, "train.py", "--fast")
    assert list(code_files(spec)) == ["helper.py", "lib/util.py", "train.py"]
    before = code_version(spec)
    # What every sweep writes into the working directory never makes the code new...
    write(tmp_path, {"mlflow.db": "2", "reports/sweep/leaderboard.md": "new", "dvc.lock": "new", "run.log": "y",
                     "mlruns/1/meta.yaml": "", "__pycache__/train.cpython-311.pyc": ""})
    assert code_version(spec) == before
    # ...editing the helper the script imports does.
    (tmp_path / "helper.py").write_text("SCALER = None\n")
    assert code_version(spec) != before


def test_a_trainer_in_a_gitignored_folder_is_still_code(tmp_path: Path, monkeypatch):
    write(tmp_path, {".gitignore": "vendor/\n", "vendor/trainer/train.py": "", "vendor/trainer/helper.py": ""})
    (tmp_path / ".git").mkdir()  # a repository: its top .gitignore applies below it
    monkeypatch.chdir(tmp_path)
    assert list(code_files(command("python", "vendor/trainer/train.py"))) == [
        "vendor/trainer/helper.py", "vendor/trainer/train.py"]


def test_a_third_party_script_behind_a_wrapper_is_code_and_a_data_file_only_itself(tmp_path: Path, monkeypatch):
    write(tmp_path, {"tools/wrapper.py": "", "vendor/tree_script.py": "criterion = 'gini'\n",
                     "vendor/util.py": "", "data/train.csv": "1\n", "data/other.csv": "2\n"})
    monkeypatch.chdir(tmp_path)
    spec = command("python", "tools/wrapper.py", "--script=vendor/tree_script.py", "--data", "data/train.csv")
    assert list(code_files(spec)) == ["data/train.csv", "tools/wrapper.py", "vendor/tree_script.py", "vendor/util.py"]
    before = code_version(spec)
    (tmp_path / "vendor" / "tree_script.py").write_text("criterion = 'entropy'\n")
    assert code_version(spec) != before


def test_a_module_run_with_dash_m_is_code_through_its_package(tmp_path: Path, monkeypatch):
    pkg = f"pkg_{uuid.uuid4().hex[:8]}"
    write(tmp_path, {f"{pkg}/__init__.py": "", f"{pkg}/cli.py": "", f"{pkg}/helpers.py": ""})
    monkeypatch.chdir(tmp_path)
    assert list(code_files(command("python", "-m", f"{pkg}.cli"))) == [
        f"{pkg}/__init__.py", f"{pkg}/cli.py", f"{pkg}/helpers.py"]


def test_the_specs_code_list_replaces_the_default_and_must_name_something(tmp_path: Path, monkeypatch):
    write(tmp_path, {"train.py": "", "src/model.py": "", "src/nets/mlp.py": "", "configs/a.yaml": "",
                     "configs/b.yaml": "", "configs/notes.txt": ""})
    monkeypatch.chdir(tmp_path)
    spec = command(sys.executable, "train.py", code=["src/", "configs/*.yaml"])
    assert list(code_files(spec)) == ["configs/a.yaml", "configs/b.yaml", "src/model.py", "src/nets/mlp.py"]
    before = code_version(spec)
    (tmp_path / "src" / "nets" / "mlp.py").write_text("layers = 3\n")
    assert code_version(spec) != before
    # How the list is spelled is not part of any version: only what it names.
    assert spec_hash(spec) == spec_hash(command(sys.executable, "train.py", code=["src", "configs/[ab].yaml"]))

    path = tmp_path / "spec.yaml"
    path.write_text(f"trainer:\n  command: [{sys.executable!r}, train.py]\ncode: [src/, lib/, 'configs/*.json']\n")
    with pytest.raises(SweepInputError) as e:
        load_spec(path)
    [problem] = e.value.problems
    assert (problem.file, problem.key) == (str(path), "code")
    assert "'lib/', 'configs/*.json'" in problem.message and "working directory" in problem.message


# ---------------------------------------------------------------- env_version: the environment trials run in


def install(site: Path, version: str) -> None:
    """A distribution "tinypkg" at ``version`` on ``site`` (what pip leaves: a dist-info folder)."""
    for old in site.glob("tinypkg-*.dist-info"):
        shutil.rmtree(old)
    meta = site / f"tinypkg-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinypkg\nVersion: {version}\n")


def test_upgrading_a_package_changes_the_env_version(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    install(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    old = env_version()
    install(site, "1.1")  # pip install -U tinypkg
    assert env_version() != old
    install(site, "1.0")
    assert env_version() == old  # the same environment again: the same version


def test_an_image_digest_is_the_environment_when_given(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    install(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(versions.IMAGE_DIGEST_ENV, "sha256:" + "a" * 64)
    image = env_version()
    install(site, "2.0")  # the sweep host's packages are not what runs in the image
    assert env_version() == image
    monkeypatch.setenv(versions.IMAGE_DIGEST_ENV, "sha256:" + "b" * 64)
    assert env_version() != image


def test_a_command_run_by_another_python_is_versioned_by_that_pythons_environment(tmp_path: Path):
    listing = ["CPython 3.99.0", "tinypkg==7.0"]
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\necho '{json.dumps(listing)}'\n")
    python.chmod(0o755)
    spec = command(str(python), "train.py")
    assert env_version(spec) == hashlib.sha256(b"".join(p.encode() + b"\0" for p in listing)).hexdigest()[:16]
    assert env_version(command(sys.executable, "train.py")) == env_version()
