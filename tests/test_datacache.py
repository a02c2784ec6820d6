"""The per-host data cache against a real S3-compatible endpoint (moto in server mode) and a folder remote.

What a user notices: the first trial on a host fetches, later ones don't, four trials starting
together fetch once, a damaged copy is fetched again instead of being trained on, and the
cache stays under its cap; the same for a folder of shards (a DVC `.dir` object pushed by `dvc push`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpsweep.datacache import DataCache, DataFetchError, DataRef, Remote
from hpsweep.dvcdata import data_ref
from hpsweep.engine.launcher import TrialJob, trial_data


def put_object(s3_endpoint, bucket: str, data: bytes, prefix: str = "dvc") -> DataRef:
    """Upload ``data`` where DVC 3 would push it, and return the reference a sweep would send."""
    md5 = hashlib.md5(data).hexdigest()
    s3_endpoint.client().put_object(Bucket=bucket, Key=f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}", Body=data)
    return DataRef(path="data/train.csv", md5=md5, size=len(data),
                   remote=Remote(url=f"s3://{bucket}/{prefix}", endpoint_url=s3_endpoint.url))


@pytest.fixture
def remote_file(s3_endpoint):
    data = os.urandom(3 << 20)
    return put_object(s3_endpoint, s3_endpoint.bucket(), data), data


def test_cold_fetch_then_warm_hits(tmp_path: Path, remote_file):
    ref, data = remote_file
    cache = DataCache(tmp_path / "cache")
    path = cache.stage(ref)
    assert path.read_bytes() == data
    assert (cache.stats.fetches, cache.stats.bytes_fetched, cache.stats.hits) == (1, len(data), 0)

    assert cache.stage(ref) == path
    later_trial = DataCache(tmp_path / "cache")  # another trial process on the same host
    assert later_trial.stage(ref) == path
    assert (cache.stats.fetches, cache.stats.hits, later_trial.stats.fetches, later_trial.stats.hits) == (1, 1, 0, 1)


def _stage_in_process(root: str, ref: dict, barrier, out) -> None:
    cache = DataCache(Path(root))
    barrier.wait()  # all four start staging at the same moment
    cache.stage(DataRef.from_dict(ref))
    out.put((cache.stats.fetches, cache.stats.bytes_fetched))


def test_four_concurrent_trials_fetch_once(tmp_path: Path, s3_endpoint):
    data = os.urandom(24 << 20)  # big enough that the fetch is still running when the others arrive
    ref = put_object(s3_endpoint, s3_endpoint.bucket(), data)
    ctx = multiprocessing.get_context("spawn")  # separate processes, as trials are
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_stage_in_process, args=(str(tmp_path / "cache"), ref.as_dict(), barrier, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in procs]
    assert sum(fetches for fetches, _ in results) == 1
    assert sum(nbytes for _, nbytes in results) == len(data)
    assert DataCache(tmp_path / "cache").path_for(ref.md5).read_bytes() == data


def test_truncated_copy_is_fetched_again(tmp_path: Path, remote_file):
    ref, data = remote_file
    cache = DataCache(tmp_path / "cache")
    path = cache.stage(ref)
    with path.open("r+b") as f:  # a copy cut short (disk full, killed copy, a careless hand)
        f.truncate(len(data) // 2)
    assert cache.stage(ref).read_bytes() == data
    assert (cache.stats.fetches, cache.stats.refetches) == (2, 1)


def test_overwritten_copy_of_the_same_size_is_caught_by_its_hash(tmp_path: Path, remote_file):
    ref, data = remote_file
    cache = DataCache(tmp_path / "cache")
    path = cache.stage(ref)
    path.write_bytes(b"\0" * len(data))  # same size, new mtime: the seal no longer matches
    assert cache.stage(ref).read_bytes() == data
    assert cache.stats.refetches == 1


def test_corrupt_remote_object_is_never_published(tmp_path: Path, s3_endpoint):
    bucket = s3_endpoint.bucket()
    good = put_object(s3_endpoint, bucket, b"the real bytes\n")
    s3_endpoint.client().put_object(Bucket=bucket, Key=f"dvc/files/md5/{good.md5[:2]}/{good.md5[2:]}",
                                    Body=b"rotten bytes\n")
    cache = DataCache(tmp_path / "cache")
    with pytest.raises(DataFetchError, match="corrupt"):
        cache.stage(good)
    assert not cache.path_for(good.md5).exists()
    assert not list(cache.path_for(good.md5).parent.glob("*partial*"))


def test_missing_object_says_what_to_do(tmp_path: Path, s3_endpoint):
    bucket = s3_endpoint.bucket()
    ref = DataRef(path="data/val.csv", md5="0" * 32, remote=Remote(f"s3://{bucket}/dvc", s3_endpoint.url))
    with pytest.raises(DataFetchError, match=f"s3://{bucket}/dvc/files/md5/00/"):
        DataCache(tmp_path / "cache").stage(ref)
    no_remote = DataRef(path="data/val.csv", md5="0" * 32)
    with pytest.raises(DataFetchError, match="dvc remote add"):
        DataCache(tmp_path / "cache").stage(no_remote)


def test_size_cap_evicts_the_least_recently_used(tmp_path: Path, s3_endpoint):
    bucket = s3_endpoint.bucket()
    refs = [put_object(s3_endpoint, bucket, os.urandom(1 << 20)) for _ in range(3)]
    cache = DataCache(tmp_path / "cache", max_bytes=int(2.5 * (1 << 20)))
    first, second = cache.stage(refs[0]), cache.stage(refs[1])
    os.utime(second.with_name(second.name + ".ok"), (1, 1))  # refs[1] used long ago, refs[0] recently
    cache.stage(refs[2])
    assert first.exists() and cache.path_for(refs[2].md5).exists()
    assert not second.exists()
    assert cache.stats.evictions == 1
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes


def test_folder_remote(tmp_path: Path):
    data = b"label,p0\n1,3\n"
    md5 = hashlib.md5(data).hexdigest()
    obj = tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True)
    obj.write_bytes(data)
    ref = DataRef(path="data/train.csv", md5=md5, remote=Remote(url=str(tmp_path / "remote")))
    assert DataCache(tmp_path / "cache").stage(ref).read_bytes() == data


def test_settings_come_from_the_environment(tmp_path: Path):
    cache = DataCache.from_env({"HPSWEEP_DATA_CACHE": str(tmp_path / "c"), "HPSWEEP_DATA_CACHE_MAX_GB": "1.5"})
    assert (cache.root, cache.max_bytes) == (tmp_path / "c", 1_500_000_000)


def _job(train: str, val: str, data: dict) -> TrialJob:
    return TrialJob(sweep_id="s", experiment_id="1", parent_run_id="p", tracking_uri="sqlite:///x.db", index=1,
                    hparams={}, trial_key="k", attempt=1, settings={}, train=train, val=val, data=data)


def test_a_host_without_the_files_stages_them(tmp_path: Path, s3_endpoint):
    bucket = s3_endpoint.bucket()
    train, val = put_object(s3_endpoint, bucket, b"train bytes\n"), put_object(s3_endpoint, bucket, b"val bytes\n")
    job = _job("/elsewhere/data/train.csv", "/elsewhere/data/val.csv",
               {"train": train.as_dict(), "val": val.as_dict()})
    env = {"HPSWEEP_DATA_CACHE": str(tmp_path / "cache")}
    got = trial_data(job, env)
    assert (got.train.read_bytes(), got.val.read_bytes(), got.source, got.fetched_bytes) == \
        (b"train bytes\n", b"val bytes\n", "cache", len(b"train bytes\n") + len(b"val bytes\n"))
    assert trial_data(job, env).fetched_bytes == 0  # the next trial on this host: a cache hit

    local = tmp_path / "train.csv"
    local.write_bytes(b"train bytes\n")
    here = _job(str(local), str(local), {"train": train.as_dict(), "val": val.as_dict()})
    assert trial_data(here, env).source == "local"  # this host has the files: no staging
    assert trial_data(here, {**env, "HPSWEEP_STAGE_DATA": "always"}).source == "cache"

    # A host told where the remote is from its side (HPSWEEP_DATA_REMOTE, as the ECS job template sets).
    unreachable = {k: {**v, "remote": {"url": "/nowhere/on/this/host"}} for k, v in job.data.items()}
    moved = _job(job.train, job.val, unreachable)
    other_host = {"HPSWEEP_DATA_CACHE": str(tmp_path / "cache2"), "HPSWEEP_DATA_REMOTE": f"s3://{bucket}/dvc",
                  "AWS_ENDPOINT_URL_S3": s3_endpoint.url}
    assert trial_data(moved, other_host).train.read_bytes() == b"train bytes\n"

    with pytest.raises(FileNotFoundError, match="track the data with DVC"):
        trial_data(_job("/elsewhere/train.csv", "/elsewhere/val.csv", {}), env)


# ---------------------------------------------------------------- folders (DVC `.dir` objects)

SHARDS = {"part-0.csv": b"label,p0\n1,3\n" * 300, "part-1.csv": b"label,p0\n0,7\n" * 200,
          "nested/part-2.csv": b"label,p0\r\n1,1\r\n" * 100, "Z.txt": b"no newline"}


def dvc_pushed_folder(project: Path, remote: Path, files: dict[str, bytes] = SHARDS, name: str = "shards") -> Path:
    """``project/data/<name>``, a folder of ``files`` added with the real `dvc add` and pushed with
    `dvc push` to the folder remote ``remote`` (``project`` becomes a DVC project if it is not one)."""
    folder = project / "data" / name
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    steps = [] if (project / ".dvc").is_dir() else [["init", "--no-scm", "-q"],
                                                     ["remote", "add", "-d", "local", str(remote)]]
    for args in [*steps, ["add", "-q", f"data/{name}"], ["push", "-q"]]:
        result = subprocess.run([dvc, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return folder


@pytest.fixture(scope="module", autouse=True)
def hash_memo(tmp_path_factory: pytest.TempPathFactory):
    """Hashing the folders remembers its md5s here, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPSWEEP_HASH_MEMO", str(tmp_path_factory.mktemp("memo") / "hashes.json"))
        yield


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pushed_folder(tmp_path_factory: pytest.TempPathFactory) -> DataRef:
    """The DataRef a sweep sends for a DVC-tracked folder (its `.dir` md5 and the folder remote)."""
    root = tmp_path_factory.mktemp("dvc")
    folder = dvc_pushed_folder(root / "project", root / "remote")
    ref = data_ref(folder)
    assert ref.md5.endswith(".dir") and ref.remote is not None
    return ref


