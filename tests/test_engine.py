"""The sweep engine's rules, each tested directly on an in-memory store (no server, milliseconds):
the trial state machine, the retry policy, the controller's workers, slots and callbacks."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpsweep.engine.callbacks import SweepCallback
from hpsweep.engine.controller import RetryPolicy, SweepEngine, SweepRun
from hpsweep.engine.gpus import GpuPool
from hpsweep.model import (TRANSITIONS, AttemptResult, IllegalTransition, Outcome, PlannedTrial, TrialJob,
                           TrialState, check_transition)
from tests.memstore import InMemoryStore

OK = Outcome(True, 0.9)
TRAINER_ERROR = Outcome(False, None, "trainer raised ValueError: bad lr")
LOST_HOST = Outcome(False, None, "trainer process killed by SIGKILL", retryable=True, killed=True)


# ---------------------------------------------------------------- the state machine


LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]  # sorted: the same order in every xdist worker
ILLEGAL = [(a, b) for a in TrialState for b in TrialState if b not in TRANSITIONS[a]]


@pytest.mark.parametrize("current,new", LEGAL, ids=[f"{a.value}->{b.value}" for a, b in LEGAL])
def test_each_legal_transition_is_allowed(current, new):
    check_transition(current, new)


@pytest.mark.parametrize("current,new", ILLEGAL, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL])
def test_each_illegal_transition_is_refused(current, new):
    with pytest.raises(IllegalTransition, match=f"{current.value} → {new.value}"):
        check_transition(current, new)


def test_a_finished_trial_is_never_reopened_and_a_failed_one_is_for_a_retry():
    assert TrialState.FINISHED.terminal and TrialState.REUSED.terminal
    assert TRANSITIONS[TrialState.FAILED] == {TrialState.RUNNING} == TRANSITIONS[TrialState.KILLED]
    store = InMemoryStore()
    run_id = store.start_trial_run("1", "s", 1, {"lr": 0.1}, "k1")
    store.finish_trial_run(run_id, OK)
    with pytest.raises(IllegalTransition):
        store.reopen_trial_run(run_id, 2)


def test_the_report_speaks_three_statuses_and_interrupted_for_a_stopped_sweep():
    # INTERRUPTED (issue 14) extends the contract: a stopped sweep's unfinished rows; nothing else changed.
    # STOPPED (issue 17): a trial the early-stopping rule stopped.
    assert {s.report_status for s in TrialState} == {"FINISHED", "REUSED", "FAILED", "INTERRUPTED", "STOPPED"}


# ---------------------------------------------------------------- the retry policy


@pytest.mark.parametrize("outcome,attempt,retry", [
    (OK, 1, False),  # finished: nothing to retry
    (TRAINER_ERROR, 1, False),  # the trainer's own error: never retried
    (LOST_HOST, 1, True),  # the machine's failure, attempts left
    (LOST_HOST, 2, True),
    (LOST_HOST, 3, False),  # out of attempts
])
def test_retry_policy_retries_only_machine_failures_while_attempts_are_left(outcome, attempt, retry):
    assert RetryPolicy(max_attempts=3).should_retry(outcome, attempt) is retry


def test_retry_delays_back_off():
    policy = RetryPolicy(max_attempts=4, first_delay_s=10, backoff=4)
    assert [policy.delay_s(a) for a in (1, 2, 3)] == [10, 40, 160]


def test_one_attempt_means_no_retry():
    assert not RetryPolicy(max_attempts=1).should_retry(LOST_HOST, 1)


# ---------------------------------------------------------------- the controller


class ScriptedLauncher:
    """Plays a script of outcomes per trial index, recording into the in-memory store as a real attempt does."""

    def __init__(self, store: InMemoryStore, script: dict[int, list[Outcome]], seconds: float = 0.0):
        self.store, self.script, self.seconds = store, {k: list(v) for k, v in script.items()}, seconds
        self.jobs: list[TrialJob] = []
        self.gpus: dict[int, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self.running = self.peak = 0

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult:
        with self._lock:
            self.jobs.append(job)
            self.gpus[job.index] = gpu_ids
            self.running += 1
            self.peak = max(self.peak, self.running)
        run_id = job.run_id
        if run_id is None:
            run_id = self.store.start_trial_run(job.experiment_id, job.sweep_id, job.index, job.hparams, job.trial_key,
                                                job.versions)
        else:
            self.store.reopen_trial_run(run_id, job.attempt)
        time.sleep(self.seconds)
        outcome = self.script.get(job.index, [OK]).pop(0) if self.script.get(job.index) else OK
        self.store.finish_trial_run(run_id, outcome)
        with self._lock:
            self.running -= 1
        return AttemptResult(run_id, outcome)


class Recorder(SweepCallback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_sweep_start(self, total, parallel):
        self.events.append(("start", total, parallel))

    def on_trial_start(self, trial):
        self.events.append(("trial_start", trial.index))

    def on_trial_retry(self, trial, attempt, outcome, delay_s):
        self.events.append(("retry", trial.index, attempt, delay_s))

    def on_trial_end(self, trial, attempts, result):
        self.events.append(("end", trial.index, attempts, result.outcome.ok))

    def on_sweep_end(self):
        self.events.append(("sweep_end",))


def sweep_run(gpus: int = 1, resumable: frozenset[str] = frozenset()) -> SweepRun:
    return SweepRun(sweep_id="s1", name="demo", experiment_id="1", parent_run_id="p", tracking_uri="memory://",
                    work_dir=Path("w"), settings={"epochs": 2}, train="train.csv", val="val.csv",
                    entrypoint="tests.trainers:epochs", command=None, time_limit_s=None, gpus=gpus,
                    resumable=resumable)


def trials(n: int) -> list[PlannedTrial]:
    return [PlannedTrial(i, {"lr": i / 10}, f"key{i}") for i in range(1, n + 1)]


def engine(launcher, policy=RetryPolicy(max_attempts=3, first_delay_s=0), **kw) -> SweepEngine:
    return SweepEngine(kw.pop("sweep", sweep_run()), launcher, policy, sleep=lambda s: False, **kw)


def test_a_machine_failure_is_retried_in_the_same_run_and_resumes():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {1: [LOST_HOST, OK]})
    rec = Recorder()
    eng = engine(launcher, RetryPolicy(max_attempts=3, first_delay_s=5), callbacks=[rec])
    eng.run(trials(1), parallel=1)
    first, second = launcher.jobs
    assert (first.attempt, first.run_id, first.resume) == (1, None, False)
    assert (second.attempt, second.resume) == (2, True) and second.run_id is not None
    assert ("retry", 1, 1, 5.0) in rec.events and ("end", 1, 2, True) in rec.events
    assert store.runs[second.run_id].state is TrialState.FINISHED
    assert eng.results[1][0] == 2


def test_a_trainer_error_is_never_retried():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {1: [TRAINER_ERROR, OK]})
    eng = engine(launcher)
    eng.run(trials(1), parallel=1)
    assert len(launcher.jobs) == 1
    attempts, result = eng.results[1]
    assert attempts == 1 and result.outcome.reason == TRAINER_ERROR.reason
    assert store.runs[result.run_id].state is TrialState.FAILED


def test_attempts_stop_at_max_attempts():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {1: [LOST_HOST] * 5})
    rec = Recorder()
    eng = engine(launcher, RetryPolicy(max_attempts=3, first_delay_s=0), callbacks=[rec])
    eng.run(trials(1), parallel=1)
    assert [j.attempt for j in launcher.jobs] == [1, 2, 3]
    assert ("end", 1, 3, False) in rec.events
    assert store.runs[eng.results[1][1].run_id].state is TrialState.KILLED


def test_waits_between_attempts_follow_the_policy():
    store = InMemoryStore()
    waits: list[float] = []
    eng = SweepEngine(sweep_run(), ScriptedLauncher(store, {1: [LOST_HOST, LOST_HOST, OK]}),
                      RetryPolicy(max_attempts=3, first_delay_s=2, backoff=3), sleep=lambda s: waits.append(s))
    eng.run(trials(1), parallel=1)
    assert waits == [2, 6]


def test_resumable_trials_resume_from_their_first_attempt():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {})
    engine(launcher, sweep=sweep_run(resumable=frozenset({"key2"}))).run(trials(2), parallel=1)
    assert {j.index: j.resume for j in launcher.jobs} == {1: False, 2: True}


def test_trials_start_in_the_order_given_one_worker():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {})
    order = [PlannedTrial(i, {"x": i}, f"k{i}") for i in (3, 1, 2)]
    engine(launcher).run(order, parallel=1)
    assert [j.index for j in launcher.jobs] == [3, 1, 2]


def test_each_worker_holds_one_slot_for_its_life_and_at_most_parallel_run():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {}, seconds=0.02)
    held, lock = [], threading.Lock()

    @contextmanager
    def slot():
        with lock:
            held.append(threading.current_thread().name)
        yield

    engine(launcher, hold_slot=slot).run(trials(12), parallel=3)
    assert len(launcher.jobs) == 12 and launcher.peak <= 3
    assert len(held) == 3  # a slot per worker, not per trial


def test_first_trials_start_once_every_worker_holds_its_slot():
    """Slots are asked for before any trial starts (a slot asked for while the first trials' task runs
    wrote to Prefect's server waited seconds for its answer): no trial starts before the last slot is held."""
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {}, seconds=0.01)
    started_at: list[float] = []
    held_at: list[float] = []
    lock = threading.Lock()
    launch = launcher.launch

    def timed_launch(job, gpu_ids):
        with lock:
            started_at.append(time.monotonic())
        return launch(job, gpu_ids)

    launcher.launch = timed_launch

    @contextmanager
    def slot():
        with lock:
            delay = 0.1 * len(held_at)  # each worker's slot comes 0.1 s after the previous one's
            held_at.append(0.0)
        time.sleep(delay)
        with lock:
            held_at[held_at.index(0.0)] = time.monotonic()
        yield

    engine(launcher, hold_slot=slot).run(trials(8), parallel=4)
    assert len(launcher.jobs) == 8
    assert min(started_at) >= max(held_at)


