"""Prefect's temporary API server (the embedded default: no PREFECT_API_URL), tied to the sweep.

Prefect starts it as a plain child process, so it shares the sweep's process group and outlives
the sweep: Ctrl-C in the terminal kills it under the running sweep (which then cannot record a
thing), and kill -9 of the sweep leaves it running for ever. Here it gets its own session (a
terminal's signals reach only the sweep, which stops it cleanly) and a parent-death signal (it
exits when the sweep dies, however it dies).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 120


class TetheredServer(SubprocessASGIServer):
    """Prefect's ``SubprocessASGIServer`` (one per process: Prefect's clients find this instance),
    started through ``python -m hpsweep.engine.tempserver PARENT_PID ...``.

    ``_run_uvicorn_command`` is Prefect's private method; the command and environment are
    Prefect's own (prefect/server/api/server.py, Prefect 3.x), only the launch differs.
    tests/test_signals.py fails if an upgrade changes how Prefect finds or starts its server.
    """

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), *command], env=env,
                                start_new_session=True)


def start_temporary_server() -> SubprocessASGIServer | None:
    """Start the embedded default's Prefect server now, tethered; None when a Prefect API is
    configured. Call it from the main thread: the parent-death signal follows the thread that
    started the child."""
    if get_current_settings().api.url:
        return None
    server = TetheredServer()
    # Prefect's 20 s start-up budget is too short on a busy 2-core machine (seen in CI): two
    # minutes, unless the user set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
    user_set = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ
    server.start(timeout=None if user_set else STARTUP_TIMEOUT_S)
    return server


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the server outlives a sweep killed with -9 (a clean exit still stops it)
    if os.getppid() != parent_pid:
        sys.exit(0)


if __name__ == "__main__":  # python -m hpsweep.engine.tempserver PARENT_PID PROGRAM [ARGS...]
    _die_with_parent(int(sys.argv[1]))
    os.execv(sys.argv[2], sys.argv[2:])
