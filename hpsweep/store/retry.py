"""The one retry policy for tracking calls (tenacity): hpsweep's bookkeeping outlives a tracking
server restart or a network blip instead of failing a trial that trained fine."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger("hpsweep.store")
T = TypeVar("T")

# How long bookkeeping calls keep retrying while the tracking server is unreachable.
TRACKING_PATIENCE_S = 900.0
# MLflow error codes that another try cannot fix.
PERMANENT_ERRORS = frozenset({"RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED",
                              "UNAUTHENTICATED", "INVALID_PARAMETER_VALUE"})


def _transient(e: BaseException) -> bool:
    """Worth another try: anything but an answer the server meant (not found, forbidden, invalid)."""
    from mlflow.exceptions import MlflowException

    from hpsweep.model import IllegalTransition

    if isinstance(e, IllegalTransition):
        return False
    if isinstance(e, MlflowException):
        return e.error_code not in PERMANENT_ERRORS
    return isinstance(e, Exception)


def retrying(fn: Callable[[], T], what: str, deadline_s: float = TRACKING_PATIENCE_S,
             first_wait_s: float = 0.5) -> T:
    """Call ``fn`` until it succeeds or ``deadline_s`` has passed (then re-raise its error), backing
    off exponentially to 10 s between tries. Answers the server meant (PERMANENT_ERRORS) are raised at once."""
    for attempt in Retrying(stop=stop_after_delay(deadline_s), reraise=True,
                            wait=wait_exponential(multiplier=first_wait_s, min=first_wait_s, max=10.0),
                            retry=retry_if_exception(_transient),
                            before_sleep=lambda state: _log_retry(what, state)):
        with attempt:
            return fn()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


def _log_retry(what: str, state: RetryCallState) -> None:
    e = state.outcome.exception() if state.outcome else None
    log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, str(e)[:200],
                state.next_action.sleep if state.next_action else 0.0)
