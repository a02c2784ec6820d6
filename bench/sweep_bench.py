"""The sweep benchmark suite (issue 7): does the scheduler keep every slot of the quota busy?

    .venv/bin/python bench/sweep_bench.py [--scenario S0|S1|S2|S3|all] [--launcher local|pool|both]
                                          [--order file|longest|both] [--repeat 3] [--plain]

Trials are ``bench.synthetic:train``: it sleeps for its ``duration_s`` hparam (lognormal, fixed
seed), so the 2 cores measure orchestration, not training. Every sweep goes through the real
``hpsweep run`` command (a fresh process; the local Prefect server, warm after the first sweep, or, for
``--launcher pool``, a real ``prefect server`` + process worker set up like ``bench/pool_overhead.py``)
with full bookkeeping:
MLflow runs on the embedded SQLite default (./mlflow.db + ./mlruns of a temporary project folder),
heartbeats, per-step metric, trial log, report. The reference is a thread pool calling the same
trainer function directly, with no orchestration.

- S1: 48 combinations, quota 4, mean 2 s. makespan, lower bound ``max(sum/quota, longest)``,
  efficiency = lower bound / makespan, peak concurrency (from the trainers' own timestamps).
- S2: 200 combinations, quota 8, mean 0.05 s. overhead per trial = (makespan × quota − Σ durations) / trials.
- S0: small sweeps, the whole command's wall time (issue 19): 1 trial (0.1 s) in a fresh folder with the
  local Prefect server cold (stopped first); its ``--retrain`` rerun with the server cold, then warm; 16
  trials rerun with every trial reused, the server warm, then cold.
- S3: 10,000 combinations: time to validate and plan (``hpsweep plan`` when it exists, else
  ``load_inputs`` + ``hpsweep.plan.plan_trials``), and to build the report (``write_report`` on 10,000 rows).

Makespan (the sweep's training phase) = the first trial's launch (its MLflow run created) → the
last trial's end (its F1 stored in MLflow). Also shown: the trainers' span (first trainer start →
last trainer end) and the whole command's wall time (Prefect start-up, planning, report included).
Each sweep is run ``--repeat`` times; the table shows medians. Raw numbers: bench/results/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.synthetic import durations, f1_of, train  # noqa: E402

RESULTS = REPO / "bench" / "results"
ENTRYPOINT = "bench.synthetic:train"


@dataclass(frozen=True)
class Scenario:
    name: str
    trials: int
    quota: int
    mean_s: float
    seed: int


SCENARIOS = {"S1": Scenario("S1", 48, 4, 2.0, 1), "S2": Scenario("S2", 200, 8, 0.05, 2)}
S3_TRIALS = 10_000
S0_REUSED_TRIALS = 16


# ---------------------------------------------------------------- inputs


def combinations(sc: Scenario) -> list[dict[str, Any]]:
    return [{"trial": i, "duration_s": d} for i, d in enumerate(durations(sc.trials, sc.mean_s, sc.seed), start=1)]


def longest_first(combos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(combos, key=lambda c: -c["duration_s"])


def lower_bound(combos: list[dict[str, Any]], quota: int) -> float:
    ds = [c["duration_s"] for c in combos]
    return max(sum(ds) / quota, max(ds))


def write_project(folder: Path, combos: list[dict[str, Any]], name: str, record: Path,
                  spec_extra: str = "") -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "train.csv").write_text("x,y\n0,0\n1,1\n")
    (folder / "data" / "val.csv").write_text("x,y\n0,0\n1,1\n")
    (folder / "combos.yaml").write_text("combinations:\n" + "".join(
        f"  - {{trial: {c['trial']}, duration_s: {c['duration_s']}}}\n" for c in combos))
    (folder / "spec.yaml").write_text(
        f"name: {name}\ntrainer: {{entrypoint: '{ENTRYPOINT}'}}\n"
        f"settings: {{record_path: '{record}'}}\nresources: {{gpus: 1}}\n{spec_extra}")


# ---------------------------------------------------------------- measures


def peak_concurrency(records: list[dict[str, Any]]) -> int:
    points = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records],
                    key=lambda p: (p[0], p[1]))
    live = peak = 0
    for _, d in points:
        live += d
        peak = max(peak, live)
    return peak


def measures(combos: list[dict[str, Any]], quota: int, records: list[dict[str, Any]], makespan: float,
             **extra: Any) -> dict[str, Any]:
    total = sum(c["duration_s"] for c in combos)
    lb = lower_bound(combos, quota)
    span = max(r["end"] for r in records) - min(r["start"] for r in records) if records else None
    return {"makespan_s": makespan, "lower_bound_s": lb, "efficiency": lb / makespan if makespan else None,
            "overhead_per_trial_s": (makespan * quota - total) / len(combos), "peak": peak_concurrency(records),
            "trainer_span_s": span, "trials_recorded": len(records), **extra}


# ---------------------------------------------------------------- the reference


def baseline(sc: Scenario, order: str) -> dict[str, Any]:
    """A thread pool of `quota` threads calling the trainer function directly, nothing else."""
    from trainer.contract import DataRefs, TrainContext

    combos = combinations(sc)
    queue = combos if order == "file" else longest_first(combos)
    tmp = Path(tempfile.mkdtemp(prefix="hpsweep-bench-base-"))
    record = tmp / "events.jsonl"
    ctx = TrainContext(checkpoint_dir=tmp, model_dir=tmp, settings={"record_path": str(record)})
    data = DataRefs(tmp, tmp)
    started = time.time()
    with ThreadPoolExecutor(sc.quota) as pool:
        f1s = list(pool.map(lambda c: train(c, data, ctx), queue))
    wall = time.time() - started
    assert f1s == [f1_of(c) for c in queue]
    records = _records(record)
    shutil.rmtree(tmp, ignore_errors=True)
    makespan = max(r["end"] for r in records) - min(r["start"] for r in records)
    return measures(combos, sc.quota, records, makespan, wall_s=wall)


# ---------------------------------------------------------------- hpsweep run


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def has_longest_first() -> bool:
    """Whether the sweep dispatches longest-first from durations it knows (hpsweep.plan)."""
    plan = REPO / "hpsweep" / "plan.py"
    return plan.is_file() and "def dispatch_order" in plan.read_text()


def run_sweep(sc: Scenario, launcher: str, order: str, env: dict[str, str], root: Path,
              pool: str | None = None, folder: Path | None = None) -> dict[str, Any]:
    """One `hpsweep run`; measures from the trainers' records and MLflow.

    ``order="file"``: a fresh project folder (no history: file order). ``order="longest"``: a
    ``--retrain`` rerun in ``folder``, where a file-order sweep ran before, so every trial's
    duration is known (measured) and the sweep dispatches longest-first.
    """
    from mlflow.tracking import MlflowClient

    combos = combinations(sc)
    name = f"bench-{sc.name.lower()}"
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix=f"{sc.name}-{launcher}-", dir=root))
        write_project(folder, combos, name, folder / "events.jsonl")
    record = folder / "events.jsonl"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "combos.yaml", "--spec", "spec.yaml",
           "--train", "data/train.csv", "--val", "data/val.csv", "--quota", str(sc.quota)]
    if order == "longest":
        cmd += ["--retrain"]
    if launcher == "pool":
        cmd += ["--launcher", "pool", "--pool", pool or "bench-gpu"]
    started = time.time()
    with (folder / f"hpsweep-{order}.log").open("wb") as log:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - started
    if proc.returncode not in (0, 1):  # 1: some trials failed; measured and flagged below
        raise RuntimeError(f"hpsweep run exited {proc.returncode}: see {folder}/hpsweep-{order}.log:\n"
                           + (folder / f"hpsweep-{order}.log").read_text()[-3000:])
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    parent = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    sweep_id = parent.data.tags["hpsweep.sweep_id"]
    dispatch = parent.data.tags.get("hpsweep.dispatch_order", "?")
    runs = client.search_runs([exp.experiment_id], f"tags.`hpsweep.role` = 'trial' and "
                              f"tags.`hpsweep.sweep_id` = '{sweep_id}'", max_results=50_000)
    f1_times = []
    for run in runs:
        hist = client.get_metric_history(run.info.run_id, "f1")
        if hist:
            f1_times.append(hist[-1].timestamp / 1000)
    launch = min(r.info.start_time for r in runs) / 1000
    end = max(f1_times) if f1_times else max(r.info.end_time for r in runs) / 1000
    records = _records(record)
    finished = sum(r.info.status == "FINISHED" and "f1" in r.data.metrics and "val_f1" in r.data.metrics
                   for r in runs)
    reports = folder / "reports" / name  # each sweep's own folder and `latest` (older checkouts: one folder)
    report = json.loads(((reports / "latest") if (reports / "latest").exists() else reports)
                        .joinpath("leaderboard.json").read_text())
    by_trial = {r["trial"]: r for r in records}
    starts = {int(json.loads(r.data.tags["hpsweep.hparams"])["trial"]): r.info.start_time / 1000 for r in runs}
    to_train = [by_trial[t]["start"] - s for t, s in starts.items() if t in by_trial]
    result = measures(combos, sc.quota, records, end - launch, wall_s=wall, runs=len(runs), finished=finished,
                      report_rows=len(report["rows"]), dispatch=dispatch,
                      launch_to_trainer_median_s=statistics.median(to_train) if to_train else None,
                      folder=str(folder))
    result["complete"] = finished == sc.trials == len(report["rows"]) == len(records) and proc.returncode == 0
    if not result["complete"]:
        print(f"INCOMPLETE sweep in {folder}: exit {proc.returncode}, {finished} finished runs with f1 and val_f1, "
              f"{len(report['rows'])} report rows, {len(records)} trainer records", file=sys.stderr)
    return result


def sweep_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_UI_ENABLED": "false"}


class PoolServer:
    """A prefect server + process work pool (limit = quota) + train-trial deployment + one worker."""

    def __init__(self, root: Path, limit: int, poll_s: float = 1.0):
        from tests.conftest import free_port, wait_http

        self.root, self.limit = root, limit
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {**sweep_env(root), "PREFECT_API_URL": self.api}
        self.server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env=self.env, stdout=(root / "server.log").open("wb"),
                                       stderr=subprocess.STDOUT)
        self.worker = None
        wait_http(f"{self.api}/health", 180, self.server, root / "server.log")
        self._prefect("work-pool", "create", "bench-gpu", "--type", "process")
        self._prefect("work-pool", "set-concurrency-limit", "bench-gpu", str(limit))
        self._prefect("work-pool", "create", "bench-cpu", "--type", "process")
        self._prefect("--no-prompt", "deploy", "--all", HPSWEEP_HOME=str(REPO), HPSWEEP_GPU_POOL="bench-gpu",
                      HPSWEEP_CPU_POOL="bench-cpu")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench-gpu", "--type", "process"],
            cwd=REPO, stdout=(root / "worker.log").open("wb"), stderr=subprocess.STDOUT,
            env={**self.env, "PREFECT_WORKER_QUERY_SECONDS": str(poll_s),
                 "PREFECT_WORKER_PREFETCH_SECONDS": str(poll_s)})

    def _prefect(self, *a: str, **env: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *a], env={**self.env, **env}, cwd=REPO, check=True,
                       capture_output=True)

    def set_limit(self, limit: int) -> None:
        self._prefect("work-pool", "set-concurrency-limit", "bench-gpu", str(limit))
        self.limit = limit

    def close(self) -> None:
        from tests.conftest import stop

        if self.worker is not None:
            stop(self.worker)
        stop(self.server)


# ---------------------------------------------------------------- S0


def _command_s(folder: Path, args: list[str], env: dict[str, str], log_name: str) -> float:
    """One hpsweep command's wall time (it must succeed)."""
    started = time.time()
    with (folder / f"{log_name}.log").open("wb") as log:
        proc = subprocess.run([sys.executable, "-m", "hpsweep.cli", *args], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"hpsweep {args[0]} exited {proc.returncode}: see {folder}/{log_name}.log:\n"
                           + (folder / f"{log_name}.log").read_text()[-3000:])
    return wall


