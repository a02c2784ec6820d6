"""Fault injection with real processes and real servers (mlflow server on PostgreSQL, prefect server).

Every test asserts what a user relies on: each combination ends with exactly one FINISHED run
and one leaderboard row, no finished trial is trained again, the quota is never exceeded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import Project, alive

pytestmark = pytest.mark.slow

SPEC = """
name: {name}
trainer:
  entrypoint: tests.trainers:epochs
settings: {{epochs: {epochs}, epoch_s: {epoch_s}}}
{extra}
"""
FAST_FAULTS = {"HPSWEEP_HEARTBEAT_S": "1", "HPSWEEP_CHECKPOINT_SYNC_S": "0.3"}


def key_of(hp: dict) -> str:
    return json.dumps(hp, sort_keys=True)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_sweep_until(project: Project, args: list[str], record: Path, ready) -> subprocess.Popen:
    """Start `hpsweep` (quota 2) in the background; return once ready(events) holds."""
    proc = subprocess.Popen([sys.executable, "-m", "hpsweep.cli", *args, "--quota", "2"], cwd=project.root,
                            env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while not ready(events(record)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    return proc


def peak_concurrency(evs: list[dict]) -> int:
    """Most trainers alive at once: each from its start to its end, or to the moment it was killed."""
    points = []
    for e in evs:
        if e["event"] == "start":
            points.append((e["t"], 1))
        elif e["event"] in ("end", "killed"):
            points.append((e["t"], -1))
    live = peak = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        live += delta
        peak = max(peak, live)
    return peak


def setup(project: Project, name: str, combos: list[dict], epochs: int = 5, epoch_s: float = 0.4,
          extra: str = "") -> list[str]:
    project.write("params/combinations.yaml",
                  "combinations:\n" + "".join(f"  - {json.dumps(c)}\n" for c in combos))
    project.write("params/spec.yaml", SPEC.format(name=name, epochs=epochs, epoch_s=epoch_s, extra=extra))
    return ["run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml", "--train",
            "data/train.csv", "--val", "data/val.csv", "--retry-delay-s", "0.2"]


def finished_runs_per_key(client: MlflowClient, name: str) -> Counter:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'trial'", max_results=1000)
    return Counter(json.dumps(json.loads(r.data.tags["hpsweep.hparams"]), sort_keys=True)
                   for r in runs if r.info.status == "FINISHED")


def leaderboard(project: Project, name: str) -> dict:
    return json.loads((project.root / "reports" / name / "latest" / "leaderboard.json").read_text())


@pytest.fixture
def fault_project(served_project: Project, mlflow_server) -> Project:
    served_project.env.update(FAST_FAULTS, MLFLOW_TRACKING_URI=mlflow_server.url,
                              HPSWEEP_TEST_RECORD=str(served_project.root / "events.jsonl"))
    return served_project


def test_killed_trainers_resume_from_their_last_checkpoint(fault_project: Project, mlflow_server):
    project, record = fault_project, fault_project.root / "events.jsonl"
    combos = [{"f1": round(0.5 + 0.05 * i, 2), "mode": "ok"} for i in range(6)]
    args = setup(project, "kill-trainers", combos, epochs=6, epoch_s=0.4)
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        rng = random.Random(7)
        while not stop.is_set() and len(kills) < 3:
            time.sleep(rng.uniform(1.0, 2.5))
            evs = events(record)
            ended = {e["pid"] for e in evs if e["event"] in ("end", "killed")}
            # a trainer still running that has a checkpoint: it started its second epoch or a later one
            # (killed in its first, it rightly starts over; on a loaded machine the first epoch's report
            # can take long enough that every random kill landed there)
            running = sorted({e["pid"] for e in evs if e["event"] == "epoch" and e["epoch"] >= 2} - ended)
            running = [p for p in running if alive(p)]
            if running:
                pid = rng.choice(running)
                os.kill(pid, signal.SIGKILL)
                with record.open("a") as f:
                    f.write(json.dumps({"event": "killed", "pid": pid, "t": time.time()}) + "\n")
                kills.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    result = project.hpsweep(*args, "--quota", "2", "--max-attempts", "4")
    stop.set()
    thread.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(kills) >= 2, "the sweep ended before the faults could be injected"

    evs = events(record)
    pid_key = {e["pid"]: e["key"] for e in evs if e["event"] == "start"}
    killed_keys = Counter(pid_key[p] for p in kills)
    epoch_starts = Counter((e["key"], e["epoch"]) for e in evs if e["event"] == "epoch")
    rerun = Counter()
    for (key, _), n in epoch_starts.items():
        rerun[key] += n - 1
    for key in pid_key.values():  # each kill costs at most the one epoch it interrupted
        assert rerun[key] <= killed_keys[key], (key, rerun[key], killed_keys[key])
        assert {ep for (k, ep) in epoch_starts if k == key} == set(range(1, 7))
    resumed = [e for e in evs if e["event"] == "start" and e["resumed_at"] > 0]
    assert len(resumed) >= len(kills)  # every killed trainer had a checkpoint to resume from

    client = MlflowClient(mlflow_server.url)
    assert set(finished_runs_per_key(client, "kill-trainers").values()) == {1}
    assert len(finished_runs_per_key(client, "kill-trainers")) == 6
    rows = leaderboard(project, "kill-trainers")["rows"]
    assert len(rows) == 6 and all(r["status"] == "FINISHED" for r in rows)
    by_key = {key_of(r["hparams"]): r for r in rows}
    for key, n in killed_keys.items():
        assert by_key[key]["attempts"] == 1 + n
    assert peak_concurrency(evs) <= 2
    print(f"\nFAULTS trainer kills: {len(kills)}, epochs re-run: {sum(rerun.values())}, "
          f"peak concurrency {peak_concurrency(evs)}/2")


def test_orchestrator_killed_mid_sweep_then_rerun_trains_only_the_rest(fault_project: Project, mlflow_server):
    project, record = fault_project, fault_project.root / "events.jsonl"
    combos = [{"f1": round(0.3 + 0.1 * i, 2), "mode": "ok"} for i in range(6)]
    args = setup(project, "kill-orchestrator", combos, epochs=4, epoch_s=0.5)

    client = MlflowClient(mlflow_server.url)

    def checkpoint_stored() -> bool:  # a running trial's checkpoint reached the artifact store
        exp = client.get_experiment_by_name("kill-orchestrator")
        running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        return any(client.list_artifacts(r.info.run_id, "checkpoints") for r in running)

    def mid_sweep(evs: list[dict]) -> bool:  # two trials done, and one with a checkpoint still training
        ended = {e["pid"] for e in evs if e["event"] == "end"}
        training = {e["pid"] for e in evs if e["event"] == "epoch" and e["epoch"] >= 2} - ended
        # On a loaded machine the sync can lag the epochs: wait for the stored checkpoint itself.
        return len(ended) >= 2 and bool(training) and checkpoint_stored()

    proc = start_sweep_until(project, args, record, mid_sweep)
    proc.kill()  # kill -9 of the orchestrator
    proc.wait()
    evs = events(record)
    ended_pids = {e["pid"] for e in evs if e["event"] == "end"}
    orphans = [e["pid"] for e in evs if e["event"] == "start" and e["pid"] not in ended_pids]
    for _ in range(300):  # its trainers notice within a second or two and kill themselves
        if orphans and not any(alive(p) for p in orphans):
            break
        time.sleep(0.1)
        evs = events(record)
        orphans = [e["pid"] for e in evs if e["event"] == "start" and e["pid"] not in ended_pids]
    assert orphans and not any(alive(p) for p in orphans)  # none trains on unobserved
    killed_at = time.time()  # (a late bound of their end: conservative for the quota check)
    with record.open("a") as f:
        for pid in orphans:
            f.write(json.dumps({"event": "killed", "pid": pid, "t": killed_at}) + "\n")

    finished_before = set(finished_runs_per_key(client, "kill-orchestrator"))
    assert finished_before and len(finished_before) < 6
    mark = len(events(record))
    # The same command again, on a "new host" (empty work dir): checkpoints come from the artifact store.
    result = project.hpsweep(*args, "--quota", "2", "--work-dir", ".hpsweep-host2")
    assert result.returncode == 0, result.stdout + result.stderr

    after = events(record)[mark:]
    retrained = {e["key"] for e in after if e["event"] == "start"}
    assert retrained.isdisjoint(finished_before)  # no finished trial was trained again
    assert retrained == {key_of(c) for c in combos} - finished_before
    # Trials that trained an epoch and were not durably FINISHED: the orphans, and also a trial whose
    # trainer ended just before the kill but whose run was never closed (it resumes from its last epoch).
    interrupted = {e["key"] for e in evs if e["event"] == "epoch"} - finished_before
    resumed = {e["key"] for e in after if e["event"] == "start" and e["resumed_at"] > 0}
    assert resumed, "no interrupted trial resumed from a checkpoint restored from the artifact store"
    assert resumed <= interrupted

    per_key = finished_runs_per_key(client, "kill-orchestrator")
    assert len(per_key) == 6 and set(per_key.values()) == {1}
    board = leaderboard(project, "kill-orchestrator")
    assert board["counts"]["reused"] == len(finished_before) and board["counts"]["failed"] == 0
    exp = client.get_experiment_by_name("kill-orchestrator")
    zombies = client.search_runs([exp.experiment_id], "tags.`hpsweep.reason` LIKE 'zombie%'")
    assert {z.info.status for z in zombies} == {"KILLED"} and len(zombies) >= len(orphans)
    assert peak_concurrency(events(record)) <= 2
    print(f"\nFAULTS orchestrator kill: {len(finished_before)} finished before, {len(retrained)} trained "
          f"after, {len(resumed)} resumed from the artifact store, {len(zombies)} zombie runs closed")


def test_tracking_server_restart_mid_sweep_loses_nothing(fault_project: Project, mlflow_server):
    project, record = fault_project, fault_project.root / "events.jsonl"
    combos = [{"f1": round(0.4 + 0.1 * i, 2), "mode": "ok"} for i in range(4)]
    args = setup(project, "restart-tracking", combos, epochs=8, epoch_s=0.5)
    proc = start_sweep_until(project, args, record, lambda evs: sum(e["event"] == "epoch" for e in evs) >= 3)
    mlflow_server.restart(down_s=3)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-4000:]

    client = MlflowClient(mlflow_server.url)
    per_key = finished_runs_per_key(client, "restart-tracking")
    assert len(per_key) == 4 and set(per_key.values()) == {1}
    rows = leaderboard(project, "restart-tracking")["rows"]
    assert sorted(r["f1"] for r in rows) == [0.4, 0.5, 0.6, 0.7]
    for row in rows:  # every epoch's metric survived the outage
        history = client.get_metric_history(row["run_id"], "val_f1")
        assert sorted({m.step for m in history}) == list(range(1, 9))
    assert peak_concurrency(events(record)) <= 2


def test_hanging_trainer_is_killed_at_its_time_limit(fault_project: Project):
    project = fault_project
    combos = [{"f1": 0.6, "mode": "ok"}, {"f1": 0.7, "mode": "hang"}, {"f1": 0.8, "mode": "ok"}]
    args = setup(project, "hang", combos, epochs=2, epoch_s=0.2, extra="time_limit_s: 4")
    result = project.hpsweep(*args, "--quota", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    # The sweep did not wait for the hanging trainer (it sleeps an hour): it was killed, never ended.
    hung = [e for e in events(project.root / "events.jsonl") if '"hang"' in e["key"]]
    assert [e["event"] for e in hung] == ["start"] and not alive(hung[0]["pid"])
    rows = leaderboard(project, "hang")["rows"]
    assert [r["f1"] for r in rows] == [0.8, 0.6, None]
    assert "time limit of 4 s exceeded" in rows[-1]["reason"] and rows[-1]["attempts"] == 1


def test_deterministic_failure_is_tried_once(fault_project: Project):
    project, record = fault_project, fault_project.root / "events.jsonl"
    combos = [{"f1": 0.6, "mode": "raise"}, {"f1": 0.7, "mode": "ok"}]
    args = setup(project, "raise", combos, epochs=2, epoch_s=0.2)
    result = project.hpsweep(*args, "--quota", "2", "--max-attempts", "3")
    assert result.returncode == 1
    starts = Counter(e["key"] for e in events(record) if e["event"] == "start")
    assert starts[key_of(combos[0])] == 1
    rows = leaderboard(project, "raise")["rows"]
    assert rows[-1]["attempts"] == 1 and "ValueError: this trainer rejects its hparams" in rows[-1]["reason"]
