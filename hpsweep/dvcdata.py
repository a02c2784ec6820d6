"""What DVC knows about the sweep's data: content hashes, whether DVC has recorded them, and the remote.

The data version on every run is the file's md5, which for a file is exactly DVC's hash
(DVC 3 hashes a file's raw bytes). It is computed from the workspace, not read from a
`.dvc` file or `dvc.lock`, so data edited without `dvc add`/`dvc repro` still gets a new
version and never reuses trials trained on the old bytes. Hashing tens of GB once per change
is the price; a memo keyed by (path, size, mtime, inode) makes every later sweep free, as
DVC's own state database does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from hpsweep.datacache import DataRef, Remote, file_md5

MEMO_ENV = "HPSWEEP_HASH_MEMO"


def _memo_path() -> Path:
    return Path(os.environ.get(MEMO_ENV) or Path.home() / ".cache" / "hpsweep" / "hashes.json")


def content_md5(path: Path) -> str:
    """md5 of a file's bytes, remembered while its size, mtime and inode stay the same."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo_file = _memo_path()
    try:
        memo: dict[str, Any] = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(str(path))
    if hit and hit.get("stamp") == stamp:
        return str(hit["md5"])
    md5 = file_md5(path)
    memo[str(path)] = {"stamp": stamp, "md5": md5}
    try:  # best effort: a read-only home only costs a re-hash next time
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass
    return md5


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
    """How a trial host gets ``path``: its content hash, and the DVC remote when DVC holds these bytes.

    The remote is only named when DVC's record matches the workspace; otherwise the remote
    holds other bytes (or none), and a host without the file cannot train on it.
    """
    path = Path(path).resolve()
    md5 = content_md5(path)
    remote = None
    root = dvc_root(path.parent)
    if root is not None and recorded_md5(path) == md5:
        remote = default_remote(root)
    return DataRef(path=str(path), md5=md5, size=path.stat().st_size, remote=remote)