def test_a_folder_is_staged_from_its_dvc_listing_once(tmp_path: Path, pushed_folder: DataRef):
    cache = DataCache(tmp_path / "cache")
    path = cache.stage(pushed_folder)
    assert path.is_dir() and folder_bytes(path) == SHARDS
    total = sum(map(len, SHARDS.values()))
    assert (cache.stats.fetches, cache.stats.bytes_fetched, pushed_folder.size) == (1, total, total)
    later_trial = DataCache(tmp_path / "cache")
    assert later_trial.stage(pushed_folder) == path
    assert (later_trial.stats.fetches, later_trial.stats.hits) == (0, 1)
    assert cache.entries() == [(path, total, pytest.approx(time.time(), abs=60))]


def test_a_damaged_folder_is_repaired_fetching_only_what_was_damaged(tmp_path: Path, pushed_folder: DataRef):
    cache = DataCache(tmp_path / "cache")
    path = cache.stage(pushed_folder)
    with (path / "part-0.csv").open("r+b") as f:
        f.truncate(10)
    (path / "nested" / "part-2.csv").unlink()
    (path / "stray.csv").write_bytes(b"not part of this version\n")  # a trainer that wrote into its data
    assert cache.stage(pushed_folder) == path
    assert folder_bytes(path) == SHARDS
    assert cache.stats.refetches == 1
    assert cache.stats.bytes_fetched == sum(map(len, SHARDS.values())) + len(SHARDS["part-0.csv"]) + \
        len(SHARDS["nested/part-2.csv"])  # the first fetch, then only the two damaged files

    # Same size, new content: the seal no longer matches, the hash catches it.
    (path / "part-1.csv").write_bytes(b"\0" * len(SHARDS["part-1.csv"]))
    assert folder_bytes(cache.stage(pushed_folder)) == SHARDS and cache.stats.refetches == 2


