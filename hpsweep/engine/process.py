"""One process per trial attempt on this host, forked from a preloaded fork server.

Each trial is a process forked from a fork server that has already imported MLflow and
the trainer's module, so starting a trial costs milliseconds, not the seconds a fresh
Python interpreter needs. A crashing, hanging or memory-hungry trainer takes down only
its own process group.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

from hpsweep.engine.outcome import judge, read_result
from hpsweep.engine.stopping import end_after_grace
from hpsweep.model import HEARTBEAT_S, Outcome
from hpsweep.periodic import Periodic
from hpsweep.runtime.forkserver import start_fork_server
from hpsweep.runtime.runner import TrialRequest, run_trial_process

# How often a running trial mirrors new checkpoints to the artifact store.
CHECKPOINT_SYNC_S = float(os.environ.get("HPSWEEP_CHECKPOINT_SYNC_S", "30"))

# Grace between SIGTERM and SIGKILL when a time limit hits: enough to save a checkpoint.
KILL_GRACE_S = 5.0

# How often a trial's host asks the tracking store whether the sweep's early-stopping rule stopped it.
STOP_POLL_S = float(os.environ.get("HPSWEEP_STOP_POLL_S", "5"))


class ProcessRunner:
    """Runs one attempt of a trial in its own process on this host; never raises for a
    trainer's failure (it is an outcome). Safe to call from several threads at once."""

    def __init__(self, preload: list[str] | None = None, start_method: str = "forkserver"):
        """``forkserver`` (the sweep: many trials, from a process with many threads) or ``fork``
        (a pool's train-trial flow run: one trial, from a process that has imported it all)."""
        self._mp = multiprocessing.get_context(start_method)
        self._preload, self._server_started = preload, start_method != "forkserver"
        self._start_lock = threading.Lock()
        self._live: set[int] = set()  # process (group) ids of the trials running now
        self._stopped_by: str | None = None  # why the sweep is stopping: no trial starts after it

    def interrupt(self, grace_s: float, reason: str) -> None:
        """Stop every running trial: SIGTERM to its process group now (it saves what it can), SIGKILL
        after ``grace_s`` (at once when 0); trials asked to start from now on end at once. Each
        stopped trial's outcome says ``reason`` and is not retried."""
        with self._start_lock:
            self._stopped_by = reason
            live = list(self._live)
        for pid in live:
            _signal_group(pid, signal.SIGKILL if grace_s <= 0 else signal.SIGTERM)
        if grace_s > 0 and live:
            timer = threading.Timer(grace_s, lambda: [_signal_group(pid, signal.SIGKILL) for pid in live])
            timer.daemon = True
            timer.start()

    def run(self, request: TrialRequest, time_limit_s: float | None,
            heartbeat: Callable[[], None] | None = None,
            stop_request: Callable[[], tuple[int, str] | None] | None = None) -> Outcome:
        """``stop_request``: asks whether the sweep's early-stopping rule stopped the trial ((step,
        reason) or None); polled every STOP_POLL_S while it runs (see ``_StopWatch``)."""
        with self._start_lock:  # the fork server starts with the first trial (`hpsweep run` starts it earlier)
            if not self._server_started:
                start_fork_server(self._preload)
                self._server_started = True
        if self._stopped_by is not None:
            now = time.time()
            return Outcome(False, None, f"not started: {self._stopped_by}", killed=True, interrupted=True,
                           started_at=now, ended_at=now)
        paths = request.paths
        for stale in (paths.result, paths.outcome, paths.stop):
            stale.unlink(missing_ok=True)
        if not request.job.resume:  # a fresh start: nothing of an earlier, finished run carries over
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
            paths.log.unlink(missing_ok=True)
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        _empty_dir(paths.model)
        proc = self._mp.Process(target=run_trial_process, args=(request,), name=f"trial-{request.run_id}")
        with self._start_lock:  # a stop between the check above and here still reaches this trial
            proc.start()  # returns once forked: the fork server's one-time preload is not the trial's time
            self._live.add(proc.pid)
            stopping = self._stopped_by is not None
        if stopping:
            _signal_group(proc.pid, signal.SIGTERM)
        started = time.time()
        # Heartbeats beat in their own thread: one stuck on a tracking outage never delays the time limit.
        beats = Periodic(HEARTBEAT_S, heartbeat, f"heartbeat-{request.run_id}").start() if heartbeat else None
        # A stop_request comes with the job's early-stopping settings ({"metric", "grace_s"}).
        watch = (_StopWatch(stop_request, paths.stop, proc.pid, float(request.job.early_stop["grace_s"]))
                 if stop_request else None)
        try:
            proc.join(time_limit_s)
        finally:
            if beats is not None:
                beats.stop(timeout_s=0)
            if watch is not None:
                watch.close()
        timed_out = proc.is_alive()
        if timed_out:
            _kill_group(proc)
        with self._start_lock:
            self._live.discard(proc.pid)
            stopped_by = self._stopped_by
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
        if stopped_by is not None and not outcome.ok:  # it ended because the sweep stopped it
            outcome = Outcome(False, None, stopped_by, killed=True, interrupted=True)
        elif watch is not None and watch.told is not None and not timed_out:
            # Told to stop: whether it returned early, was ended after the grace or went down with an
            # error on the way, it is STOPPED (its checkpoints kept: a later sweep resumes it).
            step, reason = watch.told
            outcome = Outcome(False, None, reason, killed=True, stopped=True, stopped_at_step=step)
        return outcome.timed(started, ended)


class _StopWatch:
    """Polls the sweep's early-stopping decision for one running trial. Once it is there: writes the
    stop file (the reason), which ``ctx.should_stop()`` and command trainers see, and ends the trial's
    process group if it still runs ``grace_s`` later (SIGTERM, SIGKILL after KILL_GRACE_S)."""

    def __init__(self, ask: Callable[[], tuple[int, str] | None], stop_file, pid: int, grace_s: float):
        self._ask, self._stop_file, self._pid, self._grace_s = ask, stop_file, pid, grace_s
        self.told: tuple[int, str] | None = None
        self._ended = threading.Event()
        self._poll = Periodic(STOP_POLL_S, self._check, f"stop-watch-{pid}").start()

    def _check(self) -> None:
        if self.told is not None:
            return
        decision = self._ask()
        if decision is None:
            return
        tmp = self._stop_file.with_name(self._stop_file.name + ".tmp")
        tmp.write_text(decision[1] + "\n")
        os.replace(tmp, self._stop_file)  # whole or absent: a trainer never reads half a reason
        self.told = decision
        end_after_grace(lambda signum: _signal_group(self._pid, signum), self._grace_s, KILL_GRACE_S, self._ended,
                        f"stop-grace-{self._pid}")

    def close(self) -> None:
        self._ended.set()
        self._poll.stop(timeout_s=0)


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


def _signal_group(pid: int, signum: int) -> None:
    """Signal the trial's process group, or the trial alone if it has not made its group yet."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, signum)
            return
        except (ProcessLookupError, PermissionError):
            continue


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


