"""GPU packing on one host: distinct GPUs per running trial, concurrency = min(quota, host GPUs) / gpus,
freed GPUs reused at once, and no GPU shared with another sweep on the same host."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from hpsweep.engine.gpus import GpuPool, host_gpus, max_parallel_trials
from tests.conftest import Project
from tests.test_sweep_e2e import SLEEPY_SPEC, peak_concurrency, records, run_sweep


def test_concurrency_is_the_smaller_of_quota_and_host_gpus():
    assert max_parallel_trials(quota=8, gpus_per_trial=1, host=(0, 1, 2, 3), trials=20) == 4
    assert max_parallel_trials(quota=3, gpus_per_trial=1, host=(0, 1, 2, 3), trials=20) == 3
    assert max_parallel_trials(quota=8, gpus_per_trial=2, host=(0, 1, 2, 3, 4), trials=20) == 2
    assert max_parallel_trials(quota=8, gpus_per_trial=3, host=(), trials=20) == 2  # CPU host: quota only
    with pytest.raises(ValueError, match="only 4 GPU"):
        max_parallel_trials(quota=8, gpus_per_trial=5, host=(0, 1, 2, 3), trials=20)


def test_host_gpus_reads_cuda_visible_devices_as_cuda_does():
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == (2, 3)
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == ()  # the usual "no GPU"
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "0,1,-1,3"}) == (0, 1)  # CUDA ignores what follows -1
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "0,0"}) == (0,)


def test_two_sweeps_on_one_host_never_share_a_gpu(tmp_path: Path):
    # Two pools over the same GPUs stand for two sweep processes on one host (flock is per open file,
    # so it excludes within a process exactly as between processes).
    a, b = GpuPool((0, 1, 2, 3), lock_dir=tmp_path, poll_s=0.05), GpuPool((0, 1, 2, 3), lock_dir=tmp_path, poll_s=0.05)
    held_a = a.take(3)
    held_b = b.take(1)
    assert set(held_a).isdisjoint(held_b) and len(set(held_a + held_b)) == 4
    with pytest.raises(TimeoutError):
        b.take(1, timeout_s=0.2)  # every GPU is busy in one sweep or the other

    got: list[tuple[int, ...]] = []
    waiter = threading.Thread(target=lambda: got.append(b.take(2)))
    waiter.start()
    time.sleep(0.2)
    assert not got  # still waiting: sweep A holds them
    a.give_back(held_a)
    waiter.join(5)
    assert got and set(got[0]) <= set(held_a)  # B got two of the GPUs A freed


def test_freed_gpus_go_to_the_next_take_first(tmp_path: Path):
    pool = GpuPool((0, 1, 2, 3), lock_dir=tmp_path)
    first, _ = pool.take(1), pool.take(1)
    pool.give_back(first)
    assert pool.take(1) == first


@pytest.mark.slow
def test_one_gpu_trials_pack_four_gpus_with_quota_8(served_project: Project, tmp_path: Path):
    project, record = served_project, served_project.root / "rec.jsonl"
    combos = [{"f1": round(0.1 * i, 2)} for i in range(1, 9)]
    # quota 8 allows 8 one-GPU trials at once, the host has 4 GPUs: 4 at once, 2 waves.
    # 6 s trials: GPU workers start up to ~4 s apart on a loaded machine.
    result = run_sweep(project, combos, SLEEPY_SPEC.format(name="pack", sleep_s=6.0, gpus=1), 8,
                       env={"HPSWEEP_TEST_RECORD": str(record), "CUDA_VISIBLE_DEVICES": "0,1,2,3",
                            "HPSWEEP_GPU_LOCK_DIR": str(tmp_path / "locks")})
    assert result.returncode == 0, result.stderr
    assert "4 at once" in result.stderr + result.stdout
    events = records(record)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 8 and all(e["device"] == "cuda" for e in starts)
    assert peak_concurrency(events) == 4
    assert all(e["cuda"] in {"0", "1", "2", "3"} for e in starts)  # one GPU each, from the host's

    gpu_of = {e["pid"]: e["cuda"] for e in starts}
    holding: dict[int, str] = {}
    last_end: dict[str, float] = {}
    gaps = []
    for e in sorted(events, key=lambda e: (e["t"], e["event"] == "start")):
        if e["event"] == "start":
            assert e["cuda"] not in holding.values(), f"GPU {e['cuda']} given to two running trials"
            holding[e["pid"]] = e["cuda"]
            if e["cuda"] in last_end:
                gaps.append(e["t"] - last_end[e["cuda"]])
        else:
            holding.pop(e["pid"])
            last_end[gpu_of[e["pid"]]] = e["t"]
    # Every GPU ran two trials: each freed GPU went to a waiting trial, which started on it after
    # its first trial ended (by the trainers' own clocks). How soon is a throughput figure
    # (bench/sweep_bench.py), not asserted here.
    assert sorted(gpu_of.values()) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    assert len(gaps) == 4 and min(gaps) >= 0, gaps


@pytest.mark.slow
def test_system_metrics_without_a_gpu_still_log_cpu_and_memory(tmp_path: Path):
    """A trial handed GPU ids on a host with no driver (like this one) gets host metrics, no GPU ones,
    and a trial shorter than the sampling interval still gets its one closing sample."""
    from mlflow.tracking import MlflowClient

    from hpsweep.runtime.durable import MetricsLogger, SystemMetrics

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("sysmetrics")).info.run_id
    metrics = MetricsLogger(client, run_id)
    system = SystemMetrics(metrics, interval_s=0.3, gpu_ids=(0, 1), client=client, run_id=run_id)
    time.sleep(1.0)
    system.stop()
    metrics.flush()
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and sorted(m.step for m in cpu) == list(range(len(cpu)))
    keys = set(client.get_run(run_id).data.metrics)
    assert "system/system_memory_usage_percentage" in keys and not any(k.startswith("system/gpu") for k in keys)

    # A retry in the same run continues the steps; a sample interval longer than the trial still logs once.
    metrics = MetricsLogger(client, run_id)
    SystemMetrics(metrics, interval_s=60, client=client, run_id=run_id).stop()
    metrics.flush()
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert sorted(steps) == list(range(len(cpu) + 1))
