"""What a trial process does so that a crash, a lost host or a tracking outage loses nothing.

- ``MetricsLogger`` journals per-step metrics to the trial folder and ships them from a
  background thread, retrying with backoff while the tracking server is unreachable, so
  training never waits on (or dies of) a tracking outage, and a killed attempt's unshipped
  metrics go up with the next attempt; ``flush`` waits until everything is stored.
- ``CheckpointSync`` mirrors the checkpoint folder to the run's ``checkpoints/`` artifacts,
  so another host (or a rerun after the local disk is gone) resumes from the last one.
- ``restore_checkpoints`` fetches them back before an attempt starts with an empty folder.
- ``SystemMetrics`` samples CPU, memory, disk, network and the trial's GPUs into the run as
  MLflow system metrics (``system/...``), so a starved GPU shows in the MLflow UI.
- ``exit_when_dead`` ends the trial when its orchestrator is gone, so no orphan trains unobserved.

Every MLflow call goes through ``hpsweep.store.artifacts``; background loops are ``Periodic``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
from mlflow.tracking import MlflowClient

from hpsweep.identity import identity_is_dead
from hpsweep.periodic import Periodic
from hpsweep.store import artifacts
from hpsweep.store.artifacts import CHECKPOINT_ARTIFACT_DIR
from hpsweep.store.retry import retrying
from hpsweep.store.runs import checkpoint_runs
from hpsweep.store.tags import TAG_DATA_VERSION

log = logging.getLogger("hpsweep.trial")
SYSTEM_PREFIX = "system/"  # MLflow's: the run page's System metrics section shows these keys


class MetricsLogger:
    """Asynchronous, retrying ``log_batch`` for one run. Thread-safe.

    With a ``journal`` file, ``log`` appends each metric there before it returns, and the
    shipper records (in ``<journal>.shipped``) how far the journal is stored. A process killed
    between reporting an epoch and shipping it (the trainer has already checkpointed that
    epoch, so the retry will not report it again) loses nothing: the next logger on the same
    trial folder ships what is left first. Lines carry their run, so they go to the run
    that reported them. Re-sending a metric is harmless: MLflow keeps one copy of an
    identical (key, value, timestamp, step).
    """

    def __init__(self, client: MlflowClient, run_id: str, batch_size: int = 500, journal: Path | None = None):
        self._client, self._run_id, self._batch_size = client, run_id, batch_size
        self._queue: queue.Queue[tuple[str, Metric, int] | None] = queue.Queue()
        self._failed: Exception | None = None
        self._lock = threading.Lock()
        self._journal = self._shipped_file = None
        if journal is not None:
            self._shipped_file = journal.with_name(journal.name + ".shipped")
            self._replay(journal)
            self._journal = open(journal, "a", encoding="utf-8")
            if _ends_mid_line(journal):
                self._journal.write("\n")  # end the line a kill cut short, so ours start on their own
        self._thread = threading.Thread(target=self._ship, name="hpsweep-metrics", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        with self._lock:  # journal order is queue order, so "shipped up to offset N" is exact
            for key, value in metrics.items():
                metric = Metric(key, float(value), ts, int(step))
                offset = 0
                if self._journal is not None:
                    self._journal.write(json.dumps({"run": self._run_id, "key": key, "value": metric.value,
                                                    "timestamp": ts, "step": metric.step}) + "\n")
                    self._journal.flush()  # in the page cache: survives the process being killed
                    offset = self._journal.tell()
                self._queue.put((self._run_id, metric, offset))

    def _replay(self, journal: Path) -> None:
        """Store what an earlier process journaled but did not ship, before anything new is logged
        (so the system-metric steps counted from the run's history follow them)."""
        if not journal.exists():
            return
        try:
            shipped = int(self._shipped_file.read_text())  # type: ignore[union-attr]
        except (OSError, ValueError):
            shipped = 0
        items = []
        with open(journal, "rb") as f:
            f.seek(shipped)
            for line in f:
                shipped += len(line)
                try:
                    m = json.loads(line)
                except ValueError:  # a line cut short by the kill: nothing to ship
                    continue
                items.append((m["run"], Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])),
                              shipped))
        if items:
            log.info("storing %d metrics an earlier attempt reported but did not ship", len(items))
            self._store(items, deadline_s=600)

    def _ship(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            items = [b for b in batch if b is not None]
            if items and self._failed is None:
                try:
                    # An hour of outage is survivable; after that the trial fails (retryably) at flush.
                    self._store(items, deadline_s=3600)
                except Exception as e:
                    self._failed = e  # the journal keeps them for the next attempt

    def _store(self, items: list[tuple[str, Metric, int]], deadline_s: float) -> None:
        for run_id in dict.fromkeys(run for run, _, _ in items):
            metrics = [m for run, m, _ in items if run == run_id]
            retrying(lambda: artifacts.log_metrics(self._client, run_id, metrics), "logging metrics", deadline_s)
        if self._shipped_file is not None and items[-1][2]:
            self._shipped_file.write_text(str(items[-1][2]))

    def flush(self, timeout_s: float = 3600) -> None:
        """Wait until every queued metric is stored; raise if that could not happen."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"metrics not stored after {timeout_s:.0f}s: tracking server unreachable")
        if self._journal is not None:
            self._journal.close()
        if self._failed is not None:
            raise RuntimeError(f"metrics not stored: {self._failed}") from self._failed


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class CheckpointSync:
    """Uploads new or changed checkpoint files every ``interval_s`` and once more at ``stop``."""

    def __init__(self, client: MlflowClient, run_id: str, folder: Path, interval_s: float):
        self._client, self._run_id, self._folder = client, run_id, folder
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._periodic = Periodic(interval_s, self.sync_once, "hpsweep-checkpoints", last=True).start()

    def sync_once(self) -> int:
        """Upload what changed since the last sync; returns how many files went up."""
        sent = 0
        for path in sorted(self._folder.glob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue  # a dot-file is a checkpoint being written
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced by the trainer since the listing: next round
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self._uploaded.get(path.name) == stamp:
                continue
            try:
                artifacts.upload_file(self._client, self._run_id, path, CHECKPOINT_ARTIFACT_DIR)
            except Exception as e:  # tracking outage: try again next round; the local copy is still there
                log.warning("checkpoint upload of %s failed: %s", path.name, e)
                continue
            self._uploaded[path.name] = stamp
            sent += 1
        return sent

    def stop(self) -> None:
        """Wait for a sync in progress, then upload what the trainer wrote since."""
        self._periodic.stop()


class SystemMetrics:
    """Samples the host and the trial's GPUs every ``interval_s`` into the trial's run.

    The values and names are MLflow's own system metrics (``mlflow.system_metrics``: CPU and
    memory via psutil, disk, network, and per GPU utilisation, memory and power via NVML), logged
    as ``system/<name>`` at steps 0, 1, 2, ... through the trial's ``MetricsLogger``, so they
    share its retries on a tracking outage and its final flush. Unlike MLflow's
    ``SystemMetricsMonitor`` it watches only this trial's GPUs (``gpu_0`` is the trial's
    ``cuda:0``, whichever physical GPU that is; the run's ``hpsweep.gpus`` tag says which),
    polls no run status, and takes one last sample at ``stop``, so a trial shorter than the
    interval still gets a point (CPU utilisation over its whole life). A retry continues the
    steps after the previous attempt's.

    Everything (NVML included) starts in a background thread and any failure only logs a
    warning: metrics are never worth slowing or failing a trial. No GPU, no driver or no
    ``nvidia-ml-py`` means no GPU metrics.
    """

    def __init__(self, metrics: MetricsLogger, interval_s: float, gpu_ids: tuple[int, ...] = (),
                 client: MlflowClient | None = None, run_id: str | None = None):
        self._metrics, self._gpu_ids = metrics, tuple(gpu_ids)
        self._client, self._run_id = client, run_id
        self._monitors: list = []
        self._step: int | None = None  # set once the monitors are ready (in the background)
        self._periodic = Periodic(interval_s, self._sample, "hpsweep-system-metrics", first=True).start()

    def _sample(self) -> None:
        if self._step is None:
            self._set_up()
        elif self._monitors:
            self._step = self._publish(self._step)

    def _set_up(self) -> None:
        try:
            self._monitors = self._make_monitors()
            step = self._first_step()
            self._collect()
            for m in self._monitors:  # psutil's first CPU reading is relative to nothing: drop it
                m.clear_metrics()
        except Exception as e:  # noqa: BLE001 - metrics are never worth failing a trial
            log.warning("system metrics off for this trial: %s: %s", type(e).__name__, e)
            self._monitors, step = [], 0
        self._step = step

    def _make_monitors(self) -> list:
        monitors: list = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        if self._gpu_ids:
            gpu = trial_gpu_monitor(self._gpu_ids)
            if gpu is not None:
                monitors.append(gpu)
        return monitors

    def _first_step(self) -> int:
        """After the previous attempt's last system step (0 for a fresh run)."""
        if self._client is None or self._run_id is None:
            return 0
        try:
            return artifacts.next_step(self._client, self._run_id, SYSTEM_PREFIX)
        except Exception as e:  # noqa: BLE001 - tracking unreachable: overlapping steps beat no metrics
            log.info("system metrics start at step 0: %s: %s", type(e).__name__, e)
            return 0

    def _collect(self) -> None:
        for m in self._monitors:
            try:
                m.collect_metrics()
            except Exception as e:  # e.g. a GPU fallen off the bus: keep the other metrics
                log.warning("system metrics: %s failed: %s", type(m).__name__, e)

    def _publish(self, step: int) -> int:
        self._collect()
        values: dict[str, float] = {}
        for m in self._monitors:
            try:
                values.update(m.aggregate_metrics())
            except Exception:  # nothing collected (ZeroDivisionError) or a broken monitor
                pass
            m.clear_metrics()
        if values:
            self._metrics.log(step, {SYSTEM_PREFIX + k: v for k, v in values.items()})
        return step + 1

    def stop(self, timeout_s: float = 10.0) -> None:
        """Take the last sample and hand it to the metrics logger (flush that afterwards). A thread
        still setting up after ``timeout_s`` (stuck on a tracking outage) is left behind, sampling nothing."""
        if self._periodic.stop(timeout_s) and self._step is not None and self._monitors:
            self._step = self._publish(self._step)


