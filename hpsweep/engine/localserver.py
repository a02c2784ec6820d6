"""The embedded default's Prefect server: one local server per user and Prefect database, started on
first use and kept warm until it has been idle for a while (no PREFECT_API_URL configured).

A command finds it (or starts it) under a file lock, so sweeps starting together share one. It runs
in its own session (a terminal's Ctrl-C reaches only the sweep) under a small supervisor,
``python -m hpsweep.engine.localserver serve FOLDER IDLE_S``, which owns it and enforces the idle
timeout itself: no client has to be alive for the server to stop, so a sweep killed with -9 leaves
it for at most the idle timeout. "In use" is any registered holder process still alive (a running
sweep: no heartbeat thread needed, a sweep stopped with Ctrl-Z keeps it too), or the last use
(``last-used``'s mtime, touched by every command) within the timeout.

Its folder (state file, lock, holders, log) is ``$PREFECT_HOME/hpsweep-server-<uid>`` (mode 0700,
``HPSWEEP_SERVER_DIR`` overrides it): Prefect's own home, so the server serves the database that
`prefect` and earlier hpsweep versions use (the quota limit, flow runs), one server per database, and
never another user's (the uid in the name, the owner checked).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from hpsweep.identity import die_with_parent

DIR_ENV = "HPSWEEP_SERVER_DIR"
IDLE_ENV = "HPSWEEP_SERVER_IDLE_S"
DEFAULT_IDLE_S = 1800.0
# Set (to its URL) in a process that points Prefect at the local server: it is then still the
# embedded default (hpsweep.engine.quota.embedded_default), not a Prefect API the user configured.
ADOPTED_ENV = "HPSWEEP_LOCAL_PREFECT_API_URL"
START_TIMEOUT_S = 180.0  # a cold start takes 5-16 s (a fresh database: migrations); a busy CI machine needed a minute
LOCK_TIMEOUT_S = START_TIMEOUT_S + 60  # another command may be starting it
SILENT_AFTER_S = 60.0  # a running server that does not answer its health check for this long is replaced
MODULE = "hpsweep.engine.localserver"  # ``python -m`` it (here, __name__ may be "__main__")


class LocalServerError(RuntimeError):
    """The local Prefect server could not be started or stopped."""


@dataclass(frozen=True)
class ServerState:
    """What ``state.json`` records about a running local server (written once it answers)."""

    pid: int  # the supervisor's; its process group holds the server too
    create_time: float  # the supervisor's start (psutil): a reused pid is not the supervisor
    url: str  # the API, e.g. http://127.0.0.1:8123/api
    idle_s: float
    started_at: float
    folder: str
    prefect_home: str  # the PREFECT_HOME (so the database) it serves

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


# ---------------------------------------------------------------- where, and how long


def server_folder() -> Path:
    """This user's folder for the local server of PREFECT_HOME's database; created 0700."""
    explicit = os.environ.get(DIR_ENV)
    folder = Path(explicit).expanduser() if explicit else Path(_prefect_home()) / f"hpsweep-server-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stat = folder.stat()
    if stat.st_uid != os.getuid():
        raise LocalServerError(f"{folder} belongs to another user: hpsweep never shares its local Prefect server "
                               f"(set {DIR_ENV} to a folder of your own)")
    if stat.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def idle_timeout_s() -> float:
    """``HPSWEEP_SERVER_IDLE_S`` (seconds), else 30 minutes; read when a server starts."""
    raw = os.environ.get(IDLE_ENV)
    try:
        value = float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise LocalServerError(f"{IDLE_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise LocalServerError(f"{IDLE_ENV} must be more than 0 seconds, got {raw!r}")
    return value


def _prefect_home() -> str:
    return str(Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser())


def _lock(folder: Path, timeout_s: float = LOCK_TIMEOUT_S) -> FileLock:
    return FileLock(folder / "lock", timeout=timeout_s)


# ---------------------------------------------------------------- the state file and liveness


def _alive(pid: int, create_time: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - create_time) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _healthy(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def _read_state(folder: Path) -> ServerState | None:
    try:
        return ServerState(**json.loads((folder / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_state(folder: Path, state: ServerState) -> None:
    tmp = folder / f"state.json.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(folder / "state.json")  # atomic: a reader sees the old file or the whole new one


def _forget(folder: Path, pid: int) -> None:
    """Remove the state file if it still names supervisor ``pid``."""
    state = _read_state(folder)
    if state is not None and state.pid == pid:
        (folder / "state.json").unlink(missing_ok=True)


def _kill_group(state: ServerState, timeout_s: float = 30.0) -> None:
    """Stop a supervisor and its server: SIGTERM (it stops the server), then SIGKILL to the group."""
    if not _alive(state.pid, state.create_time):
        return
    process = psutil.Process(state.pid)
    process.terminate()
    _, alive = psutil.wait_procs([process], timeout=timeout_s)
    if alive:
        try:
            os.killpg(state.pid, signal.SIGKILL)
        except OSError:
            pass


def _live_state(folder: Path) -> ServerState | None:
    """The running server, or None; a state file naming a dead or silent server is cleared (and a
    silent one killed, so that it cannot come back as a second server). Call under the lock."""
    state = _read_state(folder)
    if state is None:
        return None
    # A server that answered once may be slow on a busy machine: silent for a minute, it is hung.
    deadline = time.monotonic() + SILENT_AFTER_S
    while _alive(state.pid, state.create_time):
        if _healthy(state.url):
            return state
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    _kill_group(state)
    _forget(folder, state.pid)
    return None


# ---------------------------------------------------------------- holders: who keeps it in use


def _holder_file(folder: Path, pid: int) -> Path:
    return folder / "holders" / str(pid)


def _hold(folder: Path) -> None:
    """Keep the server while this process lives (the supervisor checks the pid and its start time);
    released at exit, or found dead by the supervisor after kill -9."""
    pid = os.getpid()
    path = _holder_file(folder, pid)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(repr(psutil.Process(pid).create_time()))
    atexit.register(_release, folder, pid)


def _release(folder: Path, pid: int) -> None:
    if os.getpid() != pid:  # a forked child inherited the handler: the holder is its parent
        return
    _holder_file(folder, pid).unlink(missing_ok=True)
    _touch(folder)


def _touch(folder: Path) -> None:
    (folder / "last-used").touch()


def _live_holders(folder: Path) -> list[int]:
    """Pids of holder processes still alive; the files of dead ones are removed."""
    live = []
    for path in (folder / "holders").glob("*"):
        try:
            pid, create_time = int(path.name), float(path.read_text())
        except (OSError, ValueError):
            continue  # being written
        if _alive(pid, create_time):
            live.append(pid)
        else:
            path.unlink(missing_ok=True)
    return sorted(live)


def _last_used(folder: Path) -> float:
    try:
        return (folder / "last-used").stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------- what commands call


def find_local_server(*, start: bool, hold: bool, folder: Path | None = None) -> ServerState | None:
    """The running local server (touched: it counts as a use); with ``start``, started when none
    runs (seconds); with ``hold``, kept at least as long as this process lives. None: none runs
    and ``start`` is false. ``folder``: the server's folder (default ``server_folder()``)."""
    folder = folder or server_folder()
    try:
        with _lock(folder):
            state = _live_state(folder)
            if state is None and start:
                state = _start(folder, idle_timeout_s())
            if state is not None and state.prefect_home != _prefect_home():  # only with HPSWEEP_SERVER_DIR
                raise LocalServerError(f"the local Prefect server in {folder} serves PREFECT_HOME "
                                       f"{state.prefect_home}, not {_prefect_home()}: stop it (`hpsweep server "
                                       f"stop`) or set {DIR_ENV} to another folder")
            if state is not None:
                if hold:
                    _hold(folder)
                _touch(folder)
            return state
    except Timeout:
        raise LocalServerError(f"another command has held {folder / 'lock'} for {LOCK_TIMEOUT_S:.0f} s") from None


