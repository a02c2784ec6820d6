"""Is the data a trial reads still the version its sweep recorded?

The sweep hashes its train and validation data once (the data version in every trial key) and
seals each with its metadata (hpsweep.dvcdata.data_seal: size, mtime and inode of every file).
A trial checks the seal before its trainer starts and again after it ends: one ``stat`` per file
while nothing changed; a changed seal means a re-hash, and only different bytes fail the trial.
A cached copy on a pool host (hpsweep.datacache) is named by its md5 and was checked when staged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpsweep.dvcdata import content_md5, data_seal
from hpsweep.model import TrialJob
from hpsweep.store.tags import TAG_DATA_VERSION

DATA_CHANGED = "data changed during the sweep"
NAMES = ("train", "val")  # the order of the halves of hpsweep.data_version


@dataclass(frozen=True)
class DataChange:
    """One of the trial's data (``train`` or ``val``) that no longer holds the recorded bytes."""

    name: str
    path: str
    recorded: str
    now: str

    def __str__(self) -> str:
        return f"{self.path} (recorded {self.recorded[:8]}, now {self.now[:8]})"


def changed_reason(changes: list[DataChange]) -> str:
    """The trial's failure reason: ``data changed during the sweep: <path> (recorded <md5>, now <md5>)``."""
    return f"{DATA_CHANGED}: " + ", ".join(map(str, changes))


def recorded_versions(job: TrialJob) -> dict[str, str]:
    """name → the md5 the trial is keyed and tagged with (its ``hpsweep.data_version``: "<train>/<val>"),
    else the md5 of its DataRef; names the sweep recorded nothing for are left out."""
    tagged = job.versions.get(TAG_DATA_VERSION, "").split("/")
    found = dict(zip(NAMES, tagged)) if len(tagged) == len(NAMES) else {}
    for name in NAMES:
        if not found.get(name) and job.data.get(name, {}).get("md5"):
            found[name] = job.data[name]["md5"]
    return {name: md5 for name, md5 in found.items() if md5}


def data_changes(job: TrialJob, read: dict[str, str]) -> list[DataChange]:
    """The data among ``read`` (name → the path this trial reads) whose bytes differ from the recorded
    version. Cheap while nothing changed: a ``stat`` per file, no reads."""
    recorded = recorded_versions(job)
    changes = []
    for name, path in read.items():
        if name in recorded:
            now = _current_md5(path, recorded[name], job.data.get(name) or {})
            if now != recorded[name]:
                changes.append(DataChange(name, path, recorded[name], now))
    return changes


def version_read(job: TrialJob, changes: list[DataChange]) -> str:
    """``hpsweep.data_version`` of the bytes actually there: the recorded one with ``changes`` applied."""
    now = {**recorded_versions(job), **{c.name: c.now for c in changes}}
    return "/".join(now.get(name, "") for name in NAMES)


def _current_md5(path: str, recorded: str, ref: dict[str, Any]) -> str:
    if not ref.get("path") or not ref.get("md5"):
        return recorded  # a job without DataRefs (built by hand): nothing to check against
    if Path(path).resolve() != Path(ref["path"]):
        return str(ref["md5"])  # a cached copy of ``ref``'s bytes, checked when staged
    try:
        if ref.get("seal") and ref.get("md5") == recorded and data_seal(Path(path)) == ref["seal"]:
            return recorded
        return content_md5(Path(path))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({type(e).__name__})"
