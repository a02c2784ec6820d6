"""The PyTorch reference trainer (trainer/torch_reference.py), alone and in real sweeps on the CPU:
real F1s, per-epoch curves and system metrics in MLflow, and a SIGKILLed trial that resumes from its
checkpoint to the same F1 as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the `torch` extra

import psutil  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tests.conftest import Project  # noqa: E402
from tests.test_sweep_e2e import leaderboard  # noqa: E402
from trainer import torch_reference  # noqa: E402
from trainer.contract import DataRefs, TrainContext  # noqa: E402

SPEC = """
name: {name}
trainer:
  entrypoint: trainer.torch_reference:train
settings: {{epochs: {epochs}, seed: 0, epoch_sleep_s: {sleep_s}}}
resources: {{gpus: 1}}
"""


def train_in_process(demo_data: Path, folder: Path, hparams: dict, epochs: int) -> tuple[float, list[int]]:
    """Train in this process into ``folder``'s checkpoints; the F1 and the steps reported."""
    steps: list[int] = []
    ctx = TrainContext(checkpoint_dir=folder / "checkpoints", model_dir=folder / "model",
                       settings={"epochs": epochs, "seed": 0}, _reporter=lambda step, _: steps.append(step))
    f1 = torch_reference.train(hparams, DataRefs(demo_data / "train.csv", demo_data / "val.csv"), ctx)
    return f1, steps


def test_resumed_training_ends_where_an_uninterrupted_run_ends(demo_data: Path, tmp_path: Path):
    hp = {"hidden": 32, "lr": 0.003, "dropout": 0.2}  # dropout: the RNG must line up after a resume
    f1, steps = train_in_process(demo_data, tmp_path / "straight", hp, epochs=4)
    assert steps == [1, 2, 3, 4] and 0.0 < f1 <= 1.0
    train_in_process(demo_data, tmp_path / "resumed", hp, epochs=2)  # "dies" after its epoch-2 checkpoint
    f1_resumed, steps_resumed = train_in_process(demo_data, tmp_path / "resumed", hp, epochs=4)
    assert steps_resumed == [3, 4]
    assert f1_resumed == f1
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])


