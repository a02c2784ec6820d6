"""The embedded default's warm local Prefect server (issue 19): started by the first sweep, shared by
later sweeps and by sweeps starting together, stopped by `hpsweep server stop` or after its idle
timeout (even when no client is left to stop it); never started when PREFECT_API_URL is set.

Each test has its own server folder (HPSWEEP_SERVER_DIR, the `project` fixture) and stops its server."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from hpsweep.engine import localserver
from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, quota_limit


def server_of(project: Project) -> localserver.ServerState | None:
    """The project's local Prefect server, as `hpsweep server status` finds it."""
    return localserver.server_status(Path(project.env[localserver.DIR_ENV]))[0]


def processes_of(state: localserver.ServerState) -> list[psutil.Process]:
    """The supervisor and everything under it (the tether, uvicorn)."""
    supervisor = psutil.Process(state.pid)
    return [supervisor, *supervisor.children(recursive=True)]


def sweep_args(project: Project, name: str) -> list[str]:
    project.write(f"params/{name}.yaml", SLEEPY_SPEC.format(name=name, sleep_s=0.1, gpus=1))
    project.write(f"params/{name}-combinations.yaml", "combinations:\n  - {f1: 0.5}\n")
    return ["run", "--combinations", f"params/{name}-combinations.yaml", "--spec", f"params/{name}.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "1",
            "--quota-limit", quota_limit(project)]


def announced(stderr: str) -> str:
    """The URL of the local server a sweep says it used."""
    found = re.findall(r"Prefect: local server (\S+) \(UI", stderr)
    assert len(found) == 1, stderr[-3000:]
    return found[0]


@pytest.mark.slow
def test_a_second_sweep_reuses_the_warm_server_and_server_stop_stops_it(project: Project):
    first = project.hpsweep(*sweep_args(project, "warm"))
    assert first.returncode == 0, first.stderr[-3000:]
    server = server_of(project)
    assert server is not None and announced(first.stderr) == server.url  # it outlived the sweep
    folder = Path(project.env[localserver.DIR_ENV])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # this user's only

    shown = project.hpsweep("server", "status")
    assert shown.returncode == 0, shown.stderr
    assert f"local Prefect server: {server.url} (UI {server.ui_url}), pid {server.pid}" in shown.stdout
    assert "idle for " in shown.stdout and "stops after 1 min idle" in shown.stdout

    again = project.hpsweep(*sweep_args(project, "warm"))  # every trial reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert announced(again.stderr) == server.url and server_of(project) == server  # same process, same URL

    processes = processes_of(server)
    stopped = project.hpsweep("server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the local Prefect server at {server.url}"
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert server_of(project) is None and not (folder / "state.json").exists()
    assert "no local Prefect server running" in project.hpsweep("server", "status").stdout
    assert project.hpsweep("server", "stop").stdout.strip() == "no local Prefect server was running"


@pytest.mark.slow
def test_two_sweeps_started_at_once_share_one_server(project: Project):
    sweeps = [subprocess.Popen([sys.executable, "-m", "hpsweep.cli", *sweep_args(project, name)], cwd=project.root,
                               env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name in ("together-a", "together-b")]
    errs = []
    for sweep in sweeps:
        _, err = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, err[-3000:]
        errs.append(err)
    server = server_of(project)
    assert server is not None
    assert [announced(err) for err in errs] == [server.url, server.url]


@pytest.mark.slow
def test_with_prefect_api_url_set_no_local_server_starts(served_project: Project):
    project = served_project
    result = project.hpsweep(*sweep_args(project, "served"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prefect: local server" not in result.stderr
    assert server_of(project) is None and not (Path(project.env[localserver.DIR_ENV]) / "state.json").exists()
    shown = project.hpsweep("server", "status")
    assert "no local Prefect server running" in shown.stdout
    assert f"PREFECT_API_URL is set ({project.env['PREFECT_API_URL']})" in shown.stdout


@pytest.mark.slow
def test_a_server_no_one_uses_stops_after_its_idle_timeout_and_a_stale_state_file_is_replaced(
        tmp_path: Path, monkeypatch):
    folder = tmp_path / "server"
    folder.mkdir(mode=0o700)
    # What a server killed with -9 together with its supervisor leaves: a state file naming the dead.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "state.json").write_text(json.dumps({
        "pid": dead.pid, "create_time": 1.0, "url": "http://127.0.0.1:9/api", "idle_s": 3.0, "started_at": 1.0,
        "folder": str(folder), "prefect_home": os.environ["PREFECT_HOME"]}))
    monkeypatch.setenv(localserver.IDLE_ENV, "3")
    try:
        server = localserver.find_local_server(start=True, hold=False, folder=folder)  # no holder: only last use
        assert server is not None and server.pid != dead.pid and server.url != "http://127.0.0.1:9/api"
        assert server.idle_s == 3.0
        processes = processes_of(server)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in processes)
        _, alive = psutil.wait_procs(processes, timeout=120)  # nobody stops it: its supervisor does
        assert not alive, [p.cmdline() for p in alive]
        assert not (folder / "state.json").exists()
    finally:
        localserver.stop_local_server(force=True, folder=folder)


def test_the_idle_timeout_must_be_a_positive_number(monkeypatch):
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(localserver.IDLE_ENV, bad)
        with pytest.raises(localserver.LocalServerError, match=localserver.IDLE_ENV):
            localserver.idle_timeout_s()
    monkeypatch.delenv(localserver.IDLE_ENV)
    assert localserver.idle_timeout_s() == 30 * 60


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the folder to another user")
def test_a_server_folder_of_another_user_is_never_used(tmp_path: Path, monkeypatch):
    """Another account's server (same HPSWEEP_SERVER_DIR or PREFECT_HOME): refused, not joined."""
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)  # nobody's
    monkeypatch.setenv(localserver.DIR_ENV, str(folder))
    with pytest.raises(localserver.LocalServerError, match="belongs to another user"):
        localserver.find_local_server(start=True, hold=False)
    assert not (folder / "state.json").exists()

