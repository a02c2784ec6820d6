"""Which GPUs this host has, and which running trial holds which.

The quota (how many GPUs the organisation may use at once) is a Prefect concurrency
limit; this module only answers "which physical GPU does this trial get", so no GPU is
ever handed to two running trials.
"""

from __future__ import annotations

import os
import threading


def host_gpus(environ: dict[str, str] | None = None) -> tuple[int, ...]:
    """The parent's CUDA_VISIBLE_DEVICES when set, else what NVML reports, else none (CPU trials)."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(int(x) for x in visible.split(",") if x.strip() and x.strip().lstrip("-").isdigit()
                     and int(x) >= 0)
    try:
        import pynvml  # nvidia-ml-py; optional

        pynvml.nvmlInit()
        try:
            return tuple(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: a CPU host
        return ()


class GpuPool:
    """Hands out distinct GPU ids to running trials. Thread-safe."""

    def __init__(self, gpu_ids: tuple[int, ...]):
        self._free = list(gpu_ids)
        self._lock = threading.Lock()
        self.has_gpus = bool(gpu_ids)

    def take(self, count: int) -> tuple[int, ...]:
        """``count`` free GPUs, or () on a CPU host. Callers never ask for more than are free,
        because trial concurrency is capped at floor(host GPUs / GPUs per trial)."""
        if not self.has_gpus:
            return ()
        with self._lock:
            if len(self._free) < count:
                raise RuntimeError(f"asked for {count} GPUs with only {self._free} free")
            taken, self._free = self._free[:count], self._free[count:]
            return tuple(taken)

    def give_back(self, gpu_ids: tuple[int, ...]) -> None:
        with self._lock:
            self._free.extend(gpu_ids)


def max_parallel_trials(quota: int, gpus_per_trial: int, host: tuple[int, ...], trials: int) -> int:
    """At most floor(quota / gpus) trials at once, fewer if this host has fewer GPUs."""
    cap = quota // gpus_per_trial
    if host:
        cap = min(cap, len(host) // gpus_per_trial)
    return max(1, min(cap, trials))
