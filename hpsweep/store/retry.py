"""The one retry policy for tracking calls (tenacity): hpsweep's bookkeeping outlives a tracking
server restart or a network blip instead of failing a trial that trained fine. An answer the store
meant (a 4xx: invalid, too long, not found, forbidden) is never retried: another try cannot change it."""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, MutableMapping, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger("hpsweep.store")
T = TypeVar("T")

# How long bookkeeping calls keep retrying while the tracking server is unreachable.
TRACKING_PATIENCE_S = 900.0
# The longest wait between two tries of a bookkeeping call.
MAX_WAIT_S = 10.0
# MLflow's own HTTP client (urllib3) retries each request before hpsweep sees an error. Its defaults
# (7 retries, back-off factor 2) sleep 0, 4, 8, 16, 32, 64, 120 s (+ up to 1 s jitter): a trial sat
# idle 107 s after the server came back. 4 retries at factor 1 sleep 0, 2, 4, 8 s (+ up to 1 s), ~15 s
# per call; then tenacity waits at most MAX_WAIT_S before the next call. Once the store answers
# again, the next try comes within max(9, 10) = 10 s (< 15 s). setdefault: a user's own values win.
# MLflow's request timeout (120 s) is left alone: it bounds a hung request, and a shorter one turns
# slow writes into ambiguous retries.
CLIENT_BACKOFF = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0"}
# 4xx answers another try can change: request timeout, conflict, rate limit, cancelled.
RETRYABLE_4XX = frozenset({408, 409, 429, 499})
# Client errors MLflow's status table does not map to a 4xx (its servers answer them with 400).
CLIENT_ERROR_CODES = frozenset({"MALFORMED_REQUEST", "RESOURCE_LIMIT_EXCEEDED", "MAX_BLOCK_SIZE_EXCEEDED",
                                "MAX_READ_SIZE_EXCEEDED", "MAX_LIST_SIZE_EXCEEDED", "SEARCH_QUERY_TOO_LONG",
                                "SEARCH_QUERY_TOO_SHORT", "INVALID_STATE_TRANSITION", "FEATURE_DISABLED"})
# A proxy's non-JSON 4xx: MLflow calls it INTERNAL_ERROR (500) but keeps the status in its message.
_PROXY_STATUS = re.compile(r"failed with error code (\d{3}) ")


def cap_client_backoff(environ: MutableMapping[str, str] | None = None) -> None:
    """Bound MLflow's HTTP client back-off (CLIENT_BACKOFF) in this process and the trials it starts
    (they inherit the environment). Call before the first tracking request."""
    env = os.environ if environ is None else environ
    for name, value in CLIENT_BACKOFF.items():
        env.setdefault(name, value)


def refused_by_store(e: BaseException) -> bool:
    """The tracking store answered and meant it: a 4xx (other than RETRYABLE_4XX) or a client error
    code, from a server or from MLflow's own validation (which raises the same codes client-side)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return False
    status = e.get_http_status_code()
    if status >= 500 and (proxied := _PROXY_STATUS.search(e.message)):
        status = int(proxied.group(1))
    return (400 <= status < 500 and status not in RETRYABLE_4XX) or e.error_code in CLIENT_ERROR_CODES


# Errors of hpsweep's own making (a bad argument, a bug): another try would fail the same way.
NEVER_TRANSIENT = (ValueError, TypeError, LookupError, AttributeError, AssertionError)


def _transient(e: BaseException) -> bool:
    """Worth another try: anything but the store's own refusal, an illegal state change, or an error
    hpsweep made itself (NEVER_TRANSIENT; MlflowException is not one of them)."""
    from mlflow.exceptions import MlflowException

    from hpsweep.model import IllegalTransition

    if isinstance(e, NEVER_TRANSIENT) and not isinstance(e, MlflowException):
        return False
    return isinstance(e, Exception) and not isinstance(e, IllegalTransition) and not refused_by_store(e)


def retrying(fn: Callable[[], T], what: str, deadline_s: float = TRACKING_PATIENCE_S,
             first_wait_s: float = 0.5) -> T:
    """Call ``fn`` until it succeeds or ``deadline_s`` has passed (then re-raise its error), backing
    off exponentially to MAX_WAIT_S between tries. The store's refusals (``refused_by_store``) and
    illegal state changes are raised at once. ``fn`` may run again after a failure whose effect is
    unknown (a timeout after the server acted): it must be idempotent."""
    for attempt in Retrying(stop=stop_after_delay(deadline_s), reraise=True,
                            wait=wait_exponential(multiplier=first_wait_s, min=first_wait_s, max=MAX_WAIT_S),
                            retry=retry_if_exception(_transient),
                            before_sleep=lambda state: _log_retry(what, state)):
        with attempt:
            return fn()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


def _log_retry(what: str, state: RetryCallState) -> None:
    e = state.outcome.exception() if state.outcome else None
    log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, str(e)[:200],
                state.next_action.sleep if state.next_action else 0.0)
