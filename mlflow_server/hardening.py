"""The server's app wrapper: what MLflow's basic-auth app lacks, around every request.

- **Login rate limit.** Failed logins (a 401 to a request that carried credentials) are counted
  per client address and per username; past ``MLFLOW_AUTH_MAX_FAILURES`` within
  ``MLFLOW_AUTH_FAILURE_WINDOW_S`` the address, or the user from any address that has failed
  too, gets 429 with ``Retry-After`` for ``MLFLOW_AUTH_LOCKOUT_S``. An address with no failure
  of its own still logs that user in, so guessing a password cannot lock its owner out.
  In memory, per worker process (so per ECS task: each worker counts on its own).
- **``/health`` checks PostgreSQL** (``SELECT 1`` within ``MLFLOW_HEALTH_DB_TIMEOUT_S``): 503
  when it cannot, so the load balancer stops routing to a task that cannot serve.
- **No AI gateway.** hpsweep uses none of it, so its routes answer "disabled" and server-info
  advertises ``"gateway": false``.

It wraps MLflow's ASGI app (the FastAPI app in front of the Flask one) rather than adding Flask
hooks: ``/health``, server-info and artifact uploads are native FastAPI routes Flask never sees.

``python -m mlflow_server.hardening server …`` is ``mlflow server …`` with ``--app-name
basic-auth`` resolved to ``create_app`` below (MLflow finds apps only through installed entry
points), so MLflow still bootstraps the admin before it starts its uvicorn workers.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg

from mlflow_server.settings import Guards, load

log = logging.getLogger("mlflow_server")

APP = "mlflow_server.hardening:create_app"
HEALTH_PATH = "/health"
# MLflow's switch for its AI gateway (endpoints, stored provider keys, guardrails, budgets).
GATEWAY_SWITCH = "MLFLOW_ENABLE_AI_GATEWAY"
# Enough for every address and user of a busy day; the oldest idle ones are forgotten first.
MAX_TRACKED_KEYS = 50_000

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]


def disable_unused_features(environ: dict[str, str] | os._Environ = os.environ) -> None:
    environ[GATEWAY_SWITCH] = "false"


# ---------------------------------------------------------------- login rate limit

@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class FailureLimiter:
    """Counts failed logins per key (``("addr", ip)``, ``("user", name)``) in a sliding window.
    Not thread-safe by itself: the ASGI event loop is its only caller."""

    def __init__(self, max_failures: int, window_s: float, lockout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window_s, self.lockout_s, self.clock = max_failures, window_s, lockout_s, clock
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def retry_after(self, addr: str | None, user: str | None) -> float:
        """Seconds this request must wait (0: let it through). A locked user is refused only
        from addresses that have failed recently themselves."""
        now = self.clock()
        addr_state = self._current(("addr", addr), now) if addr else None
        waits = [addr_state.blocked_until - now] if addr_state else []
        if user and addr_state and addr_state.times:
            user_state = self._current(("user", user), now)
            if user_state:
                waits.append(user_state.blocked_until - now)
        return max([0.0, *waits])

    def record_failure(self, addr: str | None, user: str | None) -> None:
        now = self.clock()
        for key in ((("addr", addr),) if addr else ()) + ((("user", user),) if user else ()):
            state = self._current(key, now) or _Failures()
            state.times.append(now)
            if len(state.times) >= self.max_failures and state.blocked_until <= now:
                state.blocked_until = now + self.lockout_s
                log.warning("login rate limit: %s %r locked for %.0f s after %d failures",
                            key[0], key[1], self.lockout_s, len(state.times))
            self._keys[key] = state
            self._keys.move_to_end(key)
        while len(self._keys) > MAX_TRACKED_KEYS:
            self._keys.popitem(last=False)

    def _current(self, key: tuple[str, str], now: float) -> _Failures | None:
        """The key's state with failures older than the window dropped; None once it is clean."""
        state = self._keys.get(key)
        if state is None:
            return None
        if state.blocked_until and state.blocked_until <= now:  # a lockout served wipes the slate
            state.times.clear()
            state.blocked_until = 0.0
        while state.times and state.times[0] <= now - self.window_s:
            state.times.popleft()
        if not state.times and not state.blocked_until:
            del self._keys[key]
            return None
        return state


