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
