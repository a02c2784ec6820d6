"""Data on a trial host: a per-host cache of DVC-tracked files and folders, fetched from the DVC remote once.

Training data is tens of GB, so a trial must not download it: the first trial on a host
fetches each file from the DVC remote (S3 in production, a folder locally) into a cache
keyed by its DVC content hash; later trials on that host use the cached copy. A folder
(DVC hash ``<md5>.dir``) is staged from its `.dir` object, the JSON listing of its files:
each file is fetched into a folder of the cache, which is then used and checked as one copy.

- Concurrent trials on one host fetch once: the fetch holds a per-hash file lock
  (``filelock``), and whoever waited finds the copy done.
- A copy is only ever published whole: it is downloaded to a temporary name, its md5
  checked against the DVC hash, then renamed into place. A copy that changed afterwards
  (truncated, overwritten) no longer matches the size and mtime recorded at publication:
  it is re-hashed, and fetched again when the hash differs. For a folder, the record holds
  each file's md5, size and mtime; a file missing, added or damaged makes the folder
  re-fetched, keeping (after re-hashing) the files that are still intact.
- The cache has a size cap; least recently used entries are evicted after a fetch.

The remote's layout is DVC 3's content-addressed one: ``<remote>/files/md5/<2 hex>/<30 hex>``
(``.dir`` appended for a folder's listing).
Settings (environment, so each worker host sets its own): ``HPSWEEP_DATA_CACHE`` (folder,
default ``~/.cache/hpsweep/data``), ``HPSWEEP_DATA_CACHE_MAX_GB`` (default: no cap).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlsplit

from filelock import FileLock

_CHUNK = 8 << 20
_PARALLEL_FILES = 8  # a folder's files fetched at once


@dataclass(frozen=True)
class Remote:
    """Where a DVC remote keeps its objects: a URL (``s3://bucket/prefix`` or a folder) plus S3 settings."""

    url: str
    endpoint_url: str | None = None  # S3-compatible endpoints (MinIO, moto); None = AWS

    def object_url(self, md5: str) -> str:
        return f"{self.url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


@dataclass(frozen=True)
class DataRef:
    """One DVC-tracked data file or folder: its path in the project, its DVC md5 (``<md5>.dir`` for a
    folder) and the remote holding it.

    It travels in the trial job (plain JSON), so a worker that has no copy of the project can
    still fetch exactly the bytes the sweep was planned with.
    """

    path: str
    md5: str
    size: int | None = None  # bytes (of all its files, for a folder)
    remote: Remote | None = None
    seal: str | None = None  # hpsweep.dvcdata.data_seal of ``path`` when ``md5`` was taken

    @property
    def is_folder(self) -> bool:
        return is_folder_md5(self.md5)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataRef":
        remote = data.get("remote")
        return cls(path=data["path"], md5=data["md5"], size=data.get("size"),
                   remote=Remote(**remote) if remote else None, seal=data.get("seal"))


class DataFetchError(RuntimeError):
    """The data could not be fetched (remote unreachable, object missing, hash mismatch)."""


def is_folder_md5(md5: str) -> bool:
    """DVC names a folder by its listing's md5 plus ".dir"."""
    return md5.endswith(".dir")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(remote: Remote, md5: str, dest: Path) -> None:
    """Copy one object from the remote to ``dest`` (S3: parallel ranged GETs via boto3's transfer manager)."""
    source = remote.object_url(md5)
    parts = urlsplit(source)
    if parts.scheme == "s3":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = boto3.client("s3", endpoint_url=remote.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))
        config = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8)
        try:
            s3.download_file(parts.netloc, parts.path.lstrip("/"), str(dest), Config=config)
        except (BotoCoreError, ClientError) as e:
            raise DataFetchError(f"cannot fetch {source}: {e}") from e
    elif parts.scheme in ("", "file"):
        path = Path(parts.path if parts.scheme else source)
        if not path.is_file():
            raise DataFetchError(f"cannot fetch {source}: not in the DVC remote (was `dvc push` run?)")
        shutil.copyfile(path, dest)
    else:
        raise DataFetchError(f"cannot fetch {source}: remote scheme {parts.scheme!r} is not supported "
                             "(use s3:// or a folder)")


