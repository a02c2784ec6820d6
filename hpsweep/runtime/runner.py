"""Runs one trial inside its own process (the child side of the local launcher).

The process is forked from a preloaded fork server, so MLflow and the trainer's module
are imported once per sweep, not once per trial. It becomes the leader of a new process
group, so a time limit kills the trainer and everything it started.

It never decides whether the trial succeeded: it writes what happened to
``outcome.json`` and the parent judges (a process killed by a signal writes nothing,
and the parent must handle that case anyway).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpsweep import predictions
from hpsweep.engine.outcome import result_json
from hpsweep.identity import die_with_parent
from hpsweep.runtime.datacheck import changed_reason, data_changes, version_read
from hpsweep.runtime.durable import CheckpointSync, MetricsLogger, SystemMetrics, exit_when_dead, restore_checkpoints
from hpsweep.store import artifacts
from hpsweep.store.retry import retrying
from hpsweep.store.tags import TAG_DATA_VERSION
from hpsweep.model import TrialJob
from trainer import contract

# Imported here so the fork server pays for it once; trials only fork.
import mlflow  # noqa: F401
from mlflow.tracking import MlflowClient

# Seconds between system-metric samples of a running trial (CPU, memory, its GPUs); 0 turns
# them off. MLflow's own variable is honoured when ours is unset.
ENV_SYSTEM_METRICS_S = "HPSWEEP_SYSTEM_METRICS_S"
DEFAULT_SYSTEM_METRICS_S = 10.0


def system_metrics_interval(environ: dict[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(ENV_SYSTEM_METRICS_S) or env.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_SYSTEM_METRICS_S
    except ValueError:
        logging.getLogger("hpsweep.trial").warning("ignoring %s=%r: not a number", ENV_SYSTEM_METRICS_S, raw)
        return DEFAULT_SYSTEM_METRICS_S


@dataclass(frozen=True)
class TrialRequest:
    """A trial attempt as its process runs it: the job, plus where it runs on this host. Plain
    data, so it pickles across the fork server."""

    job: TrialJob
    run_id: str
    train: str  # the data as this host reads it (the sweep's files, or this host's cached copy)
    val: str
    trial_dir: str
    gpu_ids: tuple[int, ...] = ()
    checkpoint_sync_s: float = 30.0
    # hpsweep.identity.process_identity() of the sweep's process; the trial dies with it ("": never).
    orchestrator: str = ""
    # Read where the request is made (the sweep or a pool worker), so its environment decides.
    system_metrics_s: float = field(default_factory=system_metrics_interval)

    @property
    def paths(self) -> "TrialPaths":
        return TrialPaths(Path(self.trial_dir))


@dataclass(frozen=True)
class TrialPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def log(self) -> Path:
        return self.root / "trial.log"

    @property
    def hparams(self) -> Path:
        return self.root / "hparams.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def metrics_journal(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def stop(self) -> Path:
        """Written (with the reason) when the early-stopping rule stops the trial: HPSWEEP_STOP_FILE."""
        return self.root / "stop"

    @property
    def trainer_predictions(self) -> Path:
        """Where a command trainer may write its predictions ($HPSWEEP_PREDICTIONS)."""
        return self.root / predictions.TRAINER_FILE

    @property
    def predictions(self) -> Path:
        """The predictions as stored (compressed .npz): the trial run's predictions/ artifact."""
        return self.root / predictions.STORED_NAME


def trial_env(req: TrialRequest) -> dict[str, str]:
    """The documented environment of a trial (the command trainer's contract)."""
    paths = req.paths
    env = {
        contract.ENV_HPARAMS: str(paths.hparams),
        contract.ENV_TRAIN_DATA: req.train,
        contract.ENV_VAL_DATA: req.val,
        contract.ENV_CHECKPOINT_DIR: str(paths.checkpoints),
        contract.ENV_MODEL_DIR: str(paths.model),
        contract.ENV_RESULT: str(paths.result),
        contract.ENV_PREDICTIONS: str(paths.trainer_predictions),
        contract.ENV_DEVICE: "cuda" if req.gpu_ids else "cpu",
        contract.ENV_STOP_FILE: str(paths.stop),
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in req.gpu_ids),
        "MLFLOW_TRACKING_URI": req.job.tracking_uri,
        "MLFLOW_RUN_ID": req.run_id,
    }
    trainer = (os.environ.get("HPSWEEP_TRAINER_USERNAME"), os.environ.get("HPSWEEP_TRAINER_PASSWORD"))
    if all(trainer):  # the trial writes as the trainer account, not as the sweep that started it
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = trainer
    if req.gpu_ids:
        # GPU ids are NVML's (nvidia-smi's) numbering, which is PCI bus order; CUDA's default
        # order is "fastest first", so without this cuda:0 could be another trial's GPU.
        env["CUDA_DEVICE_ORDER"] = os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