def stop_local_server(env: dict[str, str]) -> None:
    """`hpsweep server stop --force` (the embedded default's warm Prefect server; a no-op before issue 19)."""
    subprocess.run([sys.executable, "-m", "hpsweep.cli", "server", "stop", "--force"], env=env, cwd=REPO,
                   capture_output=True)


def scenario_s0(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Small sweeps' whole command, with the local Prefect server cold and warm (its UI on, as a user has it)."""
    env = {k: v for k, v in env.items() if k != "PREFECT_SERVER_UI_ENABLED"}
    one = Path(tempfile.mkdtemp(prefix="S0-1-", dir=root))
    write_project(one, [{"trial": 1, "duration_s": 0.1}], "bench-s0-one", one / "events.jsonl")
    many = Path(tempfile.mkdtemp(prefix="S0-16-", dir=root))
    write_project(many, [{"trial": i, "duration_s": 0.1} for i in range(1, S0_REUSED_TRIALS + 1)], "bench-s0-many",
                  many / "events.jsonl")
    run = ["run", "--combinations", "combos.yaml", "--spec", "spec.yaml", "--train", "data/train.csv",
           "--val", "data/val.csv", "--quota", "4"]
    out: dict[str, Any] = {}
    stop_local_server(env)
    out["one_fresh_cold_s"] = _command_s(one, run, env, "fresh-cold")  # also creates the MLflow store
    stop_local_server(env)
    out["one_rerun_cold_s"] = _command_s(one, [*run, "--retrain"], env, "rerun-cold")
    out["one_rerun_warm_s"] = _command_s(one, [*run, "--retrain"], env, "rerun-warm")
    _command_s(many, run, env, "train")
    out["reused_warm_s"] = _command_s(many, run, env, "reused-warm")
    stop_local_server(env)
    out["reused_cold_s"] = _command_s(many, run, env, "reused-cold")
    return out


S0_ROWS = (("1 trial, fresh folder, server cold", "one_fresh_cold_s"),
           ("1 trial --retrain rerun, server cold", "one_rerun_cold_s"),
           ("1 trial --retrain rerun, server warm", "one_rerun_warm_s"),
           (f"{S0_REUSED_TRIALS} trials all reused, server warm", "reused_warm_s"),
           (f"{S0_REUSED_TRIALS} trials all reused, server cold", "reused_cold_s"))


# ---------------------------------------------------------------- S3


def _python_json(code: str, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (its own imports, as a command would pay) and read its last line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenario_s3(root: Path) -> dict[str, Any]:
    """Validate + plan, and the report, for 10,000 combinations."""
    folder = root / "S3"
    combos = [{"trial": i, "duration_s": d} for i, d in enumerate(durations(S3_TRIALS, 60.0, 3), start=1)]
    write_project(folder, combos, "bench-s3", folder / "events.jsonl", "expected_duration_s: 60\n")
    out: dict[str, Any] = {"trials": S3_TRIALS}
    env = sweep_env(root)
    if _has_plan_command():
        cmd = [sys.executable, "-m", "hpsweep.cli", "plan", "--combinations", "combos.yaml", "--spec", "spec.yaml",
               "--train", "data/train.csv", "--val", "data/val.csv", "--quota", "8"]
        started = time.time()
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
        out["plan_cmd_s"] = time.time() - started
        out["plan_cmd_rc"] = proc.returncode
        if proc.returncode not in (0, 1):
            out["plan_cmd_error"] = (proc.stdout + proc.stderr)[-2000:]
    # In-process, the same functions `hpsweep run` calls before it launches anything.
    code = (
        "import time, json, sys; from pathlib import Path; t0 = time.time()\n"
        "from hpsweep.inputs import load_inputs; from hpsweep.plan import plan_trials; t1 = time.time()\n"
        "inputs = load_inputs(Path('combos.yaml'), Path('spec.yaml'), Path('data/train.csv'), "
        "Path('data/val.csv'), 8); t2 = time.time()\n"
        "trials, versions = plan_trials(inputs); t3 = time.time()\n"
        "assert len(trials) == %d\n"
        "print(json.dumps({'import_s': t1 - t0, 'validate_s': t2 - t1, 'plan_s': t3 - t2}))\n" % S3_TRIALS
    )
    inproc = _python_json(code, folder, env)
    out.update({f"validate_plan_{k}": v for k, v in inproc.items()})
    out["validate_plan_s"] = inproc["validate_s"] + inproc["plan_s"]
    code = (
        "import time, json, random; from pathlib import Path\n"
        "from hpsweep.model import TrialRow, TrialState\n"
        "from hpsweep.report.leaderboard import rank_rows, write_report\n"
        "rng = random.Random(4); rows = []\n"
        "for i in range(1, %d + 1):\n"
        "    ok = i %% 50 != 0\n"
        "    rows.append(TrialRow(run_id=f'{i:032x}', run_name=f'trial={i}', state=TrialState.FINISHED if ok else TrialState.FAILED,\n"
        "                         hparams={'trial': i, 'lr': round(rng.uniform(1e-4, 1e-1), 5), 'hidden': rng.choice([32, 64, 128])},\n"
        "                         f1=round(rng.random(), 4) if ok else None, reason=None if ok else 'boom',\n"
        "                         index=i, attempt=1, key=f'k{i}', duration_s=1.0))\n"
        "meta = {'sweep_id': 'bench-s3', 'name': 'bench-s3', 'experiment_id': '1', 'parent_run_id': 'p',\n"
        "        'tracking_uri': 'sqlite:///x', 'spec_hash': 's', 'data_version': 'd', 'git_commit': 'g', 'quota': 8,\n"
        "        'champion': None}\n"
        "t0 = time.time(); ranked = rank_rows(rows); t1 = time.time()\n"
        "write_report(Path('report'), meta, ranked); t2 = time.time()\n"
        "print(json.dumps({'rank_s': t1 - t0, 'write_s': t2 - t1}))\n" % S3_TRIALS
    )
    rep = _python_json(code, folder, env)
    out.update({"report_rank_s": rep["rank_s"], "report_write_s": rep["write_s"],
                "report_s": rep["rank_s"] + rep["write_s"]})
    return out


def _has_plan_command() -> bool:
    return (REPO / "hpsweep" / "plan.py").is_file() and '"plan"' in (REPO / "hpsweep" / "cli.py").read_text()


# ---------------------------------------------------------------- table


def _median(reps: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in reps if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for label, key in S0_ROWS if results.get("S0") else ():
        reps = results["S0"]
        rows.append(("S0", label, "command wall time", _fmt(_median(reps, key), " s"),
                     "/".join(_fmt(r.get(key), " s", 1) for r in reps), f"{len(reps)}×"))
    for key, reps in results.items():
        if key in ("S0", "S3") or not reps:
            continue
        sc, what = key.split(" ", 1)
        n = f"{len(reps)}×"
        bad = sum(not r.get("complete", True) for r in reps)
        if bad:
            n += f" ({bad} INCOMPLETE: trials failed)"
        if sc == "S1":
            peaks = "/".join(str(r["peak"]) for r in reps)
            rows.append((sc, what, "efficiency (LB / makespan)", _fmt(_median(reps, "efficiency"), digits=3),
                         f"makespan {_fmt(_median(reps, 'makespan_s'), ' s')} vs LB "
                         f"{_fmt(_median(reps, 'lower_bound_s'), ' s')}; peak {peaks} of {SCENARIOS['S1'].quota}; "
                         f"wall {_fmt(_median(reps, 'wall_s'), ' s', 1)}{_latency(reps)}"
                         + (f"; dispatch {reps[-1]['dispatch']}" if "dispatch" in reps[-1] else ""), n))
        else:
            rows.append((sc, what, "overhead per trial", _fmt(_median(reps, "overhead_per_trial_s"), " s", 3),
                         f"makespan {_fmt(_median(reps, 'makespan_s'), ' s')} vs LB "
                         f"{_fmt(_median(reps, 'lower_bound_s'), ' s')}; efficiency "
                         f"{_fmt(_median(reps, 'efficiency'), digits=3)}; peak "
                         f"{'/'.join(str(r['peak']) for r in reps)} of {SCENARIOS['S2'].quota}; wall "
                         f"{_fmt(_median(reps, 'wall_s'), ' s', 1)}{_latency(reps)}", n))
    s3 = results.get("S3")
    if s3:
        n = f"{len(s3)}×"
        detail = (f"load_inputs {_fmt(_median(s3, 'validate_plan_validate_s'), ' s')} + plan_trials "
                  f"{_fmt(_median(s3, 'validate_plan_plan_s'), ' s')} (imports "
                  f"{_fmt(_median(s3, 'validate_plan_import_s'), ' s')} apart)")
        if _median(s3, "plan_cmd_s") is not None:
            rows.append(("S3", "hpsweep plan (10,000)", "command wall time", _fmt(_median(s3, "plan_cmd_s"), " s"),
                         f"exit {'/'.join(str(r.get('plan_cmd_rc')) for r in s3)}", n))
        rows.append(("S3", "validate + plan (10,000)", "time", _fmt(_median(s3, "validate_plan_s"), " s"),
                     detail, n))
        rows.append(("S3", "report (10,000 rows)", "time", _fmt(_median(s3, "report_s"), " s"),
                     f"rank_rows {_fmt(_median(s3, 'report_rank_s'), ' s', 3)} + write_report "
                     f"{_fmt(_median(s3, 'report_write_s'), ' s')}", n))
    return rows


def _latency(reps: list[dict[str, Any]]) -> str:
    v = _median(reps, "launch_to_trainer_median_s")
    return "" if v is None else f"; launch→trainer start {v:.2f} s"


def print_table(results: dict[str, Any], plain: bool) -> None:
    rows = table_rows(results)
    head = ("scenario", "run", "measure", "median", "detail", "runs")
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table(title="hpsweep sweep benchmark (medians)")
            for h in head:
                t.add_column(h, justify="right" if h == "median" else "left")
            for r in rows:
                t.add_row(*r)
            Console().print(t)
            return
        except ImportError:
            pass
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["S0", "S1", "S2", "S3", "all"], default="all")
    ap.add_argument("--launcher", choices=["local", "pool", "both"], default="local")
    ap.add_argument("--order", choices=["file", "longest", "both"], default="both",
                    help="dispatch order for S1: file order, or longest-first from known durations (skipped "
                         "until the sweep supports it)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the table shows medians")
    ap.add_argument("--no-baseline", action="store_true", help="skip the thread-pool reference")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project folders")
    ap.add_argument("--plain", action="store_true", help="a plain-text table instead of rich")
    args = ap.parse_args()

    names = ["S0", "S1", "S2", "S3"] if args.scenario == "all" else [args.scenario]
    launchers = ["local", "pool"] if args.launcher == "both" else [args.launcher]
    orders = ["file", "longest"] if args.order == "both" else [args.order]
    if "longest" in orders and not has_longest_first():
        print("note: this sweep has no longest-first dispatch: S1 longest-first is measured for the baseline only",
              file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="hpsweep-bench-"))
    results: dict[str, list[dict[str, Any]]] = {}
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(), "git": _git_head(), "args": vars(args)}
    pool_server: PoolServer | None = None
    try:
        for name in names:
            if name == "S0":
                results["S0"] = [scenario_s0(root, sweep_env(root)) for _ in range(args.repeat)]
                _progress(results, "S0")
                continue
            if name == "S3":
                results["S3"] = [scenario_s3(root) for _ in range(args.repeat)]
                _progress(results, "S3")
                continue
            sc = SCENARIOS[name]
            sc_orders = orders if name == "S1" else ["file"]
            if "file" not in sc_orders:
                sc_orders = ["file", *sc_orders]  # the longest-first rerun learns its durations from it
            if not args.no_baseline:
                for order in sc_orders:
                    key = f"{name} baseline thread pool, {order} order"
                    results[key] = [baseline(sc, order) for _ in range(args.repeat)]
                    _progress(results, key)
            for launcher in launchers:
                env = sweep_env(root)
                if launcher == "pool":
                    if pool_server is None:
                        pool_server = PoolServer(root, sc.quota)
                    elif pool_server.limit != sc.quota:
                        pool_server.set_limit(sc.quota)
                    env = pool_server.env
                keys = {o: f"{name} hpsweep {launcher}, {o} order" for o in sc_orders}
                for key in keys.values():
                    results[key] = []
                for _ in range(args.repeat):
                    file_run = run_sweep(sc, launcher, "file", env, root)
                    results[keys["file"]].append(file_run)
                    _progress(results, keys["file"])
                    if "longest" in keys and has_longest_first():
                        # a --retrain rerun of the same sweep: every duration is now known
                        results[keys["longest"]].append(
                            run_sweep(sc, launcher, "longest", env, root, folder=Path(file_run["folder"])))
                        _progress(results, keys["longest"])
                if "longest" in keys and not results[keys["longest"]]:
                    del results[keys["longest"]]
    finally:
        if pool_server is not None:
            pool_server.close()
        stop_local_server(sweep_env(root))  # the local sweeps' warm Prefect server
        meta["load_avg_at_end"] = os.getloadavg()
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.scenario}-{args.launcher}.json"
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results, args.plain)
    print(f"raw numbers: {out.relative_to(REPO)}; load average {meta['load_avg_at_start'][0]:.1f} → "
          f"{meta['load_avg_at_end'][0]:.1f} on {meta['cpus']} CPUs")
    return 0


def _progress(results: dict[str, Any], key: str) -> None:
    r = results[key][-1]
    brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "folder"}
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {brief}", file=sys.stderr, flush=True)


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