def test_a_worker_whose_slot_is_taken_elsewhere_does_not_hold_back_the_others():
    """Another sweep holds the second slot for 3 s: the first worker starts its trials after the start
    line's window (1 s), not when the second slot comes."""
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {})
    release = threading.Event()
    first = threading.Lock()
    launched_before_release: list[bool] = []
    launch = launcher.launch

    def recording_launch(job, gpu_ids):
        launched_before_release.append(not release.is_set())
        return launch(job, gpu_ids)

    launcher.launch = recording_launch

    @contextmanager
    def slot():
        if not first.acquire(blocking=False):  # every worker but the first waits for another sweep's slot
            release.wait(10)
        yield

    threading.Timer(3.0, release.set).start()
    engine(launcher, hold_slot=slot).run(trials(4), parallel=2)
    assert len(launcher.jobs) == 4 and all(launched_before_release)


def test_running_trials_never_share_a_gpu(tmp_path):
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {}, seconds=0.02)
    pool = GpuPool((0, 1, 2, 3), lock_dir=tmp_path)
    engine(launcher, sweep=sweep_run(gpus=2), gpu_pool=pool).run(trials(6), parallel=2)
    assert all(len(g) == 2 for g in launcher.gpus.values())
    assert {frozenset(g) for g in launcher.gpus.values()} <= {frozenset({0, 1}), frozenset({2, 3})}