def adopt(state: ServerState) -> None:
    """Point this process's Prefect at the local server (its settings, and its children's)."""
    os.environ["PREFECT_API_URL"] = os.environ[ADOPTED_ENV] = state.url
    if "prefect.context" in sys.modules:  # settings already loaded: read the environment again
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def is_local(api_url: str | None) -> bool:
    """Whether ``api_url`` (Prefect's setting) is the local server this process adopted, not an API
    the user configured."""
    return bool(api_url) and api_url == os.environ.get(ADOPTED_ENV)


def configured_prefect_api() -> str | None:
    """The Prefect API the user configured (PREFECT_API_URL, in the environment or Prefect's
    profile), or None: the embedded default, this local server. Imports Prefect (its settings)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return None if not url or is_local(url) else url


def server_status(folder: Path | None = None) -> tuple[ServerState | None, list[int], float | None]:
    """(the running server or None, live holder pids, seconds since its last use) without starting one."""
    folder = folder or server_folder()
    if not folder.is_dir():
        return None, [], None
    with _lock(folder):
        state = _live_state(folder)
    if state is None:
        return None, [], None
    holders = _live_holders(folder)
    return state, holders, None if holders else max(0.0, time.time() - max(_last_used(folder), state.started_at))


class ServerInUse(LocalServerError):
    def __init__(self, state: ServerState, holders: list[int]):
        self.state, self.holders = state, holders
        super().__init__(f"the local Prefect server at {state.url} is in use by process(es) "
                         f"{', '.join(map(str, holders))} (running sweeps): stopping it would fail them; "
                         "pass --force to stop it anyway")


def stop_local_server(force: bool = False, folder: Path | None = None) -> ServerState | None:
    """Stop the local server now; the one stopped, or None when none ran. Raises ServerInUse when a
    live process holds it, unless ``force``."""
    folder = folder or server_folder()
    if not folder.is_dir():
        return None
    with _lock(folder):
        state = _read_state(folder)
        if state is None or not _alive(state.pid, state.create_time):
            (folder / "state.json").unlink(missing_ok=True)
            return None
        holders = [pid for pid in _live_holders(folder) if pid != os.getpid()]
        if holders and not force:
            raise ServerInUse(state, holders)
        _kill_group(state)
        _forget(folder, state.pid)
        return state


# ---------------------------------------------------------------- starting it (client side)


def _server_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", ADOPTED_ENV)}
    # Leases in files under PREFECT_HOME: a sweep killed with -9 leaves its slots' leases behind, and
    # hpsweep's own repossessor (hpsweep.engine.quota) returns them, in the sweeps and `hpsweep quota`;
    # Prefect's Repossessor service would revoke the same leases at the same time (slots returned twice).
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    env["PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED"] = "false"
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: an ERROR line per start
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return env


def _start(folder: Path, idle_s: float) -> ServerState:
    """Start the supervisor, detached (in its own session and not this process's child, so that
    no signal or wait of this process concerns it), and wait until its server answers."""
    log = folder / "server.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", MODULE, "serve", str(folder), repr(idle_s)],
                                    cwd=folder, env=_server_environment(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=out, start_new_session=True)
    with launcher.stdout:
        told = launcher.stdout.readline()  # the supervisor's pid; its launcher exits at once
    launcher.wait()
    pid = int(told) if told.strip().isdigit() else None
    deadline = time.monotonic() + START_TIMEOUT_S
    while pid is not None and time.monotonic() < deadline:
        state = _read_state(folder)
        if state is not None and state.pid == pid:
            return state
        if not _running(pid):
            break
        time.sleep(0.05)
    else:
        if pid is not None:  # still starting after START_TIMEOUT_S: give up on it
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    why = "it exited" if pid is None or not _running(pid) else f"not up in {START_TIMEOUT_S:.0f} s"
    raise LocalServerError(f"the local Prefect server did not start ({why}); {log}:\n"
                           + log.read_text(errors="replace")[-3000:])


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- the supervisor (its own process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_server(port: int) -> subprocess.Popen:
    """Prefect's API and UI on loopback under uvicorn, as `prefect server start` runs them, tethered
    to this supervisor (it gets SIGTERM when the supervisor dies, however it dies)."""
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT__SERVER_FINAL": "1"}
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen([sys.executable, "-m", MODULE, "tether", str(os.getpid()), *command], env=env)


def _serve(folder: Path, idle_s: float) -> int:
    """Run the server until it has been idle ``idle_s`` seconds, the supervisor gets a signal, or the
    server exits; the state file is written once the server answers, and removed before it stops."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    server, url = None, ""
    for _ in range(3):  # a port taken between choosing and binding: try another
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        server = _run_server(port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.poll() is None and not _healthy(url, 2.0) and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.1)
        if server.poll() is None:
            break
    if server is None or server.poll() is not None or stop.is_set() or not _healthy(url, 2.0):
        if server is not None and server.poll() is None:
            server.kill()
        return 1
    me = psutil.Process()
    _write_state(folder, ServerState(me.pid, me.create_time(), url, idle_s, time.time(), str(folder),
                                     _prefect_home()))
    check_s = min(5.0, max(0.1, idle_s / 10))
    last_busy = time.time()
    try:
        while not stop.wait(check_s) and server.poll() is None:
            if _live_holders(folder):
                last_busy = time.time()
            elif time.time() - max(last_busy, _last_used(folder)) >= idle_s and _idle_stop(folder, idle_s):
                break
    finally:
        _forget(folder, me.pid)
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


def _idle_stop(folder: Path, idle_s: float) -> bool:
    """Under the lock (a command may be adopting the server right now): still idle? Then the state
    file goes first, so that the next command starts a new server rather than find this one."""
    try:
        with _lock(folder, timeout_s=1.0):
            if _live_holders(folder) or time.time() - _last_used(folder) < idle_s:
                return False
            _forget(folder, os.getpid())
            return True
    except Timeout:
        return False


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM when the supervisor dies (it stops the server cleanly); exit now if it already has."""
    die_with_parent(signal.SIGTERM)  # not Linux: a supervisor killed with -9 leaves the server running
    if os.getppid() != parent_pid:
        sys.exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "tether":  # tether SUPERVISOR_PID PROGRAM [ARGS...]
        _die_with_parent(int(sys.argv[2]))
        os.execv(sys.argv[3], sys.argv[3:])
    # serve FOLDER IDLE_S: print the supervisor's pid and leave it to init (a daemon), in a session of its own.
    if supervisor := os.fork():
        print(supervisor, flush=True)
        os._exit(0)
    os.setsid()
    os.dup2(2, 1)  # its output (and the server's) to the log, not to the launcher's pipe
    sys.exit(_serve(Path(sys.argv[2]), float(sys.argv[3])))
