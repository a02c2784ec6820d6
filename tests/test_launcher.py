"""The local launcher with real trial processes, and how outcomes are judged."""

import math
import os
import signal
import time
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from hpsweep.engine.gpus import GpuPool, host_gpus, max_parallel_trials
from hpsweep.engine.outcome import MAX_ERROR_CHARS, check_f1, error_line, judge
from tests.conftest import alive
from hpsweep.engine.process import ProcessRunner
from hpsweep.model import TrialJob
from hpsweep.runtime.runner import TrialRequest


@pytest.mark.parametrize("result, reason", [
    (None, "wrote no F1"), ({"f1": "high"}, "not a number"), ({"f1": math.nan}, "outside [0, 1]"),
    ({"f1": 1.7}, "outside [0, 1]"), ({"f1": -0.1}, "outside [0, 1]"), ({"f1": True}, "not a number"),
])
def test_bad_f1_fails_the_trial_with_a_reason(result, reason):
    outcome = check_f1(result)
    assert not outcome.ok and reason in outcome.reason and not outcome.retryable


def test_judge_tells_machine_failures_from_trainer_failures():
    killed = judge(-signal.SIGKILL, False, None, None, None)
    assert killed.retryable and "SIGKILL" in killed.reason
    raised = judge(0, False, None, {"error": "ValueError: lr"}, None)
    assert not raised.retryable and "ValueError: lr" in raised.reason
    timed_out = judge(None, True, 2.0, None, None)
    assert not timed_out.retryable and "time limit of 2 s" in timed_out.reason
    assert judge(0, False, None, {"returned": True}, {"f1": 0.5}).f1 == 0.5


SKLEARN_ERROR = ("sklearn.utils._param_validation.InvalidParameterError: The 'min_samples_split' parameter of "
                 "DecisionTreeClassifier must be an int in the range [2, inf) or a float in the range (0.0, 1.0]. "
                 "Got 1 instead.")
CHAINED_TRACEBACK = f"""epoch 1 done
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    fit()
KeyError: 'depth'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "train.py", line 9, in <module>
    raise InvalidParameterError(msg)
{SKLEARN_ERROR}
wandb: Waiting for W&B process to finish... (failed 1).
"""


@pytest.mark.parametrize("stderr, line", [
    (CHAINED_TRACEBACK, SKLEARN_ERROR),  # the last exception, not what an exit handler printed after it
    ("loading\nfatal: CUDA out of memory\n\n", "fatal: CUDA out of memory"),
    ("\x1b[31mError: bad flag --lr\x1b[0m\n\u2570\u2500\u2500\u256f\n", "Error: bad flag --lr"),  # colours, box art
    ("", None), ("\n \n", None),
])
def test_the_error_line_is_the_trainers_own_last_words(stderr, line):
    assert error_line(stderr) == line


def test_a_failed_command_is_judged_with_its_error_line_and_where_the_log_is():
    outcome = judge(0, False, None, {"exit_code": 1, "stderr_tail": CHAINED_TRACEBACK}, None, log_hint="the log")
    assert outcome.reason == f"command exited with code 1: {SKLEARN_ERROR} (full log: the log)"
    assert not outcome.retryable
    long = judge(0, False, None, {"error": "ValueError: " + "x" * 5000}, None)
    assert len(long.reason) <= len("trainer raised ") + MAX_ERROR_CHARS and long.reason.endswith("x…")
    multi = judge(0, False, None, {"error": "ValidationError: 1 error\n  depth\n    must be >= 2"}, None)
    assert multi.reason == "trainer raised ValidationError: 1 error depth must be >= 2"  # one line, for a table
    died = judge(1, False, None, None, None, log_tail="Fatal Python error: Segmentation fault\n")
    assert died.retryable and died.reason.endswith("without reporting: Fatal Python error: Segmentation fault")


