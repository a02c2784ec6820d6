"""Does the GPU path really use the GPU? Runs the PyTorch demo sweep on this host's GPUs and again
on its CPU, checks in MLflow that the GPU trials trained on CUDA, and prints per-epoch time on GPU
vs CPU and the GPU utilisation MLflow's system metrics saw.

    bench/gpu_check.sh                 # needs a CUDA GPU, torch with CUDA, and the project installed
    bench/gpu_check.sh --cpu-only      # the CPU half alone (what runs on a machine without a GPU)

Exit codes: 0 checked, 1 a check failed (the message says which), 2 no usable GPU (and not
--cpu-only). Everything is written under --work (default: a new temp folder): data, MLflow
(SQLite), reports, trial folders; Prefect runs its temporary local API.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "params" / "spec_torch.yaml"
COMBINATIONS = REPO / "params" / "combinations_torch.yaml"


class CheckFailed(Exception):
    pass


def gpu_problem() -> str | None:
    """Why this host cannot run the GPU half, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install -e '.[torch]')"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (CPU-only build, no driver, or "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    from hpsweep.engine.gpus import host_gpus

    if not host_gpus():
        return "hpsweep finds no GPU on this host (NVML reports none and CUDA_VISIBLE_DEVICES is unset)"
    return None


def run_sweep(work: Path, name: str, quota: int, env: dict[str, str]) -> float:
    """`hpsweep run` on the torch demo in ``work``; returns its wall time. Raises on a non-zero exit."""
    cmd = [sys.executable, "-m", "hpsweep.cli", "run", "--spec", str(SPEC), "--combinations", str(COMBINATIONS),
           "--train", "data/train.csv", "--val", "data/val.csv", "--name", name, "--quota", str(quota),
           "--report-dir", f"reports/{name}"]
    started = time.monotonic()
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    took = time.monotonic() - started
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise CheckFailed(f"the {name} sweep exited with {result.returncode}; its output: {work / f'{name}.log'}\n"
                          + (result.stdout + result.stderr)[-2000:])
    print(f"  {name}: {took:.1f} s", flush=True)
    return took


