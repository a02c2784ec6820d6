"""The sweep controller: a queue of trials, one worker per quota slot, one retry policy.

Each worker holds a quota slot (and its GPUs) for its whole life and runs queued trials back to
back in it, so a freed slot goes to the next trial at once. A trial's attempts all happen in one
function (``_run_trial``): the retry decision is ``RetryPolicy``'s alone, and the run id carries
from one attempt to the next in a local variable. The attempts themselves record their run's state
changes (``launcher.execute_trial``, through the store, which checks each one). Nothing here knows Prefect: the flow passes in how to hold a slot and how to
run an attempt (as a task run), so the engine is tested in milliseconds on an in-memory store.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

from hpsweep.engine.callbacks import Callbacks, SweepCallback
from hpsweep.engine.gpus import GpuPool
from hpsweep.engine.launcher import TrialLauncher
from hpsweep.engine.stopping import SlotWaitAbandoned, StopRequest
from hpsweep.model import AttemptResult, Outcome, PlannedTrial, TrialJob, interrupted_reason

log = logging.getLogger("hpsweep")


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is tried again, and after how long.

    Only failures of the machine (``Outcome.retryable``: a signal, a lost host, tracking down) are
    retried, at most ``max_attempts`` attempts in all; a trainer's own error never is.
    """

    max_attempts: int = 3
    first_delay_s: float = 10.0
    backoff: float = 4.0

    def should_retry(self, outcome: Outcome, attempt: int) -> bool:
        return not outcome.ok and outcome.retryable and attempt < self.max_attempts

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt ``attempt + 1``."""
        return self.first_delay_s * self.backoff ** (attempt - 1)


@dataclass(frozen=True)
class SweepRun:
    """What every trial of one sweep execution shares: plain, immutable data."""

    sweep_id: str
    name: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    work_dir: Path
    settings: dict[str, Any]
    train: str
    val: str
    entrypoint: str | None
    command: list[str] | None
    time_limit_s: float | None
    gpus: int
    versions: dict[str, str] = field(default_factory=dict)  # spec/data/code versions, tagged on every trial
    data_refs: dict[str, dict[str, Any]] = field(default_factory=dict)  # DVC refs: hosts without the files fetch
    resumable: frozenset[str] = frozenset()  # trial keys with an unfinished run: their checkpoints count
    early_stop: dict[str, Any] | None = None  # {"metric", "grace_s"} when an early-stopping rule is on

    def job(self, trial: PlannedTrial, attempt: int, run_id: str | None) -> TrialJob:
        return TrialJob(
            sweep_id=self.sweep_id, experiment_id=self.experiment_id, parent_run_id=self.parent_run_id,
            tracking_uri=self.tracking_uri, index=trial.index, hparams=trial.hparams, trial_key=trial.key,
            attempt=attempt, settings=dict(self.settings), train=self.train, val=self.val, data=self.data_refs,
            entrypoint=self.entrypoint, command=self.command, time_limit_s=self.time_limit_s, gpus=self.gpus,
            run_id=run_id, work_dir=str(self.work_dir), versions=self.versions,
            resume=attempt > 1 or trial.key in self.resumable, early_stop=self.early_stop)


# How long the first worker to hold its slot waits for the others before its first trial starts.
START_WINDOW_S = 1.0


class StartLine:
    """The workers' first trials start once every worker holds its slot, or START_WINDOW_S after
    the first one did (the others wait for a slot another sweep holds).

    Why: taking a slot is a request to the Prefect server, and so are the first trials' task runs.
    Slots asked for while the first trials started waited up to 2 s for the server's answer, so
    two of four workers began 1.9 s late in most sweeps (bench S1); asked for together, all four
    slots take ~0.1 s."""

    def __init__(self, parties: int, window_s: float = START_WINDOW_S):
        self._parties, self._window_s = parties, window_s
        self._arrived = 0
        self._first_at: float | None = None
        self._lock = threading.Lock()
        self._all_in = threading.Event()

    def wait(self) -> None:
        with self._lock:
            self._arrived += 1
            if self._first_at is None:
                self._first_at = time.monotonic()
            if self._arrived >= self._parties:
                self._all_in.set()
            deadline = self._first_at + self._window_s
        self._all_in.wait(max(0.0, deadline - time.monotonic()))


AttemptRunner = Callable[[TrialJob, tuple[int, ...]], AttemptResult]
SlotHolder = Callable[[], AbstractContextManager[Any]]


class SweepEngine:
    """Runs a sweep's trials under its quota. ``run`` returns when every trial has ended."""

    def __init__(self, sweep: SweepRun, launcher: TrialLauncher, policy: RetryPolicy,
                 callbacks: list[SweepCallback] = (), gpu_pool: GpuPool | None = None,
                 hold_slot: SlotHolder = nullcontext, run_attempt: AttemptRunner | None = None,
                 sleep: Callable[[float], bool] | None = None, stop: StopRequest | None = None,
                 max_failures: int | None = None):
        """``hold_slot``: a context manager holding one quota slot (a Prefect concurrency limit);
        ``run_attempt``: how an attempt runs (default ``launcher.launch``; the flow wraps it in a task
        run); ``sleep``: waits between attempts (an Event's wait, so a stop cuts it short); ``stop``:
        a stop request (signals): on it, no trial starts and the launcher ends the running ones;
        ``max_failures``: after that many trials failed for good, no trial starts (running ones finish)."""
        self.sweep, self.policy = sweep, policy
        self._callbacks = Callbacks(list(callbacks))
        self._gpu_pool = gpu_pool or GpuPool(())
        self._hold_slot = hold_slot
        self._launcher = launcher
        self._run_attempt = run_attempt or launcher.launch
        self.stopping = threading.Event()  # set once a stop is asked: workers start nothing more
        self._sleep = sleep or self.stopping.wait
        self.results: dict[int, tuple[int, AttemptResult]] = {}  # trial index → (attempts, last result)
        self._results_lock = threading.Lock()
        self.max_failures, self.failed = max_failures, 0
        self.stopped_after_failures = False  # --max-failures was reached: the rest never started
        if stop is not None:
            stop.listen(lambda force: self.stop(stop.grace_s, interrupted_reason(stop.signal_name), force))

    def stop(self, grace_s: float, reason: str, force: bool = False) -> None:
        """Start no more trials; the launcher ends the running ones (``grace_s`` to checkpoint, or at once)."""
        self.stopping.set()
        self._launcher.interrupt(0.0 if force else grace_s, reason)

    def run(self, trials: list[PlannedTrial], parallel: int) -> None:
        """Train ``trials`` (in this order), at most ``parallel`` at once."""
        self._callbacks.emit("on_sweep_start", len(trials), parallel)
        try:
            if trials:
                self._run_workers(trials, parallel)
        finally:
            self._callbacks.emit("on_sweep_end")

    def _run_workers(self, trials: list[PlannedTrial], parallel: int) -> None:
        queue: Queue[PlannedTrial] = Queue()
        for t in trials:
            queue.put(t)
        # Each worker thread runs in a copy of the caller's context (a Prefect flow run's, so the
        # attempts' task runs belong to it), taken here because threads do not inherit contexts.
        contexts = [contextvars.copy_context() for _ in range(parallel)]
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="gpu-worker") as threads:
            start_line = StartLine(parallel)
            workers = [threads.submit(ctx.run, self._worker, queue, start_line) for ctx in contexts]
            for w in workers:
                try:
                    w.result()
                except Exception as e:  # noqa: BLE001 - the other workers go on draining the queue
                    log.error("a GPU worker failed: %s: %s", type(e).__name__, e)

    def _worker(self, queue: "Queue[PlannedTrial]", start_line: "StartLine") -> None:
        """One quota slot: hold it and its GPUs while trials are queued (and the sweep is not stopping)."""
        try:
            self._hold_and_run(queue, start_line)
        except SlotWaitAbandoned:
            return  # stopped while waiting for a slot: its trials stay queued (reported interrupted)

    def _hold_and_run(self, queue: "Queue[PlannedTrial]", start_line: "StartLine") -> None:
        with self._hold_slot():
            start_line.wait()
            gpu_ids = self._gpu_pool.take(self.sweep.gpus)
            try:
                while not self.stopping.is_set():
                    try:
                        trial = queue.get_nowait()
                    except Empty:
                        return
                    self._run_trial(trial, gpu_ids)
            finally:
                self._gpu_pool.give_back(gpu_ids)

    def _run_trial(self, trial: PlannedTrial, gpu_ids: tuple[int, ...]) -> AttemptResult:
        """Every attempt of one trial, until it finishes, fails for good, or runs out of attempts."""
        self._callbacks.emit("on_trial_start", trial)
        run_id: str | None = None
        attempt = 1
        while True:
            result = self._attempt(self.sweep.job(trial, attempt, run_id), gpu_ids)
            run_id = result.run_id or run_id
            if self.stopping.is_set() or not self.policy.should_retry(result.outcome, attempt):
                break
            delay = self.policy.delay_s(attempt)
            self._callbacks.emit("on_trial_retry", trial, attempt, result.outcome, delay)
            attempt += 1
            self._sleep(delay)
        with self._results_lock:
            self.results[trial.index] = (attempt, result)
            if not result.outcome.ok and not result.outcome.interrupted and not result.outcome.stopped:
                self.failed += 1
                if self.max_failures is not None and self.failed >= self.max_failures and not self.stopping.is_set():
                    self.stopped_after_failures = True
                    self.stopping.set()  # fail fast: start nothing more; running trials finish
                    log.warning("%d trials failed (--max-failures %d): starting no more", self.failed,
                                self.max_failures)
        self._callbacks.emit("on_trial_end", trial, attempt, result)
        return result

    def _attempt(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult:
        """One attempt; a launcher (or the task run around it) raising is the machine's failure."""
        started = time.time()
        try:
            return self._run_attempt(job, gpu_ids)
        except Exception as e:  # noqa: BLE001 - an outage of the orchestration, not the trainer's doing
            reason = f"hpsweep could not run attempt {job.attempt}: {type(e).__name__}: {e}"
            return AttemptResult(job.run_id, Outcome(False, None, reason, retryable=True, started_at=started,
                                                     ended_at=time.time()))