@dataclass
class CacheStats:
    """What a cache did in this process (the staging benchmark and tests read it)."""

    fetches: int = 0
    bytes_fetched: int = 0
    hits: int = 0
    refetches: int = 0  # copies found corrupt or partial, fetched again
    evictions: int = 0


class DataCache:
    """A folder of verified copies, named by DVC md5. Safe across processes and threads on one host."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DataCache":
        env = os.environ if environ is None else environ
        root = Path(env.get("HPSWEEP_DATA_CACHE") or Path.home() / ".cache" / "hpsweep" / "data")
        cap = env.get("HPSWEEP_DATA_CACHE_MAX_GB")
        return cls(root, int(float(cap) * 1e9) if cap else None)

    def path_for(self, md5: str) -> Path:
        return self.root / "md5" / md5[:2] / md5[2:]

    def stage(self, ref: DataRef) -> Path:
        """The path of a verified local copy of ``ref`` (a file, or a folder of files), fetching it
        when this host has none."""
        target = self.path_for(ref.md5)
        if self._valid(target, ref.md5):  # the common case: no lock, one stat() per file
            self._touch(target)
            self._count(hits=1)
            return target
        with self._lock(ref.md5):
            if self._valid(target, ref.md5):  # another trial fetched it while we waited
                self._touch(target)
                self._count(hits=1)
                return target
            if target.exists():
                self._count(refetches=1)
            self._seal_path(target).unlink(missing_ok=True)  # nobody trusts the old copy while it is replaced
            for stale in target.parent.glob(f"{target.name}.partial-*"):  # left by a fetch that was killed
                _remove(stale)
            if ref.is_folder:
                self._fetch_folder(ref, target)
            else:
                self._fetch(ref, target)
        self._evict(keep=target)
        return target

    # -- internals -------------------------------------------------------------------------

    def _fetch(self, ref: DataRef, target: Path) -> None:
        remote = self._remote(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            _download_verified(remote, ref.md5, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        self._write_seal(target)
        self._count(fetches=1, bytes_fetched=target.stat().st_size)

    def _fetch_folder(self, ref: DataRef, target: Path) -> None:
        """Fetch the folder's `.dir` listing, then each of its files (those of an earlier, damaged copy
        that still match their md5 are kept), into a temporary folder renamed into place whole."""
        remote = self._remote(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        listing = target.with_name(f"{target.name}.partial-{os.getpid()}.listing")
        try:
            _download_verified(remote, ref.md5, listing, expected=ref.md5.removesuffix(".dir"))
            files = _parse_listing(listing, remote.object_url(ref.md5))
            partial.mkdir()

            def place(rel: str, md5: str) -> int:
                """Put one file in the new copy; the bytes downloaded for it."""
                dest = partial / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                old = target / rel
                if old.is_file() and not old.is_symlink() and file_md5(old) == md5:
                    os.replace(old, dest)
                    return 0
                _download_verified(remote, md5, dest)
                return dest.stat().st_size

            with ThreadPoolExecutor(_PARALLEL_FILES) as pool:
                fetched = sum(f.result() for f in [pool.submit(place, rel, md5) for rel, md5 in files.items()])
            _remove(target)
            os.replace(partial, target)
        finally:
            listing.unlink(missing_ok=True)
            _remove(partial)
        self._write_seal(target, files)
        self._count(fetches=1, bytes_fetched=fetched)

    @staticmethod
    def _remote(ref: DataRef) -> Remote:
        if ref.remote is None:
            raise DataFetchError(f"{ref.path} is not on this host and no DVC remote is configured: "
                                 "add one (`dvc remote add -d ...`) and `dvc push`")
        return ref.remote

    def _seal_path(self, target: Path) -> Path:
        return target.with_name(target.name + ".ok")

    def _write_seal(self, target: Path, files: dict[str, str] | None = None) -> None:
        """What the copy looked like when published: size and mtime (per file, with its md5, for a folder)."""
        if files is None:
            st = target.stat()
            seal: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            seal = {"files": {rel: _file_seal(target / rel, md5) for rel, md5 in files.items()}}
        self._seal_path(target).write_text(json.dumps(seal))

    def _valid(self, target: Path, md5: str) -> bool:
        """A sealed copy whose size and mtime are unchanged is trusted; anything else is re-hashed."""
        if is_folder_md5(md5):
            return self._valid_folder(target)
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            seal = json.loads(self._seal_path(target).read_text())
            if seal == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                return True
        except (OSError, ValueError):
            pass
        if file_md5(target) == md5:  # changed metadata but intact content (e.g. copied in): re-seal
            self._write_seal(target)
            return True
        return False

    def _valid_folder(self, target: Path) -> bool:
        """The folder holds exactly the sealed files, each unchanged or re-hashed to its md5. Without a
        seal it is not trusted: the fetch re-checks what is there against the remote's listing."""
        try:
            seal = json.loads(self._seal_path(target).read_text())["files"]
            files = {rel: entry["md5"] for rel, entry in seal.items()}
            if not target.is_dir() or set(_files_in(target)) != set(files):
                return False
            changed = [rel for rel, md5 in files.items() if _file_seal(target / rel, md5) != seal[rel]]
            if any(file_md5(target / rel) != files[rel] for rel in changed):
                return False
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if changed:  # changed metadata but intact content: re-seal
            self._write_seal(target, files)
        return True

    def _touch(self, target: Path) -> None:
        # LRU by the seal's mtime: the data file's own mtime is part of its seal.
        try:
            os.utime(self._seal_path(target))
        except OSError:
            pass

    @contextmanager
    def _lock(self, md5: str) -> Iterator[None]:
        """Hold ``md5``'s lock: one fetch or eviction of a copy at a time, across threads and processes.

        A flock (a holder that dies releases it); a new lock object per call, so threads of
        one process exclude each other as separate processes do.
        """
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"{md5}.lock"):
            yield

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, size, last use) of every sealed copy (a folder's size: all its files)."""
        out = []
        for seal in (self.root / "md5").glob("*/*.ok"):
            data = seal.with_name(seal.name[: -len(".ok")])
            try:
                if is_folder_md5(data.name):
                    size = sum(int(f["size"]) for f in json.loads(seal.read_text())["files"].values())
                else:
                    size = data.stat().st_size
                out.append((data, size, seal.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return out

    def _evict(self, keep: Path) -> None:
        """Remove least recently used copies until the cache fits its cap (never the one just staged).

        A trial still reading an evicted file keeps its open handle (POSIX unlink semantics); a
        trial that opens a folder's files one by one can lose the ones it has not opened yet.
        """
        if self.max_bytes is None:
            return
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            md5 = path.parent.name + path.name
            with self._lock(md5):
                self._seal_path(path).unlink(missing_ok=True)
                _remove(path)
            total -= size
            self._count(evictions=1)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)


def _download_verified(remote: Remote, md5: str, dest: Path, expected: str | None = None) -> None:
    """``download``, then check the bytes' md5 (``expected``, default ``md5``): a corrupt object is never kept."""
    download(remote, md5, dest)
    got = file_md5(dest)
    if got != (expected or md5):
        dest.unlink(missing_ok=True)
        raise DataFetchError(f"{remote.object_url(md5)} has md5 {got}, expected {expected or md5} "
                             "(the remote's copy is corrupt)")


def _parse_listing(listing: Path, source: str) -> dict[str, str]:
    """relpath → md5 from a DVC `.dir` object, refusing paths that would land outside the folder."""
    try:
        entries = json.loads(listing.read_text())
        files = {str(e["relpath"]): str(e["md5"]) for e in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise DataFetchError(f"{source} is not a DVC folder listing: {e}") from e
    for rel, md5 in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel or len(md5) != 32:
            raise DataFetchError(f"{source} lists an unsafe or malformed entry: {rel!r} ({md5!r})")
    return files


def _files_in(folder: Path) -> list[str]:
    """Relative paths (with '/') of every file under ``folder``."""
    return [(Path(d) / name).relative_to(folder).as_posix() for d, _, names in os.walk(folder) for name in names]


def _file_seal(path: Path, md5: str) -> dict[str, Any]:
    st = path.stat()
    return {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remove(path: Path) -> None:
    """Remove a file or a folder; nothing when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