def test_gpu_discovery_and_packing():
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == (0, 1, 2, 3)
    assert host_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert max_parallel_trials(quota=8, gpus_per_trial=1, host=(0, 1, 2, 3), trials=100) == 4
    assert max_parallel_trials(quota=5, gpus_per_trial=2, host=(), trials=100) == 2
    assert max_parallel_trials(quota=8, gpus_per_trial=1, host=(), trials=3) == 3
    pool = GpuPool((0, 1, 2, 3))
    a, b = pool.take(2), pool.take(2)
    assert set(a).isdisjoint(b) and len(set(a + b)) == 4
    pool.give_back(a)
    assert pool.take(2) == a


@pytest.fixture(scope="module")
def launcher():
    return ProcessRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real tracking store and experiment: trials log system metrics to their run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_experiment("launcher")


@pytest.fixture
def request_for(tmp_path: Path, store: tuple[str, str]):
    uri, experiment_id = store

    def make(command: list[str]) -> TrialRequest:
        run_id = MlflowClient(uri).create_run(experiment_id).info.run_id
        job = TrialJob(sweep_id="s", experiment_id=experiment_id, parent_run_id="p", tracking_uri=uri, index=1,
                       hparams={"x": 1}, trial_key="k", attempt=1, settings={}, train=str(tmp_path),
                       val=str(tmp_path), command=command, cwd=str(tmp_path))
        return TrialRequest(job=job, run_id=run_id, train=str(tmp_path), val=str(tmp_path),
                            trial_dir=str(tmp_path / "trial"))
    return make


def test_time_limit_kills_the_trainer_and_its_children(tmp_path, launcher, request_for):
    trainer_pid, child_pid = tmp_path / "trainer.pid", tmp_path / "child.pid"
    (tmp_path / "trial").mkdir()
    script = f"echo $$ > {trainer_pid}; sleep 300 & echo $! > {child_pid}; wait"
    outcome = launcher.run(request_for(["bash", "-c", script]), time_limit_s=3)
    assert not outcome.ok and "time limit of 3 s exceeded" in outcome.reason and not outcome.retryable
    trainer, grandchild = int(trainer_pid.read_text()), int(child_pid.read_text())
    assert gone(trainer)
    assert gone(grandchild)  # the whole process group went, not just the runner


def gone(pid: int, patience_s: float = 30.0) -> bool:
    """The process has ended (a SIGKILLed orphan is reaped by init a moment after ``run`` returns)."""
    give_up = time.monotonic() + patience_s
    while alive(pid) and time.monotonic() < give_up:
        time.sleep(0.05)
    return not alive(pid)


def test_a_trainer_killed_by_a_signal_is_retryable(tmp_path, launcher, request_for):
    (tmp_path / "trial").mkdir()
    outcome = launcher.run(request_for(["bash", "-c", "kill -9 $$"]), time_limit_s=60)
    assert not outcome.ok and outcome.retryable and "SIGKILL" in outcome.reason


def test_command_output_is_the_trial_log(tmp_path, launcher, request_for):
    (tmp_path / "trial").mkdir()
    script = 'echo "hello from $HPSWEEP_DEVICE"; echo oops >&2; echo \'{"f1": 0.25}\' > "$HPSWEEP_RESULT"'
    outcome = launcher.run(request_for(["bash", "-c", script]), time_limit_s=60)
    assert outcome.ok and outcome.f1 == 0.25
    log = (tmp_path / "trial" / "trial.log").read_text()
    assert "hello from cpu" in log and "oops" in log


def test_a_running_trial_heartbeats_and_a_failing_beat_does_not_fail_it(tmp_path, launcher, request_for, monkeypatch):
    import hpsweep.engine.process as process

    monkeypatch.setattr(process, "HEARTBEAT_S", 0.05)
    flag, beats = tmp_path / "beaten", []

    def heartbeat() -> None:
        beats.append(1)
        if len(beats) == 1:
            raise ConnectionError("tracking server down")  # a missed beat
        flag.touch()

    (tmp_path / "trial").mkdir()
    script = f'while [ ! -f {flag} ]; do sleep 0.05; done; echo \'{{"f1": 0.5}}\' > "$HPSWEEP_RESULT"'
    outcome = launcher.run(request_for(["bash", "-c", script]), time_limit_s=120, heartbeat=heartbeat)
    assert outcome.ok and outcome.f1 == 0.5, outcome.reason  # the trainer saw the second beat land
    assert len(beats) >= 2
