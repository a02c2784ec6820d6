"""Data on a trial host: a per-host cache of DVC-tracked files, fetched from the DVC remote once.

Training data is tens of GB, so a trial must not download it: the first trial on a host
fetches each file from the DVC remote (S3 in production, a folder locally) into a cache
keyed by its DVC content hash; later trials on that host use the cached copy.

- Concurrent trials on one host fetch once: the fetch holds a per-hash file lock
  (``filelock``), and whoever waited finds the copy done.
- A copy is only ever published whole: it is downloaded to a temporary name, its md5
  checked against the DVC hash, then renamed into place. A copy that changed afterwards
  (truncated, overwritten) no longer matches the size and mtime recorded at publication:
  it is re-hashed, and fetched again when the hash differs.
- The cache has a size cap; least recently used entries are evicted after a fetch.

The remote's layout is DVC 3's content-addressed one: ``<remote>/files/md5/<2 hex>/<30 hex>``.
Settings (environment, so each worker host sets its own): ``HPSWEEP_DATA_CACHE`` (folder,
default ``~/.cache/hpsweep/data``), ``HPSWEEP_DATA_CACHE_MAX_GB`` (default: no cap).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from filelock import FileLock

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Remote:
    """Where a DVC remote keeps its objects: a URL (``s3://bucket/prefix`` or a folder) plus S3 settings."""

    url: str
    endpoint_url: str | None = None  # S3-compatible endpoints (MinIO, moto); None = AWS

    def object_url(self, md5: str) -> str:
        return f"{self.url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


@dataclass(frozen=True)
class DataRef:
    """One DVC-tracked data file: its path in the project, its DVC md5 and the remote holding it.

    It travels in the trial job (plain JSON), so a worker that has no copy of the project can
    still fetch exactly the bytes the sweep was planned with.
    """

    path: str
    md5: str
    size: int | None = None
    remote: Remote | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataRef":
        remote = data.get("remote")
        return cls(path=data["path"], md5=data["md5"], size=data.get("size"),
                   remote=Remote(**remote) if remote else None)


class DataFetchError(RuntimeError):
    """The data could not be fetched (remote unreachable, object missing, hash mismatch)."""


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
        """The path of a verified local copy of ``ref``, fetching it when this host has none."""
        target = self.path_for(ref.md5)
        if self._valid(target, ref.md5):  # the common case: no lock, one stat()
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
            self._fetch(ref, target)
        self._evict(keep=target)
        return target

    # -- internals -------------------------------------------------------------------------

    def _fetch(self, ref: DataRef, target: Path) -> None:
        if ref.remote is None:
            raise DataFetchError(f"{ref.path} is not on this host and no DVC remote is configured: "
                                 "add one (`dvc remote add -d ...`) and `dvc push`")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            download(ref.remote, ref.md5, partial)
            got = file_md5(partial)
            if got != ref.md5:
                raise DataFetchError(f"{ref.remote.object_url(ref.md5)} has md5 {got}, expected {ref.md5} "
                                     "(the remote's copy is corrupt)")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        self._write_seal(target)
        self._count(fetches=1, bytes_fetched=target.stat().st_size)

    def _seal_path(self, target: Path) -> Path:
        return target.with_name(target.name + ".ok")

    def _write_seal(self, target: Path) -> None:
        st = target.stat()
        self._seal_path(target).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns}))

    def _valid(self, target: Path, md5: str) -> bool:
        """A sealed copy whose size and mtime are unchanged is trusted; anything else is re-hashed."""
        try:
            st = target.stat()
        except FileNotFoundError:
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
        """(path, size, last use) of every sealed copy."""
        out = []
        for seal in (self.root / "md5").glob("*/*.ok"):
            data = seal.with_name(seal.name[: -len(".ok")])
            try:
                out.append((data, data.stat().st_size, seal.stat().st_mtime))
            except FileNotFoundError:
                continue
        return out

    def _evict(self, keep: Path) -> None:
        """Remove least recently used copies until the cache fits its cap (never the one just staged).

        A trial still reading an evicted file keeps its open handle (POSIX unlink semantics).
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
                path.unlink(missing_ok=True)
            total -= size
            self._count(evictions=1)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