def trial_gpu_monitor(gpu_ids: tuple[int, ...]):
    """MLflow's ``GPUMonitor`` narrowed to ``gpu_ids`` (NVML indices), or None without NVML or GPUs."""
    try:
        monitor = GPUMonitor()  # raises without nvidia-ml-py or a driver
        handles = monitor.gpu_handles
        monitor.gpu_handles = [handles[i] for i in gpu_ids]  # metric names follow list positions
        return monitor
    except Exception as e:
        log.info("no GPU metrics for GPUs %s: %s: %s", list(gpu_ids), type(e).__name__, e)
        return None


def restore_checkpoints(client: MlflowClient, experiment_id: str, trial_key: str, dest: Path,
                        data_version: str | None = None) -> str | None:
    """Fill an empty ``dest`` from the newest unfinished run of this trial that uploaded checkpoints.

    A FINISHED run's checkpoints are its final state: resuming from them would skip the
    training a new attempt is for (``--retrain``). With ``data_version``, a run tagged with another
    one (it read data that changed under it) is skipped. Returns the run id it restored from, or
    None (nothing found, or ``dest`` already has files).
    """
    if dest.is_dir() and any(p.is_file() for p in dest.iterdir()):
        return None
    source = _checkpoint_source(client, experiment_id, trial_key, data_version)
    if source is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".restore-{os.getpid()}"
    try:  # downloaded beside ``dest`` first: a download cut short leaves ``dest`` empty, to retry
        for f in artifacts.download_dir(client, source, CHECKPOINT_ARTIFACT_DIR, tmp).iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def _checkpoint_source(client: MlflowClient, experiment_id: str, trial_key: str, data_version: str | None) -> str | None:
    """``artifacts.checkpoint_source``, less the runs whose data version tag is not ``data_version``."""
    if data_version is None:
        return artifacts.checkpoint_source(client, experiment_id, trial_key)
    for run in checkpoint_runs(client, experiment_id, trial_key):
        if run.data.tags.get(TAG_DATA_VERSION, data_version) != data_version:
            continue
        try:
            if artifacts.has_files(client, run.info.run_id, CHECKPOINT_ARTIFACT_DIR):
                return run.info.run_id
        except Exception:  # noqa: BLE001 - its artifact store is gone or unreadable: try an older one
            continue
    return None


def exit_when_dead(identity: str, interval_s: float = 1.0) -> Periodic:
    """Kill this trial's whole process group once the orchestrator ``identity`` is gone.

    A trial of a killed orchestrator must not train on unobserved (nobody would record its
    F1, and it would hold a GPU the rerun needs); the rerun resumes it from its checkpoint.
    """

    def check() -> None:
        if identity_is_dead(identity):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    return Periodic(interval_s, check, "hpsweep-orphan-watch", first=True).start()