def test_folder_copies_are_evicted_whole_by_size(tmp_path: Path):
    root, refs = tmp_path / "dvc", []
    for n in range(3):
        files = {"a.bin": os.urandom(1 << 19), "b/c.bin": os.urandom(1 << 19)}
        refs.append(data_ref(dvc_pushed_folder(root / "project", root / "remote", files, name=f"v{n}")))
    cache = DataCache(tmp_path / "cache", max_bytes=int(2.5 * (1 << 20)))
    first, second = cache.stage(refs[0]), cache.stage(refs[1])
    os.utime(second.with_name(second.name + ".ok"), (1, 1))  # refs[1] used long ago
    cache.stage(refs[2])
    assert first.is_dir() and cache.path_for(refs[2].md5).is_dir()
    assert not second.exists() and cache.stats.evictions == 1
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes


def _listing(entries: list[dict[str, str]]) -> bytes:
    return json.dumps(entries, sort_keys=True).encode()


def test_a_corrupt_or_unsafe_folder_listing_is_refused(tmp_path: Path):
    remote = tmp_path / "remote"

    def publish(data: bytes, suffix: str = "") -> str:
        md5 = hashlib.md5(data).hexdigest()
        obj = remote / "files" / "md5" / md5[:2] / (md5[2:] + suffix)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
        return md5 + suffix

    shard = publish(b"1,2\n")
    cache = DataCache(tmp_path / "cache")
    for rel in ("../escaped.csv", "/etc/escaped.csv"):
        md5 = publish(_listing([{"md5": shard, "relpath": rel}]), ".dir")
        with pytest.raises(DataFetchError, match="unsafe"):
            cache.stage(DataRef("data/shards", md5, remote=Remote(str(remote))))
    assert not list(tmp_path.rglob("escaped.csv"))
    good = publish(_listing([{"md5": shard, "relpath": "a.csv"}]), ".dir")
    obj = remote / "files" / "md5" / good[:2] / good[2:]
    obj.write_bytes(obj.read_bytes().replace(b"a.csv", b"b.csv"))  # the listing's bytes no longer match its md5
    with pytest.raises(DataFetchError, match="corrupt"):
        cache.stage(DataRef("data/shards", good, remote=Remote(str(remote))))
    assert not cache.path_for(good).exists() and not list(cache.path_for(good).parent.glob("*partial*"))


