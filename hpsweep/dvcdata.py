"""What DVC knows about the sweep's data: content hashes, whether DVC has recorded them, and the remote.

The data version on every run is exactly DVC's hash: for a file, the md5 of its raw bytes (DVC 3);
for a folder, DVC's `.dir` md5 (the md5 of the JSON listing of its files' relpaths and md5s, plus
".dir"), so a folder dataset of shards is versioned, recorded and pushed as DVC does it. It is
computed from the workspace, not read from a `.dvc` file or `dvc.lock`, so data edited without
`dvc add`/`dvc repro` still gets a new version and never reuses trials trained on the old bytes.
Hashing tens of GB once per change is the price; a memo keyed by (path, size, mtime, inode) per
file makes every later sweep free, as DVC's own state database does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from hpsweep.datacache import DataRef, Remote, file_md5

MEMO_ENV = "HPSWEEP_HASH_MEMO"


def _memo_path() -> Path:
    return Path(os.environ.get(MEMO_ENV) or Path.home() / ".cache" / "hpsweep" / "hashes.json")


class _Memo:
    """The on-disk memo of file md5s (read once, written once per hashing, best effort)."""

    def __init__(self) -> None:
        self.file = _memo_path()
        try:
            self.entries: dict[str, Any] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def md5(self, path: Path) -> str:
        stamp = file_stamp(path)
        hit = self.entries.get(str(path))
        if hit and hit.get("stamp") == stamp:
            return str(hit["md5"])
        md5 = file_md5(path)
        self.entries[str(path)] = {"stamp": stamp, "md5": md5}
        self.changed = True
        return md5

    def save(self) -> None:
        if not self.changed:
            return
        try:  # best effort: a read-only home only costs a re-hash next time
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.file)
        except OSError:
            pass


def file_stamp(path: Path) -> list[int]:
    """What a rewrite of a file changes without reading it: size, mtime and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def data_seal(path: Path) -> str:
    """A fingerprint of a file or folder from its metadata only (``file_stamp`` of each file, one
    ``stat`` each, no reads): while it stays the same, an md5 taken with it still holds."""
    path = Path(path).resolve()
    if not path.is_dir():
        return "-".join(map(str, file_stamp(path)))
    listing = [[rel, *file_stamp(f)] for rel, f in folder_files(path)]
    return "dir-" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


# What DVC never puts in a folder's listing (dvc.ignore's defaults); `.dvcignore` patterns are not read.
_DVC_IGNORED = {".git", ".hg", ".dvc"}


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relpath with '/', path) of every file under ``folder``, as DVC lists them: sorted by relpath."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in _DVC_IGNORED]
        for name in filenames:
            if name != ".git":
                path = Path(dirpath) / name
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def dir_listing_md5(listing: list[dict[str, str]]) -> str:
    """DVC's md5 of a folder from its listing ([{"md5", "relpath"}] sorted by relpath): the `.dir` object's
    md5 plus ".dir", as in a `.dvc` file, `dvc.lock` and the remote's `files/md5/xx/yyyy.dir`."""
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def content_md5(path: Path) -> str:
    """DVC's md5 of a file (its bytes) or of a folder (``dir_listing_md5``); each file's md5 is
    remembered while its size, mtime and inode stay the same."""
    path = Path(path).resolve()
    memo = _Memo()
    try:
        if not path.is_dir():
            return memo.md5(path)
        return dir_listing_md5([{"md5": memo.md5(f), "relpath": rel} for rel, f in folder_files(path)])
    finally:
        memo.save()


def content_size(path: Path) -> int:
    """Bytes in a file, or in all the files of a folder."""
    path = Path(path)
    return sum(f.stat().st_size for _, f in folder_files(path)) if path.is_dir() else path.stat().st_size


def dvc_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding a `.dvc/` folder."""
    for folder in [start, *start.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def recorded_md5(path: Path) -> str | None:
    """The md5 DVC recorded for ``path``: its `.dvc` file, or a stage's outs in `dvc.lock`."""
    path = Path(path).resolve()
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []:
            if (dvc_file.parent / out.get("path", "")).resolve() == path and out.get("md5"):
                return str(out["md5"])
    root = dvc_root(path.parent)
    lock = root / "dvc.lock" if root else None
    if lock and lock.is_file():
        for stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if (root / out.get("path", "")).resolve() == path and out.get("md5"):
                    return str(out["md5"])
    return None


def default_remote(root: Path) -> Remote | None:
    """The repository's default DVC remote (`dvc remote add -d`), with relative URLs made absolute."""
    from dvc.config import Config  # imported here: ~0.5 s, once per sweep

    dvc_dir = root / ".dvc"
    config = Config(dvc_dir=str(dvc_dir), local_dvc_dir=str(dvc_dir), validate=True)
    name = config["core"].get("remote")
    if not name or name not in config["remote"]:
        return None
    remote = config["remote"][name]
    return Remote(url=str(remote["url"]), endpoint_url=remote.get("endpointurl"))


def data_ref(path: Path) -> DataRef:
    """How a trial host gets ``path`` (a file or a folder): its DVC hash, the DVC remote when DVC
    holds these bytes, and its seal (``data_seal``), with which each trial checks cheaply that the
    sweep's files still hold those bytes (hpsweep.runtime.datacheck).

    The remote is only named when DVC's record matches the workspace; otherwise the remote
    holds other bytes (or none), and a host without the file cannot train on it.
    """
    path = Path(path).resolve()
    seal = data_seal(path)  # before hashing: a change while hashing makes trials re-hash, never trust
    md5 = content_md5(path)
    remote = None
    root = dvc_root(path.parent)
    if root is not None and recorded_md5(path) == md5:
        remote = default_remote(root)
    return DataRef(path=str(path), md5=md5, size=content_size(path), remote=remote, seal=seal)
