"""The trials' fork server: started as early as `hpsweep run` can, told its tracking store later.

Each trial is a process forked from one fork server that has imported MLflow and the trainer's
module and opened the tracking store (``hpsweep.runtime._preload``): seconds of work, so it must
overlap the sweep's own start-up. This module imports nothing heavy, so `hpsweep run` starts the
fork server before it imports MLflow itself (1 s) and before the tracking store is checked: the
store's URI reaches the fork server through a file once the sweep has checked the store, and the
fork server opens it last, after its imports.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

# Set for the fork server only (see hpsweep/runtime/_preload.py).
TRACKING_URI_ENV = "HPSWEEP_FORKSERVER_TRACKING_URI"  # the tracking store its trials will open (given outright)
TRACKING_URI_FILE_ENV = "HPSWEEP_FORKSERVER_TRACKING_URI_FILE"  # ... or where that URI will be written
MODULES_ENV = "HPSWEEP_FORKSERVER_MODULES"  # the trainer's modules, comma-separated
MAIN_ENV = "HPSWEEP_FORKSERVER_MAIN"  # the sweep's main module, as multiprocessing names it

# How long the fork server waits for the URI once its imports are done (the sweep checks its store
# in well under a second; on a store that never answers the trials open it themselves).
TRACKING_URI_WAIT_S = 120.0

_uri_file: Path | None = None


def start_fork_server(preload: list[str] | None = None, uri_later: bool = False) -> None:
    """Start (and preload) this process's trial fork server in the background; returns at once.

    Call it before starting threads (its settings travel in the environment). With ``uri_later``
    and then ``hand_over_tracking_store``, the fork server opens that tracking store once and every trial inherits it instead of opening (and schema-checking) its own.
    Idempotent: once the server runs, later calls only make sure it still does (the first preload
    list wins).
    """
    global _uri_file
    mp = multiprocessing.get_context("forkserver")
    # The trainer's modules are imported by _preload itself, which exits with the sweep until its
    # imports are done; so is the sweep's main module (MAIN_ENV).
    mp.set_forkserver_preload(["hpsweep.runtime.runner", "hpsweep.runtime._preload"])
    os.environ[MODULES_ENV] = ",".join(preload or [])
    os.environ[MAIN_ENV] = json.dumps(_main_module())
    if uri_later and _uri_file is None:
        _uri_file = Path(tempfile.mkdtemp(prefix="hpsweep-forkserver-")) / "tracking-uri"
        atexit.register(shutil.rmtree, _uri_file.parent, True)  # when the fork server never read it
        os.environ[TRACKING_URI_FILE_ENV] = str(_uri_file)
    threading.Thread(target=multiprocessing.forkserver.ensure_running, daemon=True).start()


def hand_over_tracking_store(uri: str) -> None:
    """Tell the fork server started with ``uri_later`` which tracking store its trials use, once the
    sweep has checked it (the fork server never opens, and so never creates, a store unchecked)."""
    if _uri_file is None:
        return
    tmp = _uri_file.with_suffix(".tmp")
    tmp.write_text(uri)
    os.replace(tmp, _uri_file)  # whole or absent


def tracking_uri(wait_s: float = TRACKING_URI_WAIT_S) -> str | None:
    """In the fork server: the tracking store to open, waiting for the sweep to hand it over."""
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    path = os.environ.get(TRACKING_URI_FILE_ENV)
    if not path:
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            uri = Path(path).read_text()
        except FileNotFoundError:
            time.sleep(0.02)
            continue
        shutil.rmtree(Path(path).parent, ignore_errors=True)  # read once: nothing left in /tmp
        return uri
    return None


def _main_module() -> dict[str, str]:
    """How multiprocessing names this process's main module to each child ({"init_main_from_name":
    "hpsweep.cli"} under `python -m hpsweep.cli`, {"init_main_from_path": ...} for a script): a child
    whose own __main__ is not that one runs it again before its target starts."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("trial")
    return {k: data[k] for k in ("init_main_from_name", "init_main_from_path") if k in data}