def basic_auth_username(scope: Scope) -> str | None:
    """The username of an ``Authorization: Basic`` header, if the request has a readable one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:6].lower() == b"basic ":
            try:
                return base64.b64decode(value[6:].strip(), validate=True).decode("utf-8").split(":", 1)[0] or None
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def _has_credentials(scope: Scope) -> bool:
    return any(name == b"authorization" for name, _ in scope.get("headers", ()))


# ---------------------------------------------------------------- health

def database_answers(uri: str, password: str | None, timeout_s: int) -> bool:
    """``SELECT 1`` on a fresh connection within ``timeout_s`` (connecting included)."""
    from mlflow_server.database import libpq_uri

    try:
        with psycopg.connect(libpq_uri(uri), password=password, connect_timeout=timeout_s, autocommit=True,
                             options=f"-c statement_timeout={timeout_s * 1000}") as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error as e:
        log.warning("health: PostgreSQL does not answer (%s)", str(e).strip().splitlines()[0] if str(e) else e)
        return False


# ---------------------------------------------------------------- the wrapper

class HardenedApp:
    """ASGI middleware around MLflow's app: health, then the login rate limit, then MLflow."""

    def __init__(self, app: ASGIApp, guards: Guards, database_check: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.database_check = database_check
        self.limiter = FailureLimiter(guards.auth_max_failures, guards.auth_failure_window_s, guards.auth_lockout_s,
                                      clock)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan, websockets: MLflow's own handling
            return await self.app(scope, receive, send)
        if scope["path"] == HEALTH_PATH:
            return await self._health(send)
        addr = (scope.get("client") or (None,))[0]
        user = basic_auth_username(scope)
        wait = self.limiter.retry_after(addr, user)
        if wait > 0:
            return await _respond(send, 429, {"error_code": "RESOURCE_EXHAUSTED",
                                              "message": f"Too many failed logins: retry in {math.ceil(wait)} s"},
                                  [(b"retry-after", str(math.ceil(wait)).encode())])
        credentials = _has_credentials(scope)

        async def watching_send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401 and credentials:
                self.limiter.record_failure(addr, user)
            await send(message)

        await self.app(scope, receive, watching_send)

    async def _health(self, send: Callable) -> None:
        healthy = await anyio.to_thread.run_sync(self.database_check)
        await _respond(send, 200 if healthy else 503, None, [], b"OK" if healthy else b"database unavailable")


async def _respond(send: Callable, status: int, payload: dict | None, headers: list[tuple[bytes, bytes]],
                   text: bytes = b"") -> None:
    body = json.dumps(payload).encode() if payload is not None else text
    content_type = b"application/json" if payload is not None else b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def create_app() -> HardenedApp:
    """uvicorn's factory in each worker: MLflow's basic-auth app, wrapped."""
    disable_unused_features()
    from mlflow.server.auth import create_app as basic_auth_app

    guards = load(model=Guards)
    uri, password = os.environ["MLFLOW_BACKEND_STORE_URI"], os.environ.get("PGPASSWORD")
    return HardenedApp(basic_auth_app(), guards, lambda: database_answers(uri, password, guards.health_db_timeout_s))


def main(argv: list[str]) -> int:
    """``mlflow <argv>``, with the basic-auth app resolved to ``create_app``."""
    import mlflow.server
    from mlflow.cli import cli

    find_app = mlflow.server._find_app
    mlflow.server._find_app = lambda name: APP if name == "basic-auth" else find_app(name)
    disable_unused_features()
    return cli.main(args=argv, prog_name="mlflow")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
