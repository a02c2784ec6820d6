"""How people and ECS stop a sweep: Ctrl-C, SIGTERM, kill -9 (issue 14).

First signal: nothing new starts, running trials get SIGTERM and the grace to end, the report is
written from what finished (the rest INTERRUPTED), every run is closed, exit 128 + signal. A second
signal kills the trials at once. The local Prefect server runs in its own session: no signal
to the sweep reaches it, and after kill -9 of the sweep it stops after its idle timeout (issue 19).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from hpsweep.engine import sweep as engine
from hpsweep.engine.controller import RetryPolicy, SweepEngine
from hpsweep.engine.stopping import StopRequest, stop_on_signals
from hpsweep.inputs import load_inputs
from hpsweep.model import AttemptResult, Outcome, TrialJob, TrialState
from tests.conftest import Project
from tests.memstore import InMemoryStore
from tests.test_engine_sweep import config, write_project
from tests.test_localserver import processes_of, server_of
from tests.test_sweep_e2e import SLEEPY_SPEC, leaderboard, quota_limit

# ---------------------------------------------------------------- the stop request and its signals


def test_the_first_signal_asks_a_clean_stop_and_the_second_forces_it():
    stop, steps, exits = StopRequest(grace_s=60), [], []
    stop.listen(lambda force: steps.append(force))
    with stop_on_signals(stop, exit_after=exits.append):
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the handler takes it
        wait_for(lambda: steps == [False])
        assert stop.requested and not stop.forced and stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: steps == [False, True])
        assert stop.forced
    assert exits == []  # it left the block in time: the watchdog never fired
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


def test_a_stop_that_takes_too_long_still_exits_with_the_signals_code():
    stop, exits = StopRequest(grace_s=0), []
    with stop_on_signals(stop, exit_after=exits.append, margin_s=0.2):
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: exits == [143])  # SIGTERM: 128 + 15


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


# ---------------------------------------------------------------- the engine on an in-memory store


class BlockingLauncher:
    """Each attempt runs until the sweep interrupts it (as a trainer that needs hours would)."""

    def __init__(self, store: InMemoryStore):
        self.store, self.started, self.interrupts = store, [], []
        self._interrupted = threading.Event()

    def launch(self, job: TrialJob, gpu_ids: tuple[int, ...]) -> AttemptResult:
        run_id = self.store.start_trial_run(job.experiment_id, job.sweep_id, job.index, job.hparams, job.trial_key,
                                            job.versions)
        self.started.append(job.index)
        self._interrupted.wait(30)
        outcome = Outcome(False, None, "stopped", killed=True, interrupted=True)
        self.store.finish_trial_run(run_id, outcome)
        return AttemptResult(run_id, outcome)

    def interrupt(self, grace_s: float, reason: str) -> None:
        self.interrupts.append(grace_s)
        self._interrupted.set()


def test_a_stopped_sweep_starts_nothing_more_and_reports_every_unfinished_trial_interrupted(tmp_path: Path):
    store, stop = InMemoryStore(), StopRequest(grace_s=7)
    cfg = config(write_project(tmp_path))
    inputs = load_inputs(cfg.combinations, cfg.spec, cfg.train, cfg.val, cfg.quota)
    opened = engine.open_sweep(cfg, inputs, store, capacity=2, queue_depth=2)
    launcher = BlockingLauncher(store)
    sweep = SweepEngine(opened.run, launcher, RetryPolicy(first_delay_s=0), stop=stop)
    runner = threading.Thread(target=sweep.run, args=(opened.to_train, opened.parallel))
    runner.start()
    wait_for(lambda: len(launcher.started) == 2)
    stop.request(signal.SIGINT)
    runner.join(30)
    assert not runner.is_alive()
    assert sorted(launcher.started) == [1, 2] and launcher.interrupts == [7]  # 3 and 4 never started

    summary = engine.close_sweep(opened, store, cfg.report_dir, stopped_by=stop.signal_name)
    board = json.loads((cfg.report_dir / "leaderboard.json").read_text())
    assert board["interrupted"] == summary["interrupted"] == "SIGINT"
    assert [r["status"] for r in board["rows"]] == ["INTERRUPTED"] * 4
    assert all(r["reason"].startswith("interrupted: the sweep was stopped (SIGINT)") for r in board["rows"][2:])
    assert store.runs[opened.run.parent_run_id].status == "KILLED"
    assert not [r for r in store.runs.values() if r.role == "trial" and r.state is TrialState.RUNNING]


# ---------------------------------------------------------------- the real CLI, as a user stops it

SLOW = SLEEPY_SPEC.format(name="stopped", sleep_s=120, gpus=1)  # trials that would take two minutes


def start_sweep(project: Project, combos: int = 4, grace_s: float = 5) -> subprocess.Popen:
    project.write("params/spec.yaml", SLOW)
    project.write("params/combinations.yaml",
                  "combinations:\n" + "".join(f"  - {{f1: 0.{i}}}\n" for i in range(1, combos + 1)))
    args = [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "params/combinations.yaml",
            "--spec", "params/spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "2",
            "--quota-limit", quota_limit(project), "--grace-s", str(grace_s)]
    # Its own process group, as a shell gives a foreground job: Ctrl-C goes to the whole group.
    return subprocess.Popen(args, cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_trials(project: Project, sweep: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 300
    while len(list(project.root.glob(".hpsweep/trials/*/trial.log"))) < n:
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline, "the trials never started"
        time.sleep(0.2)
    time.sleep(1.0)  # the trainers are inside their first epoch


def gone(processes: list[psutil.Process], timeout_s: float = 30) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return not alive


def runs_of(project: Project, name: str):
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_reports_what_ran_and_a_rerun_trains_the_rest(project: Project):
    sweep = start_sweep(project)
    wait_for_trials(project, sweep, 2)
    server = server_of(project)
    assert server is not None, "the embedded default runs the local Prefect server"
    assert server.pid not in [p.pid for p in psutil.Process(sweep.pid).children(recursive=True)]  # own session
    os.killpg(sweep.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out[-2000:] + err[-3000:]
    assert "SIGINT: stopping" in err + out and "interrupted by SIGINT: rerun the same command" in err + out
    # Issue 16: no telemetry ERROR and no temporary-server banner on an offline run.
    assert "telemetry" not in err + out and "temporary server" not in err + out

    board = leaderboard(project, "stopped")
    assert board["interrupted"] == "SIGINT"
    assert [r["status"] for r in board["rows"]] == ["INTERRUPTED"] * 4  # 2 stopped running, 2 never started
    runs = runs_of(project, "stopped")
    assert not [r for r in runs if r.info.status == "RUNNING"]  # every run this process opened is closed
    parent = next(r for r in runs if r.data.tags.get("hpsweep.role") == "sweep")
    assert parent.info.status == "KILLED" and parent.data.tags["hpsweep.interrupted"] == "SIGINT"
    trials = [r for r in runs if r.data.tags.get("hpsweep.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "KILLED" for r in trials)
    assert server_of(project) == server  # Ctrl-C did not reach it: still up, warm for the rerun

    status = project.hpsweep("status", "stopped")
    assert "interrupted (SIGINT)" in status.stdout, status.stdout + status.stderr
    rerun = project.hpsweep("run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
                            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "2",
                            "--quota-limit", quota_limit(project), env={"HPSWEEP_TEST_SLEEP_S": "0.2"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["status"] for r in leaderboard(project, "stopped")["rows"]] == ["FINISHED"] * 4
    assert server_of(project) == server  # the rerun shared it


@pytest.mark.slow
def test_sigterm_to_the_sweep_process_stops_it_like_ctrl_c(project: Project):
    """How ECS, Docker and systemd stop a task: SIGTERM to the main process only."""
    sweep = start_sweep(project, combos=3, grace_s=3)
    wait_for_trials(project, sweep, 2)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, out[-2000:] + err[-3000:]
    board = leaderboard(project, "stopped")
    assert board["interrupted"] == "SIGTERM" and [r["status"] for r in board["rows"]] == ["INTERRUPTED"] * 3
    assert not [r for r in runs_of(project, "stopped") if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_kill_9_of_the_sweep_leaves_the_prefect_server_only_for_its_idle_timeout(project: Project):
    project.env["HPSWEEP_HEARTBEAT_S"] = "1"  # the sweep's interval; `status` below runs with the default 30 s
    project.env["HPSWEEP_SERVER_IDLE_S"] = "10"
    sweep = start_sweep(project, combos=2)
    del project.env["HPSWEEP_HEARTBEAT_S"]
    wait_for_trials(project, sweep, 1)
    server = server_of(project)
    assert server is not None
    servers = processes_of(server)
    others = psutil.Process(sweep.pid).children(recursive=True)  # fork server, trials
    # While the sweep runs: `status` reads its flow run from the local server, which the sweep holds.
    shown = project.hpsweep("status", "stopped")
    assert "Prefect     Running" in shown.stdout, shown.stdout + shown.stderr
    refused = project.hpsweep("server", "stop")
    assert refused.returncode == 2 and f"in use by process(es) {sweep.pid} " in refused.stderr, refused.stderr

    os.kill(sweep.pid, signal.SIGKILL)  # the sweep only: nothing can clean up after it
    sweep.wait(60)
    assert gone(others, 60), [p.cmdline() for p in others if p.is_running()]
    sweep.communicate(timeout=60)
    time.sleep(2.5)  # more than two of the sweep's heartbeat intervals since it died
    result = project.hpsweep("status", "stopped")
    assert result.returncode == 0, result.stderr
    assert ": not responding (no heartbeat for " in result.stdout.splitlines()[0], result.stdout
    # No sweep holds the server any more: its supervisor stops it after the idle timeout, by itself.
    assert gone(servers, 180), [p.cmdline() for p in servers if p.is_running()]
    assert server_of(project) is None


SLOW_IMPORT_TRAINER = '''
"""Imported in ten minutes by the trials' fork server once `slow-import` exists (a trainer importing a
big framework from a slow disk); at once elsewhere (the sweep's own import check)."""
import sys
import time
from pathlib import Path

if sys.argv[:1] == ["-c"] and Path("slow-import").exists():  # the fork server: python -c "...forkserver..."
    time.sleep(600)
from tests.trainers import sleepy as train  # noqa: E402,F401
'''


@pytest.mark.slow
def test_a_sweep_that_trains_nothing_leaves_no_fork_server_behind_while_it_preloads(project: Project):
    """Every trial reused: the sweep ends while its fork server still imports the trainer. The fork
    server used to finish that import first (here ten minutes), holding `hpsweep run | tee` open."""
    project.write("slowpkg/__init__.py", SLOW_IMPORT_TRAINER)  # a package: the flag and the log are not its code
    project.write("params/spec.yaml", SLEEPY_SPEC.format(name="slowimport", sleep_s=0.1, gpus=1)
                  .replace("tests.trainers:sleepy", "slowpkg:train"))
    project.write("params/combinations.yaml", "combinations:\n  - {f1: 0.5}\n")
    args = ["run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml", "--train",
            "data/train.csv", "--val", "data/val.csv", "--quota", "1", "--quota-limit", quota_limit(project)]
    first = project.hpsweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]

    project.write("slow-import", "")
    with (project.root / "rerun.log").open("w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "hpsweep.cli", *args], cwd=project.root, env=project.env,
                                 stdout=log, stderr=subprocess.STDOUT)
        fork_servers: dict[int, psutil.Process] = {}
        while sweep.poll() is None:
            try:
                for child in psutil.Process(sweep.pid).children():
                    if "forkserver" in " ".join(child.cmdline()):
                        fork_servers[child.pid] = child
            except psutil.Error:
                pass
            time.sleep(0.05)
    assert sweep.returncode == 0, (project.root / "rerun.log").read_text()[-3000:]
    assert "1 reused" in (project.root / "rerun.log").read_text()
    assert fork_servers, "the sweep started no fork server"
    assert gone(list(fork_servers.values()), 30), "the fork server outlived its sweep"
