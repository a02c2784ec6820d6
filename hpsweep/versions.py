"""Versions that identify what a trial trained on: spec, data, code, and the trial key.

The trial key is the identity of one unit of GPU work: the same key means the same
hparams on the same data with the same spec and trainer code, so its result can be reused.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from hpsweep.datacache import file_md5
from hpsweep.dvcdata import content_md5
from hpsweep.inputs import Hparams, ModelSpec, canonical_json, resolve_entrypoint

def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def spec_hash(spec: ModelSpec) -> str:
    """Hash of the spec's content (not its formatting or comments)."""
    return _sha256(canonical_json(spec.model_dump(mode="json")))[:16]


def data_version(path: Path) -> str:
    """DVC's md5 of a file, or DVC's `.dir` md5 of a folder (hpsweep.dvcdata.content_md5, memoized):
    the hash a `.dvc` file or `dvc.lock` records for the same bytes.

    Read from the bytes, not from a `.dvc` file, so data changed without `dvc add` is a new version.
    """
    return content_md5(path)


def code_version(spec: ModelSpec) -> str:
    """Hash of the trainer's own source: the entry point's module file, or the files a command names."""
    trainer = spec.trainer
    if trainer.entrypoint is not None:
        fn = resolve_entrypoint(trainer.entrypoint)
        module = __import__(fn.__module__, fromlist=["_"])
        source = getattr(module, "__file__", None)
        return _sha256(trainer.entrypoint, file_md5(Path(source)) if source else "")[:16]
    parts = list(trainer.command or [])
    parts += [file_md5(Path(a)) for a in trainer.command or [] if Path(a).is_file()]
    return _sha256(*parts)[:16]


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's sha with '-dirty' when the tree has changes; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def trial_key(hparams: Hparams, spec_version: str, data_versions: str, code: str) -> str:
    return _sha256(canonical_json(hparams), spec_version, data_versions, code)[:24]