def run_trial_process(req: TrialRequest) -> None:
    """Process target: set up the trial's world, run the trainer, record the outcome."""
    os.setsid()
    # A stopping sweep sends the trial's group SIGTERM: an in-process trainer is interrupted (its
    # checkpoints and metrics are still shipped below); a command trainer gets the signal itself.
    signal.signal(signal.SIGTERM, _interrupt_trainer if req.job.entrypoint is not None else _ignore_once)
    if req.orchestrator:
        exit_when_dead(req.orchestrator)
    os.chdir(req.job.cwd)
    paths = req.paths
    log = open(paths.log, "ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    os.environ.update(trial_env(req))
    paths.hparams.write_text(json.dumps({**req.job.settings, **req.job.hparams}, indent=1))
    client = MlflowClient(req.job.tracking_uri)
    try:
        outcome = _train_durably(req, client)
    except Exception as e:  # hpsweep's own plumbing (tracking, artifact store) failed: worth a retry
        outcome = {"error": f"tracking or artifact store unavailable: {type(e).__name__}: {e}",
                   "retryable": True}
        traceback.print_exc()
    _write_json(paths.outcome, outcome)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class TrialStopped(BaseException):
    """The sweep is stopping (Ctrl-C or SIGTERM to it): not an Exception, so a trainer's own
    ``except Exception`` cannot swallow it."""


def _interrupt_trainer(signum: int, _frame: object) -> None:
    raise TrialStopped(f"stopped by {signal.Signals(signum).name}: the sweep is stopping")


def _ignore_once(signum: int, _frame: object) -> None:
    """The command trainer in this group got the same signal: wait for it to end (a handler, not
    SIG_IGN, so the command does not inherit an ignored SIGTERM)."""


def _train_durably(req: TrialRequest, client: MlflowClient) -> dict[str, Any]:
    """Restore checkpoints, train with metrics shipped and checkpoints mirrored in the background,
    then wait until metrics and model are stored. The trainer's own exception is its outcome.

    The data is checked against the recorded version before the trainer starts and after it ends
    (hpsweep.runtime.datacheck): a trial never trains on, nor is tagged with, bytes it was not keyed by."""
    paths = req.paths
    read = {"train": req.train, "val": req.val}
    changed = data_changes(req.job, read)
    if changed:  # nothing started: the run keeps the version it was planned with, and fails
        return {"refused": changed_reason(changed)}
    if req.job.resume and req.job.experiment_id and req.job.trial_key:
        data_version = req.job.versions.get(TAG_DATA_VERSION)
        source = retrying(lambda: restore_checkpoints(client, req.job.experiment_id, req.job.trial_key, paths.checkpoints,
                                                      data_version=data_version),
                          "restoring checkpoints", deadline_s=600)
        if source:
            logging.info("restored checkpoints of run %s from the artifact store", source)
    for stale in (paths.trainer_predictions, paths.predictions):  # an earlier attempt's are not this one's
        stale.unlink(missing_ok=True)
    sync = CheckpointSync(client, req.run_id, paths.checkpoints, req.checkpoint_sync_s)
    metrics = MetricsLogger(client, req.run_id, journal=paths.metrics_journal)
    system = (SystemMetrics(metrics, req.system_metrics_s, req.gpu_ids, client, req.run_id)
              if req.system_metrics_s > 0 else None)
    try:
        outcome = _run_entrypoint(req, metrics) if req.job.entrypoint is not None else _run_command(req)
    except BaseException as e:  # SystemExit from a trainer is its own verdict too
        traceback.print_exc()
        outcome = {"error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                   "traceback": traceback.format_exc()}
    finally:
        signal.signal(signal.SIGTERM, _ignore_once)  # from here on the trial only ships what it has
        sync.stop()
        if system is not None:
            system.stop()  # its last sample goes into the flush below
    changed = data_changes(req.job, read)
    if changed:  # it read while the data changed: what it learned belongs to no recorded version
        outcome = {"refused": changed_reason(changed)}
    metrics.flush()  # a trial is not done until its progress is stored
    retrying(lambda: _take_back_run(client, req.run_id), "reopening the trial's run", deadline_s=600)
    if changed:  # its run (and checkpoints) carry the version it read, so no rerun resumes from them
        retrying(lambda: client.set_tag(req.run_id, TAG_DATA_VERSION, version_read(req.job, changed)),
                 "tagging the data the trial read", deadline_s=600)
    trained = "error" not in outcome and "refused" not in outcome and not outcome.get("exit_code")
    if paths.model.is_dir() and any(paths.model.iterdir()) and trained:
        # Uploaded from the trial's own process: on a fleet, the files live only here.
        retrying(lambda: artifacts.upload_dir(client, req.run_id, paths.model, artifacts.MODEL_ARTIFACT_DIR),
                 "uploading the model", deadline_s=3600)
    if trained and _stored_predictions(paths):
        retrying(lambda: artifacts.upload_file(client, req.run_id, paths.predictions,
                                               artifacts.PREDICTIONS_ARTIFACT_DIR),
                 "uploading the predictions", deadline_s=3600)
    return outcome


def _stored_predictions(paths: TrialPaths) -> bool:
    """The trial's predictions compressed in ``paths.predictions`` (a Python trainer's are there
    already; a command trainer's file is read and converted). Predictions that cannot be used are a
    warning in the trial log: the trial's F1 still counts, the report shows no interval for it."""
    if paths.predictions.is_file():
        return True
    if not paths.trainer_predictions.is_file():
        return False
    try:
        predictions.save(paths.predictions, *predictions.load(paths.trainer_predictions))
    except (predictions.PredictionsError, OSError) as e:
        logging.warning("predictions in %s left out: %s", contract.ENV_PREDICTIONS, e)
        return False
    return True


def _take_back_run(client: MlflowClient, run_id: str) -> None:
    """A trainer that ended hpsweep's run itself (``with mlflow.start_run(run_id=MLFLOW_RUN_ID)`` ends
    it FINISHED or FAILED) hands it back RUNNING: hpsweep closes it, with the trial's outcome."""
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def _die_with_parent() -> None:
    """A command trainer dies with its runner process (which dies with the orchestrator); not on
    Linux, trials outlive a crashed orchestrator until their time limit."""
    die_with_parent(signal.SIGKILL)


def _run_entrypoint(req: TrialRequest, metrics: MetricsLogger) -> dict[str, Any]:
    from hpsweep.inputs import resolve_entrypoint

    train = resolve_entrypoint(req.job.entrypoint)  # type: ignore[arg-type]
    paths = req.paths
    ctx = contract.TrainContext(
        checkpoint_dir=paths.checkpoints,
        model_dir=paths.model,
        device="cuda" if req.gpu_ids else "cpu",
        gpu_ids=tuple(req.gpu_ids),
        settings=dict(req.job.settings),
        _reporter=metrics.log,
        stop_file=paths.stop,
        _predictions=lambda y_true, y_pred: predictions.save(paths.predictions, y_true, y_pred),
    )
    data = contract.DataRefs(Path(req.train), Path(req.val))
    f1 = train(dict(req.job.hparams), data, ctx)
    _write_text(paths.result, result_json(f1))
    return {"returned": True}


def _run_command(req: TrialRequest) -> dict[str, Any]:
    """Run the command with our stdout (the trial log) as its stdout; its stderr goes to the trial log
    too, through a tee that keeps its end: the failure reason quotes the command's own last error."""
    proc = subprocess.Popen(req.job.command, env=os.environ.copy(), preexec_fn=_die_with_parent,  # type: ignore[arg-type]
                            stderr=subprocess.PIPE)
    tee = StderrTee(proc.stderr.fileno(), sys.stderr.fileno())  # type: ignore[union-attr]
    code = proc.wait()
    # A child the command left behind may hold stderr open: quote what arrived, do not wait for it.
    return {"exit_code": code, "stderr_tail": tee.tail(wait_s=2.0)}


# How much of a command's stderr the runner keeps for the failure reason (the last bytes).
STDERR_TAIL_BYTES = 16 * 1024


class StderrTee:
    """Copies everything read from ``source`` to ``sink`` in a background thread, keeping the last
    ``keep`` bytes. A failing sink (disk full) loses log lines, never blocks the writer."""

    def __init__(self, source: int, sink: int, keep: int = STDERR_TAIL_BYTES):
        self._source, self._sink, self._keep = source, sink, keep
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._copy, name="stderr-tee", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        while chunk := os.read(self._source, 65536):
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(self._sink, view):]
            except OSError:
                pass
            with self._lock:
                self._tail += chunk
                del self._tail[:-self._keep]

    def tail(self, wait_s: float) -> str:
        """What was kept, once the source reached its end or after ``wait_s`` seconds."""
        self._thread.join(wait_s)
        with self._lock:
            return bytes(self._tail).decode("utf-8", errors="replace")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

