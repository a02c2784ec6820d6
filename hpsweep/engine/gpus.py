"""Which GPUs this host has, and which running trial holds which.

The quota (how many GPUs the organisation may use at once) is a Prefect concurrency
limit; this module only answers "which physical GPU does this trial get", so no GPU is
ever handed to two running trials: not within one sweep (a lock-protected free list) and
not across sweeps or pool workers sharing the host (one ``flock`` per GPU, through ``filelock``).

GPU ids are NVML's numbering (nvidia-smi's, PCI bus order); trial processes get
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA numbers them the same way.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from filelock import Timeout, UnixFileLock

log = logging.getLogger("hpsweep")

ENV_GPU_LOCK_DIR = "HPSWEEP_GPU_LOCK_DIR"  # where the per-GPU lock files live (default: a temp folder)


def host_gpus(environ: dict[str, str] | None = None) -> tuple[int, ...]:
    """The parent's CUDA_VISIBLE_DEVICES when set, else what NVML reports, else none (CPU trials).

    CUDA_VISIBLE_DEVICES is read as CUDA reads it: the list ends at the first entry that
    is not a device (``-1`` is the usual "hide every GPU"); ``GPU-<uuid>`` entries are
    turned into NVML indices.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(range(_nvml_count()))
    ids: list[int] = []
    for token in (t.strip() for t in visible.split(",")):
        index = int(token) if token.isdigit() else _nvml_index_of_uuid(token) if token.startswith("GPU-") else None
        if index is None or index in ids:
            if token and token != "-1":  # -1 is the usual way to hide every GPU, not a mistake
                log.warning("CUDA_VISIBLE_DEVICES=%s: stopping at %r, as CUDA does (host GPUs: %s)", visible,
                            token, ids or "none")
            break
        ids.append(index)
    return tuple(ids)


def _nvml_count() -> int:
    try:
        import pynvml  # nvidia-ml-py; optional

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: a CPU host
        return 0


def _nvml_index_of_uuid(uuid: str) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # unknown UUID (or a MIG instance, which has no index), no driver
        return None


def default_lock_dir() -> Path:
    return Path(os.environ.get(ENV_GPU_LOCK_DIR) or Path(tempfile.gettempdir()) / "hpsweep-gpu-locks")


class GpuPool:
    """Hands out distinct GPU ids to running trials. Thread-safe, and safe across processes.

    Within a process a free list does the job. Between processes on one host (two sweeps
    sharing a quota, or pool workers) each handed-out GPU is also held with an exclusive
    ``flock`` on ``<lock_dir>/gpu-<id>.lock``; the kernel drops it when the holder dies, so a
    crashed sweep never strands a GPU. ``take`` waits while another process holds GPUs.
    """

    def __init__(self, gpu_ids: tuple[int, ...], lock_dir: Path | None = None, poll_s: float = 0.5):
        self._free = list(gpu_ids)
        self._held: dict[int, ExitStack] = {}  # GPU id -> its file lock, released by close()
        self._lock = threading.Lock()
        self._lock_dir = default_lock_dir() if lock_dir is None else Path(lock_dir)
        self._poll_s = poll_s
        self.has_gpus = bool(gpu_ids)

    def take(self, count: int, timeout_s: float | None = None) -> tuple[int, ...]:
        """``count`` GPUs no other trial holds, or () on a CPU host.

        Raises RuntimeError when this pool itself has fewer than ``count`` free (a caller
        bug: trial concurrency is capped at floor(host GPUs / GPUs per trial)), TimeoutError
        when other processes keep them busy past ``timeout_s``.
        """
        if not self.has_gpus:
            return ()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        warned = False
        while True:
            with self._lock:
                if len(self._free) < count:
                    raise RuntimeError(f"asked for {count} GPUs with only {self._free} free")
                got = self._lock_free(count)
                if got is not None:
                    return got
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{count} GPU(s) of {self._free} still held by other processes "
                                   f"after {timeout_s:g}s (locks in {self._lock_dir})")
            if not warned:
                log.warning("waiting for GPUs: another process on this host holds some of %s (locks in %s)",
                            self._free, self._lock_dir)
                warned = True
            time.sleep(self._poll_s)

    def _lock_free(self, count: int) -> tuple[int, ...] | None:
        """Lock ``count`` free GPUs, in free-list order (called with self._lock held)."""
        got: list[tuple[int, ExitStack]] = []
        for gpu in self._free:
            hold = self._try_lock(gpu)
            if hold is not None:
                got.append((gpu, hold))
                if len(got) == count:
                    break
        if len(got) < count:
            for _, hold in got:
                hold.close()
            return None
        for gpu, hold in got:
            self._free.remove(gpu)
            self._held[gpu] = hold
        return tuple(gpu for gpu, _ in got)

    def _try_lock(self, gpu: int) -> ExitStack | None:
        """GPU ``gpu``'s file lock, taken without waiting; None while another process holds it.

        A flock (never filelock's soft fallback, whose marker outlives a killed holder) on a
        descriptor trial processes do not inherit, so it lasts exactly as long as this process
        holds the GPU. A lock folder this process cannot write leaves the GPU guarded only
        within this process (an empty hold), as a warning.
        """
        hold = ExitStack()
        lock = UnixFileLock(self._lock_dir / f"gpu-{gpu}.lock", blocking=False, thread_local=False,
                            fallback_to_soft=False)  # give_back may run in another thread than take
        try:
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            hold.enter_context(lock)
        except Timeout:
            return None
        except OSError as e:  # e.g. another user's lock folder
            log.warning("cannot use the GPU lock file in %s (%s); GPU %d is not guarded against other "
                        "processes", self._lock_dir, e, gpu)
        return hold

    def give_back(self, gpu_ids: tuple[int, ...]) -> None:
        with self._lock:
            for gpu in gpu_ids:
                hold = self._held.pop(gpu, None)
                if hold is not None:
                    hold.close()
            # Freed GPUs go to the front, so the next take (a worker's next trial) reuses them.
            self._free[:0] = [g for g in gpu_ids if g not in self._free]


def max_parallel_trials(quota: int, gpus_per_trial: int, host: tuple[int, ...], trials: int) -> int:
    """min(floor(quota / gpus), floor(host GPUs / gpus), trials), at least 1.

    A host with GPUs but fewer than one trial needs is a ValueError (the sweep's input check
    rejects it first, with the file and key); a CPU host runs CPU trials under the quota alone.
    """
    if gpus_per_trial < 1:
        raise ValueError(f"gpus_per_trial must be >= 1, got {gpus_per_trial}")
    cap = quota // gpus_per_trial
    if host:
        if gpus_per_trial > len(host):
            raise ValueError(f"gpus_per_trial={gpus_per_trial} but this host has only {len(host)} GPU(s) "
                             f"({','.join(map(str, host))})")
        cap = min(cap, len(host) // gpus_per_trial)
    return max(1, min(cap, trials))