def test_a_trial_given_a_gpu_fails_loudly_when_torch_sees_none(demo_data: Path, tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    ctx = TrainContext(checkpoint_dir=tmp_path / "c", model_dir=tmp_path / "m", device="cuda", gpu_ids=(0,))
    with pytest.raises(RuntimeError, match=r"given GPU\(s\) \[0\] but torch .* sees no CUDA device"):
        torch_reference.train({}, DataRefs(demo_data / "train.csv", demo_data / "val.csv"), ctx)


def write_inputs(project: Project, name: str, combos: list[dict], epochs: int, sleep_s: float) -> list[str]:
    project.write("params/combinations.yaml", "combinations:\n" + "".join(f"  - {json.dumps(c)}\n" for c in combos))
    project.write("params/spec.yaml", SPEC.format(name=name, epochs=epochs, sleep_s=sleep_s))
    return ["run", "--combinations", "params/combinations.yaml", "--spec", "params/spec.yaml",
            "--train", "data/train.csv", "--val", "data/val.csv"]


@pytest.mark.slow
def test_torch_sweep_logs_real_f1_epoch_curves_and_system_metrics(served_project: Project, tmp_path: Path):
    project = served_project
    combos = [{"hidden": 4, "lr": 0.001}, {"hidden": 16, "lr": 0.003}, {"hidden": 64, "lr": 0.01},
              {"hidden": 64, "lr": 0.0003}]
    args = write_inputs(project, "torch-sweep", combos, epochs=3, sleep_s=0.5)
    result = project.hpsweep(*args, "--quota", "2", env={"HPSWEEP_SYSTEM_METRICS_S": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = leaderboard(project, "torch-sweep")["rows"]
    f1s = [r["f1"] for r in rows]
    assert all(r["status"] == "FINISHED" for r in rows)
    assert all(0.0 < f <= 1.0 for f in f1s) and len(set(f1s)) == 4, f1s  # real, and the hparams matter
    assert f1s[0] > 0.8 and f1s[-1] < 0.6, f1s  # a wide model with a good lr beats a starved one

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    for row in rows:
        run = client.get_run(row["run_id"])
        curve = client.get_metric_history(row["run_id"], "val_f1")
        assert sorted(m.step for m in curve) == [1, 2, 3]
        assert max(curve, key=lambda m: m.step).value == row["f1"]
        assert len(client.get_metric_history(row["run_id"], "epoch_s")) == 3
        cpu = client.get_metric_history(row["run_id"], "system/cpu_utilization_percentage")
        assert cpu and all(0.0 <= m.value <= 100.0 for m in cpu)  # sampled while the trial ran
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
        assert not any(k.startswith("system/gpu") for k in run.data.metrics)  # a CPU host: no GPU metrics
        assert run.data.tags["hpsweep.gpus"] == "cpu"

    # The champion is an MLflow pytorch model that loads and classifies digits on a CPU.
    import mlflow.pytorch

    champion = client.get_model_version_by_alias("torch-sweep", "champion")
    assert champion.run_id == rows[0]["run_id"]
    model = mlflow.pytorch.load_model(client.download_artifacts(champion.run_id, "model", str(tmp_path)))
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def trial_processes(root_pid: int) -> list[psutil.Process]:
    """The sweep's trial processes: its descendants that lead their own session (runner.py setsid())."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if os.getsid(p.pid) == p.pid:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def checkpoint_epoch(project: Project) -> int:
    paths = list((project.root / ".hpsweep").glob("trials/*/checkpoints/checkpoint.pt"))
    if not paths:
        return 0
    try:
        return int(torch.load(paths[0], weights_only=True)["epoch"])
    except Exception:  # replaced while we read it
        return 0


@pytest.mark.slow
def test_a_killed_torch_trial_resumes_from_its_checkpoint_to_the_same_f1(served_project: Project,
                                                                        demo_data: Path, tmp_path: Path):
    project = served_project
    hp = {"hidden": 32, "lr": 0.003, "dropout": 0.1}
    epochs = 6
    args = write_inputs(project, "torch-kill", [hp], epochs=epochs, sleep_s=0.6)
    proc = subprocess.Popen([sys.executable, "-m", "hpsweep.cli", *args, "--quota", "1", "--retry-delay-s", "0.2"],
                            cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while checkpoint_epoch(project) < 2:  # kill once two epochs are checkpointed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        victims = trial_processes(proc.pid)
        assert len(victims) == 1
        os.kill(victims[0].pid, signal.SIGKILL)
        killed_after = checkpoint_epoch(project)  # final: the retry starts after a delay and an epoch
        output = proc.communicate(timeout=400)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert killed_after < epochs  # it really died mid-run

    row = leaderboard(project, "torch-kill")["rows"][0]
    assert row["status"] == "FINISHED" and row["attempts"] == 2
    f1_straight, _ = train_in_process(demo_data, tmp_path / "straight", hp, epochs=epochs)
    assert row["f1"] == f1_straight  # same seed, same weights: resuming changed nothing

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    curve = client.get_metric_history(row["run_id"], "val_f1")
    assert {m.step for m in curve} == set(range(1, epochs + 1))
    log = Path(client.download_artifacts(row["run_id"], "trial.log", str(tmp_path)))
    assert f"resumed from epoch {killed_after}" in log.read_text()


def test_the_torch_trainer_logs_the_predictions_its_f1_comes_from(demo_data: Path, tmp_path: Path):
    from hpsweep.report.significance import f1_from_labels

    logged: list = []
    ctx = TrainContext(checkpoint_dir=tmp_path / "checkpoints", model_dir=tmp_path / "model",
                       settings={"epochs": 1, "seed": 0}, _predictions=lambda t, p: logged.append((t, p)))
    f1 = torch_reference.train({"hidden": 16}, DataRefs(demo_data / "train.csv", demo_data / "val.csv"), ctx)
    ((y_true, y_pred),) = logged
    assert len(y_true) == len(y_pred) > 0
    assert f1_from_labels(y_true, y_pred, "macro") == pytest.approx(f1, abs=1e-12)