def test_a_folder_is_staged_from_s3(tmp_path: Path, s3_endpoint):
    bucket = s3_endpoint.bucket()
    refs = {rel: put_object(s3_endpoint, bucket, data) for rel, data in SHARDS.items()}
    listing = _listing(sorted(({"md5": ref.md5, "relpath": rel} for rel, ref in refs.items()),
                              key=lambda e: e["relpath"]))
    md5 = hashlib.md5(listing).hexdigest() + ".dir"
    s3_endpoint.client().put_object(Bucket=bucket, Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}", Body=listing)
    ref = DataRef("data/shards", md5, remote=Remote(f"s3://{bucket}/dvc", s3_endpoint.url))
    assert folder_bytes(DataCache(tmp_path / "cache").stage(ref)) == SHARDS


def test_a_host_without_the_folders_stages_them(tmp_path: Path, pushed_folder: DataRef):
    job = _job("/elsewhere/data/shards", "/elsewhere/data/shards",
               {"train": pushed_folder.as_dict(), "val": pushed_folder.as_dict()})
    got = trial_data(job, {"HPSWEEP_DATA_CACHE": str(tmp_path / "cache")})
    assert got.source == "cache" and folder_bytes(got.train) == folder_bytes(got.val) == SHARDS
    assert got.fetched_bytes == sum(map(len, SHARDS.values()))  # one copy serves both