def test_a_failing_callback_never_stops_the_sweep():
    class Broken(SweepCallback):
        def on_trial_end(self, trial, attempts, result):
            raise RuntimeError("display gone")

    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {})
    eng = engine(launcher, callbacks=[Broken()])
    eng.run(trials(3), parallel=2)
    assert sorted(eng.results) == [1, 2, 3]


def test_callbacks_see_the_sweep_from_start_to_end():
    store = InMemoryStore()
    rec = Recorder()
    engine(ScriptedLauncher(store, {2: [TRAINER_ERROR]}), callbacks=[rec]).run(trials(2), parallel=1)
    assert rec.events == [("start", 2, 1), ("trial_start", 1), ("end", 1, 1, True), ("trial_start", 2),
                          ("end", 2, 1, False), ("sweep_end",)]


def test_an_attempt_that_raises_is_a_machine_failure_retried_and_the_sweep_goes_on():
    class Exploding(ScriptedLauncher):
        def launch(self, job, gpu_ids):
            if job.index == 1:
                raise ConnectionError("Prefect API gone")
            return super().launch(job, gpu_ids)

    store = InMemoryStore()
    rec = Recorder()
    eng = engine(Exploding(store, {}), callbacks=[rec])
    eng.run(trials(4), parallel=2)
    assert sorted(eng.results) == [1, 2, 3, 4]
    attempts, result = eng.results[1]
    assert attempts == 3 and not result.outcome.ok
    assert "ConnectionError: Prefect API gone" in result.outcome.reason
    assert ("end", 1, 3, False) in rec.events


