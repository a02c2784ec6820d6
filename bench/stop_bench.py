"""How long a sweep takes to stop, and what it leaves running (issue 14).

Starts `hpsweep run` on the embedded default in a fresh folder with 4 trials of two minutes running
(quota 4), then (1) Ctrl-C as a terminal sends it (SIGINT to the process group) and times the exit;
(2) SIGTERM to the main process, as ECS and Docker do; (3) kill -9 of the main process, and lists
every process the sweep had started that is still alive 5 s and 30 s later. One table.

    .venv/bin/python bench/stop_bench.py [--grace-s 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SPEC = """name: stop-bench
trainer:
  entrypoint: tests.trainers:sleepy
settings: {epochs: 4, sleep_s: 120}
resources: {gpus: 1}
"""


def project() -> Path:
    root = Path(tempfile.mkdtemp(prefix="hpsweep-stop-bench-"))
    from trainer.prepare import prepare

    prepare(root / "data")
    (root / "spec.yaml").write_text(SPEC)
    (root / "combos.yaml").write_text("combinations:\n" + "".join(f"  - {{f1: 0.{i}}}\n" for i in range(1, 5)))
    return root


def start(root: Path, grace_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "PREFECT_HOME": str(root / ".prefect"),
           "HPSWEEP_GPU_LOCK_DIR": str(root / "locks")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "combos.yaml", "--spec", "spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "4",
            "--grace-s", str(grace_s)]
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def four_running(root: Path, sweep: subprocess.Popen) -> list[psutil.Process]:
    """Wait until the 4 trials run; the sweep's descendants then (server, fork server, trials)."""
    deadline = time.monotonic() + 600
    while len(list(root.glob(".hpsweep/trials/*/trial.log"))) < 4:
        if sweep.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sweep never got 4 trials running")
        time.sleep(0.2)
    time.sleep(2.0)
    return psutil.Process(sweep.pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {' '.join(p.cmdline())[:60]}" for p in procs if p.is_running() and p.status() != "zombie"]


def stopped_by(root: Path, grace_s: float, how: str) -> tuple[float, int, list[str], list[str]]:
    sweep = start(root, grace_s)
    procs = four_running(root, sweep)
    sent = time.monotonic()
    if how == "ctrl-c":
        os.killpg(sweep.pid, signal.SIGINT)
    elif how == "sigterm":
        sweep.send_signal(signal.SIGTERM)
    else:
        sweep.kill()
    code = sweep.wait()
    took = time.monotonic() - sent
    time.sleep(5)
    after_5 = alive(procs)
    time.sleep(25)
    return took, code, after_5, alive(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace-s", type=float, default=30.0)
    args = parser.parse_args()
    print(f"| stop | exit code | seconds to exit | left after 5 s | left after 30 s |\n|---|---:|---:|---|---|")
    for how in ("ctrl-c", "sigterm", "kill -9"):
        root = project()  # a fresh folder each: an earlier sweep's trial logs would look like running trials
        try:
            took, code, after_5, after_30 = stopped_by(root, args.grace_s, how)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"| {how} (4 trials running, grace {args.grace_s:.0f} s) | {code} | {took:.1f} | "
              f"{'; '.join(after_5) or 'nothing'} | {'; '.join(after_30) or 'nothing'} |", flush=True)


if __name__ == "__main__":
    main()
