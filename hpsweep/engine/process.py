"""One process per trial attempt on this host, forked from a preloaded fork server.

Each trial is a process forked from a fork server that has already imported MLflow and
the trainer's module, so starting a trial costs milliseconds, not the seconds a fresh
Python interpreter needs. A crashing, hanging or memory-hungry trainer takes down only
its own process group.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

from hpsweep.engine.outcome import judge, read_result
from hpsweep.model import HEARTBEAT_S, Outcome
from hpsweep.periodic import Periodic
from hpsweep.runtime.runner import TrialRequest, run_trial_process

# How often a running trial mirrors new checkpoints to the artifact store.
CHECKPOINT_SYNC_S = float(os.environ.get("HPSWEEP_CHECKPOINT_SYNC_S", "30"))

# Grace between SIGTERM and SIGKILL when a time limit hits: enough to save a checkpoint.
KILL_GRACE_S = 5.0


# Set for the fork server only: the tracking store its trials will open (see hpsweep/runtime/_preload.py).
FORKSERVER_TRACKING_URI_ENV = "HPSWEEP_FORKSERVER_TRACKING_URI"


def start_fork_server(preload: list[str] | None = None, tracking_uri: str | None = None) -> None:
    """Start (and preload) this process's trial fork server in the background; returns at once.

    Preloading MLflow and the trainer's module takes seconds (tens on a busy 2-core machine):
    call this as early as possible (``hpsweep run`` does, right after validating its inputs) so
    that it overlaps the sweep's own start-up instead of delaying the first trials. With
    ``tracking_uri`` (call it before starting threads: it is passed in the environment), the
    fork server also opens that tracking store once, and every trial inherits it instead of
    opening (and schema-checking) its own. Idempotent: once the server runs, later calls only
    make sure it still does (the first preload list wins).
    """
    mp = multiprocessing.get_context("forkserver")
    # "__main__" too: otherwise every trial re-imports the main script before it starts.
    mp.set_forkserver_preload(["__main__", "hpsweep.runtime.runner", "hpsweep.runtime._preload", *(preload or [])])
    if tracking_uri:
        os.environ[FORKSERVER_TRACKING_URI_ENV] = tracking_uri
    threading.Thread(target=multiprocessing.forkserver.ensure_running, daemon=True).start()


class ProcessRunner:
    """Runs one attempt of a trial in its own process on this host; never raises for a
    trainer's failure (it is an outcome). Safe to call from several threads at once."""

    def __init__(self, preload: list[str] | None = None, start_method: str = "forkserver"):
        """``forkserver`` (the sweep: many trials, from a process with many threads) or ``fork``
        (a pool's train-trial flow run: one trial, from a process that has imported it all)."""
        self._mp = multiprocessing.get_context(start_method)
        self._preload, self._server_started = preload, start_method != "forkserver"
        self._start_lock = threading.Lock()

    def run(self, request: TrialRequest, time_limit_s: float | None,
            heartbeat: Callable[[], None] | None = None) -> Outcome:
        with self._start_lock:  # the fork server starts with the first trial (`hpsweep run` starts it earlier)
            if not self._server_started:
                start_fork_server(self._preload)
                self._server_started = True
        paths = request.paths
        for stale in (paths.result, paths.outcome):
            stale.unlink(missing_ok=True)
        if not request.job.resume:  # a fresh start: nothing of an earlier, finished run carries over
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
            paths.log.unlink(missing_ok=True)
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        _empty_dir(paths.model)
        proc = self._mp.Process(target=run_trial_process, args=(request,), name=f"trial-{request.run_id}")
        proc.start()  # returns once forked: the fork server's one-time preload is not the trial's time
        started = time.time()
        # Heartbeats beat in their own thread: one stuck on a tracking outage never delays the time limit.
        beats = Periodic(HEARTBEAT_S, heartbeat, f"heartbeat-{request.run_id}").start() if heartbeat else None
        try:
            proc.join(time_limit_s)
        finally:
            if beats is not None:
                beats.stop(timeout_s=0)
        timed_out = proc.is_alive()
        if timed_out:
            _kill_group(proc)
        ended = time.time()
        reported = _read_json(paths.outcome)
        outcome = judge(
            exitcode=proc.exitcode,
            timed_out=timed_out,
            time_limit_s=time_limit_s,
            outcome=reported,
            result=read_result(paths.result),  # bounded: a trainer may write anything there
            log_tail=_read_tail(paths.log) if reported is None and not timed_out else None,
            log_hint=f"artifact {paths.log.name} of run {request.run_id}",  # the launcher logs it there
        )
        proc.close()
        return outcome.timed(started, ended)


def _kill_group(proc: multiprocessing.process.BaseProcess) -> None:
    """SIGTERM the trial's whole process group, then SIGKILL what is left after the grace."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.join(KILL_GRACE_S)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.join()


def _empty_dir(path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _read_tail(path, size: int = 16 * 1024) -> str | None:
    """The last ``size`` bytes of a text file, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_json(path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {"value": data}


