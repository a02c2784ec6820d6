"""Live progress of a running sweep: done / failed / running / ETA.

The flow reports to whatever sink the caller installed (the CLI installs a rich display);
by default events are only logged. Sinks are called from trial threads, so must be thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hpsweep")


class ProgressSink:
    """Counts trials; subclasses render. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = self.done = self.failed = self.running = 0
        self.started_at = time.monotonic()
        self._durations: list[float] = []
        self.parallel = 1

    def begin(self, total: int, parallel: int) -> None:
        with self._lock:
            self.total, self.parallel, self.started_at = total, parallel, time.monotonic()
        self.render()

    def trial_started(self, name: str) -> None:
        with self._lock:
            self.running += 1
        self.render()

    def trial_ended(self, name: str, ok: bool, duration_s: float, detail: str) -> None:
        with self._lock:
            self.running -= 1
            self.done += ok
            self.failed += not ok
            self._durations.append(duration_s)
        log.info("trial %s %s: %s", name, "finished" if ok else "FAILED", detail)
        self.render()

    def eta_s(self) -> float | None:
        """Remaining trials × mean duration / parallel slots (None until one trial has ended)."""
        with self._lock:
            if not self._durations:
                return None
            remaining = self.total - self.done - self.failed
            mean = sum(self._durations) / len(self._durations)
            return remaining * mean / max(1, self.parallel)

    def summary(self) -> str:
        eta = self.eta_s()
        return (f"{self.done + self.failed}/{self.total} ended · {self.done} finished · {self.failed} failed · "
                f"{self.running} running · ETA {'?' if eta is None else f'{eta:.0f}s'}")

    def render(self) -> None:  # the default sink only logs (see trial_ended)
        pass

    def close(self) -> None:
        pass


_sink: ProgressSink = ProgressSink()


def current() -> ProgressSink:
    return _sink


def install(sink: ProgressSink) -> None:
    global _sink
    _sink = sink
