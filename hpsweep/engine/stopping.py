"""How a sweep is stopped: a person's Ctrl-C, or SIGTERM from ECS, Docker or systemd.

The first SIGINT or SIGTERM asks for a clean stop: launch nothing more, send the running trials
SIGTERM (they save a checkpoint), give them ``grace_s`` to end, then report what finished and
close every run as interrupted. A second signal stops at once: the trials are killed. Whatever
happens, the process exits ``128 + signal`` at most ``grace_s + EXIT_MARGIN_S`` after the first
signal (a watchdog makes sure of it, even when the tracking store does not answer).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("hpsweep")

DEFAULT_GRACE_S = 30.0
# After the grace: time to write the report and close the runs before the watchdog exits anyway.
EXIT_MARGIN_S = 10.0
HANDLED = (signal.SIGINT, signal.SIGTERM)


class SlotWaitAbandoned(Exception):
    """The sweep stopped while a worker still waited for a quota slot."""


class StopRequest:
    """A stop asked of the sweep: by which signal, and whether it must be immediate.

    Listeners (the engine, the launchers) are called once per step: ``fn(force=False)`` on the
    first signal, ``fn(force=True)`` on the second. Thread-safe; the handlers only set state
    and start a thread, so nothing heavy runs inside a signal handler.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.forced = False
        self.event = threading.Event()  # set with the first signal: for waits that should give up
        self._listeners: list[Callable[..., None]] = []
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signum or 0)

    def listen(self, fn: Callable[..., None]) -> None:
        """Call ``fn(force=...)`` on each step of the stop (at once if a stop was already asked)."""
        with self._lock:
            self._listeners.append(fn)
            steps = [False] if self.requested else []
            steps += [True] if self.forced else []
        for force in steps:
            fn(force=force)

    def request(self, signum: int) -> None:
        """A signal arrived: the first asks for a clean stop, any later one forces it."""
        with self._lock:
            if self.signum is None:
                self.signum, force = signum, False
                self.event.set()
            elif not self.forced:
                self.forced, force = True, True
            else:
                return
            listeners = list(self._listeners)
        threading.Thread(target=self._notify, args=(listeners, force), name="hpsweep-stop", daemon=True).start()

    def _notify(self, listeners: list[Callable[..., None]], force: bool) -> None:
        for fn in listeners:
            try:
                fn(force=force)
            except Exception:  # noqa: BLE001 - one listener failing must not keep the others from stopping
                log.warning("stopping: %r failed", fn, exc_info=True)


@contextmanager
def stop_on_signals(stop: StopRequest, exit_after: Callable[[int], None] = os._exit,
                    margin_s: float = EXIT_MARGIN_S) -> Iterator[StopRequest]:
    """While inside: SIGINT and SIGTERM go to ``stop`` instead of raising KeyboardInterrupt or
    killing the process. A watchdog calls ``exit_after(exit code)`` if the process is still in
    here ``grace_s + margin_s`` after the first signal, or ``margin_s`` after a second.
    Only the main thread can install handlers: elsewhere this is a no-op (a Prefect worker's
    flow run in a thread is stopped by Prefect's cancellation instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    done = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        first = not stop.requested
        stop.request(signum)
        if first:
            log.warning("%s: stopping: no new trials; running trials get SIGTERM and %.0f s to save a "
                        "checkpoint; the report follows (again to stop at once)", stop.signal_name, stop.grace_s)
            _watchdog(done, stop.grace_s + margin_s, stop, exit_after)
        else:
            log.warning("%s again: killing the running trials now", signal.Signals(signum).name)
            _watchdog(done, margin_s, stop, exit_after)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield stop
    finally:
        done.set()
        for s, h in previous.items():
            signal.signal(s, h)


def _watchdog(done: threading.Event, after_s: float, stop: StopRequest, exit_after: Callable[[int], None]) -> None:
    def watch() -> None:
        if not done.wait(after_s):
            log.error("still stopping after %.0f s: exiting now (runs left open are closed by the next sweep)",
                      after_s)
            exit_after(stop.exit_code)

    threading.Thread(target=watch, name="hpsweep-stop-watchdog", daemon=True).start()


def end_after_grace(send: Callable[[int], None], grace_s: float, kill_after_s: float,
                    ended: threading.Event, name: str = "hpsweep-grace") -> threading.Thread:
    """Unless ``ended`` is set first: ``send(SIGTERM)`` after ``grace_s``, then ``send(SIGKILL)``
    ``kill_after_s`` later (a trial told to stop that does not, as with time limits)."""
    def escalate() -> None:
        for wait_s, signum in ((grace_s, signal.SIGTERM), (kill_after_s, signal.SIGKILL)):
            if ended.wait(wait_s):
                return
            send(signum)

    thread = threading.Thread(target=escalate, name=name, daemon=True)
    thread.start()
    return thread
