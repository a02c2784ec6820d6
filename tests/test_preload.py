"""The trials' fork server preloads what its trials will need, and only that: a trainer that uses no
scikit-learn does not wait seconds for skops (which imports scikit-learn and torch) before its first
trial can start; one that does still finds its model serialiser loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERIALISERS = ["mlflow.sklearn", "skops.io"]


def _fork_server_modules(trainer_modules: str, tmp_path: Path) -> list[str]:
    """The serialiser modules a fork server's trials inherit, with the trainer's modules given (what
    `hpsweep run` passes it), by running the fork server's preload in a fresh interpreter."""
    env = {**os.environ, "HPSWEEP_FORKSERVER_MODULES": trainer_modules,
           "HPSWEEP_FORKSERVER_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, json, hpsweep.runtime.runner, hpsweep.runtime._preload; "
            f"print(json.dumps([m for m in {SERIALISERS!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_trainer_without_scikit_learn_does_not_wait_for_its_serialiser(tmp_path: Path):
    assert _fork_server_modules("bench.synthetic", tmp_path) == []


def test_a_scikit_learn_trainer_finds_its_serialiser_preloaded(tmp_path: Path):
    assert _fork_server_modules("trainer.reference", tmp_path) == SERIALISERS


MAIN_SCRIPT = '''
import multiprocessing, os, sys, time
if __name__ == "__mp_main__":  # multiprocessing running this script again, outside the sweep's process
    with open(os.environ["RERUNS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
if __name__ == "__main__":
    from hpsweep.runtime.forkserver import start_fork_server
    start_fork_server([])
    ctx = multiprocessing.get_context("forkserver")
    for _ in range(3):  # three trials' processes
        p = ctx.Process(target=time.sleep, args=(0,))
        p.start()
        p.join()
        assert p.exitcode == 0
'''


def test_trials_do_not_run_the_sweeps_main_module_again(tmp_path: Path):
    """multiprocessing runs the parent's main module in each child whose own __main__ differs (64 ms
    of hpsweep/cli.py per trial under `python -m hpsweep.cli`): the fork server runs it once instead."""
    script, reruns = tmp_path / "sweep_main.py", tmp_path / "reruns.txt"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "RERUNS": str(reruns),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, timeout=300, check=True)
    assert len(reruns.read_text().split()) == 1  # the fork server's, not one per trial
