"""Benchmark: the pool launcher's cost per trial, on a real `prefect server` and process worker.

    python bench/pool_overhead.py [--trials 8] [--limit 2] [--sleep 2] [--poll 1]

Starts its own prefect server (SQLite, in a temp dir), a process work pool with concurrency
limit = --limit, deploys train-trial from prefect.yaml, starts one worker polling every
--poll seconds, runs a sweep of sleeping trainers through `hpsweep run --launcher pool`, and
prints a table from the trainers' own timestamps and Prefect's flow-run records:

- launch overhead: the flow run's creation (the run_deployment call) → its trainer's start
- slot gap: a trial's end → the next trial's start on the freed slot
- peak concurrency vs the pool's limit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, stop, wait_http  # noqa: E402  (the same helpers the tests use)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=2.0)
    ap.add_argument("--poll", type=float, default=1.0, help="worker poll interval (PREFECT_WORKER_QUERY_SECONDS)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hpsweep-bench-pool-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
                "PYTHONPATH": str(REPO), "PREFECT_SERVER_UI_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=base_env, stdout=(tmp / "server.log").open("wb"),
                              stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_http(f"{api}/health", 120, server, tmp / "server.log")

        def prefect(*a: str, **env: str) -> None:
            subprocess.run([sys.executable, "-m", "prefect", *a], env={**base_env, **env}, cwd=REPO, check=True,
                           capture_output=True)

        prefect("work-pool", "create", "bench-gpu", "--type", "process")
        prefect("work-pool", "set-concurrency-limit", "bench-gpu", str(args.limit))
        prefect("work-pool", "create", "bench-cpu", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", HPSWEEP_HOME=str(REPO), HPSWEEP_GPU_POOL="bench-gpu",
                HPSWEEP_CPU_POOL="bench-cpu")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench-gpu",
                                   "--type", "process"], cwd=REPO, stdout=(tmp / "worker.log").open("wb"),
                                  stderr=subprocess.STDOUT,
                                  env={**base_env, "PREFECT_WORKER_QUERY_SECONDS": str(args.poll),
                                       "PREFECT_WORKER_PREFETCH_SECONDS": str(args.poll)})

        project = tmp / "project"
        subprocess.run([sys.executable, "-m", "hpsweep.cli", "prepare", "--out", str(project / "data")],
                       env=base_env, check=True, capture_output=True)
        record = project / "events.jsonl"
        (project / "combos.yaml").write_text("combinations:\n" + "".join(
            f"  - {{f1: {0.5 + i / (10 * args.trials):.4f}}}\n" for i in range(args.trials)))
        (project / "spec.yaml").write_text(
            "name: bench-pool\ntrainer: {entrypoint: 'tests.trainers:sleepy'}\n"
            f"settings: {{epochs: 1, sleep_s: {args.sleep}, record_path: '{record}'}}\n")
        started = time.time()
        subprocess.run([sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "combos.yaml", "--spec",
                        "spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv", "--quota",
                        str(args.limit), "--launcher", "pool", "--pool", "bench-gpu"], cwd=project, env=base_env,
                       check=True, capture_output=True)
        makespan = time.time() - started
        report(api, record, args, makespan)
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


def report(api: str, record: Path, args, makespan: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    events = [json.loads(line) for line in record.read_text().splitlines()]
    starts = {json.dumps(e["hparams"], sort_keys=True): e["t"] for e in events if e["event"] == "start"}
    ends = sorted(e["t"] for e in events if e["event"] == "end")
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("job")]
    # Launch overhead without queueing: the first `limit` flow runs found the pool's slots free.
    first = sorted(runs, key=lambda r: r.created)[: args.limit]
    launch = [starts[json.dumps(r.parameters["job"]["hparams"], sort_keys=True)] - r.created.timestamp()
              for r in first if json.dumps(r.parameters["job"]["hparams"], sort_keys=True) in starts]
    # a trial beyond the first `limit` starts on the slot the earliest still-unmatched end freed
    later_starts = sorted(starts.values())[args.limit:]
    gaps = [s - e for s, e in zip(later_starts, ends)]
    points = sorted([(t, 1) for t in starts.values()] + [(t, -1) for t in ends], key=lambda p: (p[0], p[1]))
    live = peak = 0
    for _, d in points:
        live += d
        peak = max(peak, live)
    lower_bound = max(args.trials * args.sleep / args.limit, args.sleep)
    rows = [
        ("trials / pool limit / trial length", f"{args.trials} / {args.limit} / {args.sleep:g} s"),
        ("worker poll interval", f"{args.poll:g} s"),
        ("launch overhead, free slot (run_deployment → trainer start): median / max",
         f"{statistics.median(launch):.2f} s / {max(launch):.2f} s"),
        ("slot gap (trial end → next start): median / max",
         f"{statistics.median(gaps):.2f} s / {max(gaps):.2f} s" if gaps else "n/a"),
        ("peak concurrency / limit", f"{peak} / {args.limit}"),
        ("sweep wall time / lower bound", f"{makespan:.1f} s / {lower_bound:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure'.ljust(width)} | value\n{'-' * width}-|------")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")


if __name__ == "__main__":
    main()
