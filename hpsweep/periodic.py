"""One helper for every background loop (heartbeats, checkpoint sync, system metrics, watchdogs)."""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Callable

log = logging.getLogger("hpsweep")


class Periodic:
    """Calls ``fn`` every ``interval_s`` seconds in a daemon thread until stopped; a context manager.

    ``fn`` raising is logged at debug level and the loop goes on (a missed beat is not worth a
    failed trial). ``first=True`` calls it once at the start; ``last=True`` once more at stop,
    after the loop ended (skipped when ``fn`` is still busy after ``timeout_s``: ``stop`` then returns False).
    """

    def __init__(self, interval_s: float, fn: Callable[[], object], name: str, *, first: bool = False,
                 last: bool = False):
        self._interval_s, self._fn, self._first, self._last = interval_s, fn, first, last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> "Periodic":
        self._thread.start()
        return self

    def _call(self) -> None:
        try:
            self._fn()
        except Exception as e:  # noqa: BLE001 - a background beat must never kill its thread
            log.debug("%s: %s: %s", self._thread.name, type(e).__name__, e)

    def _loop(self) -> None:
        if self._first:
            self._call()
        while not self._stop.wait(self._interval_s):
            self._call()

    def stop(self, timeout_s: float | None = None) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        done = not self._thread.is_alive()
        if self._last and done:  # never beside a call still running in the thread
            self._call()
        return done

    def __enter__(self) -> "Periodic":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