def trial_stats(work: Path, name: str) -> list[dict[str, Any]]:
    """Per trial, from MLflow: hparams, F1, status, GPUs, device line of its log, epoch times, GPU metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    board = json.loads((work / "reports" / name / "leaderboard.json").read_text())
    stats = []
    for row in board["rows"]:
        run = client.get_run(row["run_id"])
        history = {key: [m.value for m in sorted(client.get_metric_history(row["run_id"], key),
                                                 key=lambda m: (m.step, m.timestamp))]
                   for key in run.data.metrics}
        try:
            device_line = next((line for line in Path(client.download_artifacts(
                row["run_id"], "trial.log", str(work / "logs" / row["run_id"]))).read_text().splitlines()
                if "training on" in line), "")
        except Exception:
            device_line = ""
        stats.append({"hparams": row["hparams"], "f1": row["f1"], "status": row["status"],
                      "gpus": run.data.tags.get("hpsweep.gpus", "?"), "device_line": device_line,
                      "epoch_s": history.get("epoch_s", []), "gpu_mem_mb": max(history.get("gpu_max_memory_mb", [0])),
                      "gpu_util": history.get("system/gpu_0_utilization_percentage", []),
                      "gpu_sys_mem_mb": history.get("system/gpu_0_memory_usage_megabytes", []),
                      "cpu_util": history.get("system/cpu_utilization_percentage", [])})
    return stats


def check_gpu_trials(stats: list[dict[str, Any]]) -> list[str]:
    """Everything that says a GPU trial did not really train on CUDA."""
    problems = []
    for s in stats:
        who = json.dumps(s["hparams"])
        if s["status"] != "FINISHED":
            problems.append(f"{who}: {s['status']}")
        if s["gpus"] in ("cpu", "?", ""):
            problems.append(f"{who}: hpsweep gave it no GPU (tag hpsweep.gpus={s['gpus']!r})")
        if "cuda" not in s["device_line"]:
            problems.append(f"{who}: its log does not say it trained on cuda: {s['device_line']!r}")
        if not s["gpu_mem_mb"] > 0:
            problems.append(f"{who}: no CUDA memory allocated by the trainer (gpu_max_memory_mb)")
        if not s["gpu_util"]:
            problems.append(f"{who}: no system/gpu_0_utilization_percentage in MLflow (nvidia-ml-py installed?)")
    return problems


def later_epochs(epoch_s: list[float]) -> float | None:
    """Median epoch time after the first (which pays CUDA/cuBLAS start-up)."""
    rest = epoch_s[1:] or epoch_s
    return statistics.median(rest) if rest else None


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(gpu: list[dict[str, Any]] | None, cpu: list[dict[str, Any]], walls: dict[str, float]) -> None:
    key = lambda s: json.dumps(s["hparams"], sort_keys=True)  # noqa: E731
    by_gpu = {key(s): s for s in gpu or []}
    print()
    head = ["hparams", "F1 cpu", "epoch s cpu"]
    if gpu is not None:
        head += ["F1 gpu", "epoch 1 s gpu", "epoch s gpu", "speed-up", "GPU util % mean/max", "GPU mem MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for c in cpu:
        hp = " ".join(f"{k}={v}" for k, v in c["hparams"].items())
        cells = [hp, fmt(c["f1"]), fmt(later_epochs(c["epoch_s"]))]
        g = by_gpu.get(key(c))
        if gpu is not None and g is not None:
            t_cpu, t_gpu = later_epochs(c["epoch_s"]), later_epochs(g["epoch_s"])
            util = g["gpu_util"]
            cells += [fmt(g["f1"]), fmt(g["epoch_s"][0] if g["epoch_s"] else None), fmt(t_gpu),
                      f"{t_cpu / t_gpu:.1f}x" if t_cpu and t_gpu else "-",
                      f"{statistics.mean(util):.0f} / {max(util):.0f}" if util else "-", fmt(g["gpu_mem_mb"], ".1f")]
        print("| " + " | ".join(cells) + " |")
    print()
    print("epoch s: median training time per epoch after the first (the trainer's epoch_s metric); "
          "GPU util: system/gpu_0_utilization_percentage samples; GPU mem: torch.cuda.max_memory_allocated")
    print("sweep wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-only", action="store_true", help="run and check only the CPU sweep")
    parser.add_argument("--work", type=Path, help="folder for data, MLflow and reports (default: a temp folder)")
    parser.add_argument("--cpu-quota", type=int, default=4, help="CPU trials at once (default 4)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="system metrics interval (default 1 s)")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial log otherwise
    problem = None if args.cpu_only else gpu_problem()
    if problem:
        print(f"error: no usable GPU: {problem}. Run on a GPU machine, or pass --cpu-only.", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="hpsweep-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from trainer.prepare import prepare

    prepare(work / "data")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "HPSWEEP_"))}
    base.update(HPSWEEP_SYSTEM_METRICS_S=str(args.sample_s), HPSWEEP_GPU_LOCK_DIR=str(work / "gpu-locks"),
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    walls: dict[str, float] = {}
    try:
        gpu_stats = None
        if not args.cpu_only:
            from hpsweep.engine.gpus import host_gpus

            # One trial per GPU at once: the quota is the host's GPU count.
            walls["gpu"] = run_sweep(work, "digits-torch-gpu", max(1, len(host_gpus())), base)
            gpu_stats = trial_stats(work, "digits-torch-gpu")
            problems = check_gpu_trials(gpu_stats)
            if problems:
                raise CheckFailed("GPU trials did not really run on CUDA:\n  " + "\n  ".join(problems))
            print(f"  ok: {len(gpu_stats)} trials trained on CUDA ({gpu_stats[0]['device_line'].split('INFO ')[-1]})")
        # Hide every GPU: hpsweep then runs CPU trials (HPSWEEP_DEVICE=cpu).
        walls["cpu"] = run_sweep(work, "digits-torch-cpu", args.cpu_quota, {**base, "CUDA_VISIBLE_DEVICES": "-1"})
        cpu_stats = trial_stats(work, "digits-torch-cpu")
        bad = [s for s in cpu_stats if s["status"] != "FINISHED" or not s["epoch_s"] or not s["cpu_util"]]
        if bad:
            raise CheckFailed(f"CPU trials without F1, epoch times or system metrics: {[s['hparams'] for s in bad]}")
        print_table(gpu_stats, cpu_stats, walls)
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.work is None:
            print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
