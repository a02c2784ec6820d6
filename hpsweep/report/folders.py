"""Where reports go: ``reports/<name>/<sweep_id>/`` per sweep execution, so no sweep ever overwrites
another's report, and ``reports/<name>/latest`` showing the newest one (what `dvc.yaml` and the README
point at).

``latest`` is a relative symlink, swapped in atomically (a reader sees the old sweep or the new one,
never no ``latest``); where links cannot be made (some Windows setups, some network filesystems) it
is a copy of the folder instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import suppress
from pathlib import Path

__all__ = ["LATEST", "REPORTS_ROOT", "move_latest", "point_latest", "sweep_report_dir"]

REPORTS_ROOT = Path("reports")
LATEST = "latest"

log = logging.getLogger("hpsweep")


def sweep_report_dir(name: str, sweep_id: str, root: Path = REPORTS_ROOT) -> Path:
    """The default report folder of one sweep execution: ``reports/<name>/<sweep_id>``."""
    return root / name / sweep_id


def point_latest(sweep_dir: Path) -> Path:
    """Make ``latest`` beside ``sweep_dir`` show it, and return ``latest``'s path.

    A relative symlink made under a temporary name then renamed over the old one (``os.replace``
    is atomic). Where a link cannot be made, a copy of ``sweep_dir``, built under a temporary name
    and swapped in (a directory cannot be renamed over another, so there the old copy is moved
    aside first: a reader may miss ``latest`` for that instant). Raises ``OSError`` if neither works.
    """
    latest = sweep_dir.parent / LATEST
    tmp = sweep_dir.parent / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.symlink_to(sweep_dir.name, target_is_directory=True)
    except OSError:
        shutil.copytree(sweep_dir, tmp)
    try:
        if latest.is_dir() and not latest.is_symlink():  # a copy (this host, or one before it, had no links)
            old = latest.with_name(f".{LATEST}.old.{uuid.uuid4().hex[:8]}")
            latest.rename(old)
            os.replace(tmp, latest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, latest)
    except BaseException:
        with suppress(OSError):
            if tmp.is_symlink():
                tmp.unlink()
            else:
                shutil.rmtree(tmp)
        raise
    return latest


def move_latest(sweep_dir: Path) -> Path | None:
    """``point_latest``, best-effort: a failure costs only the pointer (one warning), never the report."""
    try:
        return point_latest(sweep_dir)
    except OSError as e:
        log.warning("report: %s still shows an older sweep: %s", sweep_dir.parent / LATEST,
                    " ".join(f"{type(e).__name__}: {e}".split())[:300])
        return None
