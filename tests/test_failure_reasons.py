"""A failed trial says why: through the real local launcher (a trial process, a real MLflow store),
the reason on the outcome and on the run's hpsweep.reason tag quotes the trainer's own last error
line and says where the full log is; leaderboard.json shows the same reason."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep import store
from hpsweep.engine.launcher import LocalLauncher, TrialJob
from hpsweep.report.leaderboard import leaderboard_json

SKLEARN_MESSAGE = ("The 'min_samples_split' parameter of DecisionTreeClassifier must be an int in the range [2, inf) "
                   "or a float in the range (0.0, 1.0]. Got 1 instead.")

# A user's script as scikit-learn fails it: progress on stdout, a warning on stderr, the exception, and an
# exit handler printing after the traceback (on both streams, as MLflow and W&B do).
FAILING_SCRIPT = f'''
import atexit, sys
atexit.register(lambda: (print("View run at http://mlflow/#/runs/1"), print("wandb: finishing", file=sys.stderr)))
print("loading data")
print("UserWarning: X has feature names", file=sys.stderr)
class InvalidParameterError(ValueError):
    pass
raise InvalidParameterError({SKLEARN_MESSAGE!r})
'''


@pytest.fixture(scope="module")
def launcher() -> LocalLauncher:
    return LocalLauncher(preload=["tests.trainers"])


@pytest.fixture
def sweep(tmp_path: Path, demo_data: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = store.ensure_experiment(client, f"reasons-{time.time_ns()}")
    parent = store.start_parent_run(client, exp, "sweep-1", {})

    def job(index: int, hparams: dict, **overrides) -> TrialJob:
        fields = dict(sweep_id="sweep-1", experiment_id=exp, parent_run_id=parent, tracking_uri=uri, index=index,
                      hparams=hparams, trial_key=f"key-{time.time_ns()}-{index}", attempt=1, settings={},
                      train=str(demo_data / "train.csv"), val=str(demo_data / "val.csv"),
                      entrypoint="tests.trainers:strict_depth", work_dir=str(tmp_path / "work"), cwd=str(tmp_path))
        return TrialJob(**{**fields, **overrides})

    def leaderboard_reasons() -> dict[str, str]:
        rows = store.sweep_trials(client, exp, "sweep-1")
        return {r["run_id"]: r.get("reason") for r in json.loads(leaderboard_json({}, rows))["rows"]}

    return client, job, leaderboard_reasons


def assert_reason_everywhere(client: MlflowClient, run_id: str, reason: str, leaderboard: dict[str, str]) -> None:
    """The outcome's reason is the run's tag and the leaderboard's, and the log it points to is there."""
    assert client.get_run(run_id).data.tags[store.TAG_REASON] == reason
    assert leaderboard[run_id] == reason
    assert "trial.log" in {a.path for a in client.list_artifacts(run_id)}


def test_a_python_command_shows_its_exception_line_not_only_its_exit_code(launcher, sweep, tmp_path: Path):
    client, job, leaderboard = sweep
    (tmp_path / "train_tree.py").write_text(FAILING_SCRIPT)
    result = launcher.launch(job(1, {"min_samples_split": 1}, entrypoint=None,
                                 command=[sys.executable, "train_tree.py"]), ())
    expected = (f"command exited with code 1: InvalidParameterError: {SKLEARN_MESSAGE} "
                f"(full log: artifact trial.log of run {result.run_id})")
    assert not result.outcome.ok and not result.outcome.retryable
    assert result.outcome.reason == expected
    assert_reason_everywhere(client, result.run_id, expected, leaderboard())
    log = Path(client.download_artifacts(result.run_id, "trial.log", str(tmp_path)))
    assert "loading data" in log.read_text() and "Traceback" in log.read_text()  # the full story is in the log


def test_an_entrypoint_raising_shows_its_message(launcher, sweep):
    client, job, leaderboard = sweep
    result = launcher.launch(job(2, {"max_depth": 1}), ())
    expected = f"trainer raised ValueError: max_depth must be >= 2 (full log: artifact trial.log of run {result.run_id})"
    assert not result.outcome.ok and result.outcome.reason == expected
    assert_reason_everywhere(client, result.run_id, expected, leaderboard())


def test_a_non_python_command_shows_its_last_stderr_line(launcher, sweep):
    client, job, leaderboard = sweep
    script = "echo 'epoch 1/10'; echo 'fatal: CUDA out of memory (tried 2.00 GiB)' >&2; echo 'cleaning up'; exit 1"
    result = launcher.launch(job(3, {"batch": 4096}, entrypoint=None, command=["bash", "-c", script]), ())
    expected = ("command exited with code 1: fatal: CUDA out of memory (tried 2.00 GiB) "
                f"(full log: artifact trial.log of run {result.run_id})")
    assert not result.outcome.ok and result.outcome.reason == expected  # stderr's line, not stdout's last
    assert_reason_everywhere(client, result.run_id, expected, leaderboard())