def test_no_trials_still_starts_and_ends_the_sweep():
    rec = Recorder()
    engine(ScriptedLauncher(InMemoryStore(), {}), callbacks=[rec]).run([], parallel=1)
    assert rec.events == [("start", 0, 1), ("sweep_end",)]


# ---------------------------------------------------------------- early stopping (issue 17)

STOPPED = Outcome(False, 0.41, "stopped at step 3: val_f1 0.4100 < median 0.7700 of 3 trials", killed=True,
                  stopped=True, stopped_at_step=3)


def test_a_stopped_trial_is_neither_retried_nor_counted_as_failed_and_keeps_its_best_value():
    store = InMemoryStore()
    launcher = ScriptedLauncher(store, {1: [STOPPED, OK]})
    eng = engine(launcher, max_failures=1)
    eng.run(trials(2), parallel=1)
    assert len(launcher.jobs) == 2  # no retry of trial 1, and --max-failures 1 was not reached by it
    assert eng.failed == 0 and not eng.stopped_after_failures
    row = store.runs[eng.results[1][1].run_id].row
    assert (row.state, row.f1, row.stopped_at_step) == (TrialState.STOPPED, 0.41, 3)
    assert row.report_status == "STOPPED" and not row.has_f1


def test_a_stopped_trial_may_run_again_in_a_later_sweep_but_a_finished_one_never():
    check_transition(TrialState.RUNNING, TrialState.STOPPED)
    check_transition(TrialState.STOPPED, TrialState.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(TrialState.STOPPED, TrialState.FINISHED)


def test_the_stopper_asks_to_stop_exactly_the_running_trial_below_the_median():
    from hpsweep.engine.early_stop import EarlyStopRule
    from hpsweep.engine.stopper import EarlyStopper

    store = InMemoryStore()
    finals = {1: 0.9, 2: 0.85, 3: 0.8, 4: 0.2, 5: 0.88}
    ids = {i: store.start_trial_run("1", "s1", i, {"f1": f}, f"key{i}") for i, f in finals.items()}
    for i in (1, 2, 3):  # three trials ended with their whole curves
        for step in range(1, 6):
            store.log_metric(ids[i], "val_f1", step, finals[i] * step / 5)
        store.finish_trial_run(ids[i], Outcome(True, finals[i]))
    stopper = EarlyStopper(store, EarlyStopRule("median", min_steps=2), "1", "s1")
    for step in (1, 2):  # two running trials report steps 1 and 2
        for i in (4, 5):
            store.log_metric(ids[i], "val_f1", step, finals[i] * step / 5)
    assert stopper.poll() == {ids[4]: (2, "stopped at step 2: val_f1 0.0800 < median 0.2595 of 4 trials")}
    assert store.runs[ids[4]].tags["hpsweep.stop_request"].startswith("stopped at step 2")
    assert "hpsweep.stop_request" not in store.runs[ids[5]].tags
    assert stopper.poll() == {}  # asked once
