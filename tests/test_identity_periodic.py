"""Process identities (is the orchestrator of a trial, or the owner of a run, certainly gone?) and
the one helper behind every background loop. No servers; events, not timings, decide."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from hpsweep.identity import identity_is_dead, process_identity
from hpsweep.periodic import Periodic

PATIENCE_S = 30.0  # only a guard against a hang: every wait below ends on an event


def test_an_identity_names_this_host_pid_and_start_time():
    me = process_identity()
    host, pid, start = me.rsplit(":", 2)
    assert (host, int(pid)) == (socket.gethostname(), os.getpid()) and float(start) > 0
    assert process_identity(os.getpid()) == me  # stable: the same process has one identity


def test_a_live_process_is_not_dead_and_an_exited_one_is():
    child = subprocess.Popen(["sleep", "300"])
    try:
        identity = process_identity(child.pid)
        assert not identity_is_dead(identity)
    finally:
        child.kill()
        child.wait()
    assert identity_is_dead(identity)


def test_a_reused_pid_is_another_process():
    host, pid, start = process_identity().rsplit(":", 2)
    assert identity_is_dead(f"{host}:{pid}:{float(start) - 3600:.2f}")  # this pid, an hour earlier


@pytest.mark.parametrize("identity", [
    "some-other-host.invalid:1:1700000000.00",  # we cannot look at another host's processes
    None, "", "garbage", "a:b", f"{socket.gethostname()}:not-a-pid:1.00",
])
def test_what_cannot_be_checked_is_not_dead(identity):
    assert not identity_is_dead(identity)


class Calls:
    """A ``fn`` for ``Periodic`` that counts its calls, can fail, and lets a test wait for the n-th."""

    def __init__(self, fail_first: int = 0, returns: object = None):
        self.count, self.fail_first, self.returns = 0, fail_first, returns
        self._changed = threading.Condition()

    def __call__(self) -> object:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
        if self.count <= self.fail_first:
            raise RuntimeError(f"call {self.count} fails")
        return self.returns

    def wait_for(self, n: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= n, PATIENCE_S)


def test_periodic_calls_fn_repeatedly_until_stopped():
    calls = Calls()
    beats = Periodic(0.01, calls, "test-beats").start()
    assert calls.wait_for(3)
    assert beats.stop(PATIENCE_S)
    assert not any(t.name == "test-beats" for t in threading.enumerate())  # the thread ended


def test_periodic_goes_on_when_fn_raises():
    calls = Calls(fail_first=2)
    with Periodic(0.01, calls, "test-failing"):
        assert calls.wait_for(4)  # two failures, then still called


def test_first_calls_at_once_and_last_calls_at_stop():
    calls = Calls()
    beats = Periodic(3600, calls, "test-first", first=True).start()
    assert calls.wait_for(1)  # not an hour later
    beats.stop(PATIENCE_S)
    assert calls.count == 1  # no last call unless asked

    calls = Calls()
    Periodic(3600, calls, "test-last", last=True).start().stop(PATIENCE_S)
    assert calls.count == 1  # the interval never passed: only the call at stop

    calls = Calls()
    with Periodic(3600, calls, "test-both", first=True, last=True):
        assert calls.wait_for(1)
    assert calls.count == 2


def test_stop_says_when_fn_is_still_busy():
    release, entered = threading.Event(), threading.Event()

    def busy() -> None:
        entered.set()
        release.wait(PATIENCE_S)

    beats = Periodic(3600, busy, "test-busy", first=True).start()
    assert entered.wait(PATIENCE_S)
    assert beats.stop(timeout_s=0.01) is False  # the caller is not held up by a stuck call
    release.set()
    assert beats.stop(PATIENCE_S) is True
