"""Early stopping on real learning curves: GPU-time, makespan under quota 4, best FINISHED F1, regret.

    python bench/early_stop_bench.py record      # once: the MLP reference trainer's curves → learning_curves.json
    python bench/early_stop_bench.py             # replay: none / median / asha, simulated (zero decision latency)
    python bench/early_stop_bench.py --real      # the same through `hpsweep run` with bench/replay_trainer.py

The simulation runs the rules (hpsweep.engine.early_stop) exactly as the sweep does, on a clock of
one unit per epoch: trials start in file order on 4 slots, each reported epoch is judged against
what the others reported by then, a stopped trial frees its slot at once. ``--real`` runs real
sweeps (epoch = --epoch-s seconds) and reads the numbers from their leaderboard.json and MLflow,
so it also pays hpsweep's decision latency (polls) and per-trial start-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpsweep.engine.early_stop import EarlyStopRule, StopTracker  # noqa: E402

CURVES = Path(__file__).with_name("learning_curves.json")
GRID = {"hidden": [16, 32, 64, 128], "lr": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03], "alpha": [0.0001, 0.01]}
EPOCHS = 27
QUOTA = 4


def combinations() -> list[dict]:
    return [{"hidden": h, "lr": lr, "alpha": a} for h in GRID["hidden"] for lr in GRID["lr"] for a in GRID["alpha"]]


def record(data: Path) -> None:
    """Train every combination with the reference trainer for EPOCHS epochs; keep its per-epoch val_f1."""
    from trainer.contract import DataRefs, TrainContext
    from trainer.prepare import prepare
    from trainer.reference import train

    if not (data / "train.csv").exists():
        prepare(data)
    curves = []
    for hp in combinations():
        with tempfile.TemporaryDirectory() as tmp:
            seen: list[float] = []
            ctx = TrainContext(Path(tmp) / "ckpt", Path(tmp) / "model", settings={"epochs": EPOCHS, "seed": 0},
                               _reporter=lambda step, m: seen.append(round(m["val_f1"], 5)))
            train(hp, DataRefs(data / "train.csv", data / "val.csv"), ctx)
        curves.append({"hparams": hp, "val_f1": seen})
        print(hp, seen[-1], flush=True)
    CURVES.write_text(json.dumps({"trainer": "trainer.reference:train (scikit-learn MLP, digits)",
                                  "epochs": EPOCHS, "curves": curves}) + "\n")


def rules(max_steps: int) -> dict[str, EarlyStopRule]:
    return {"none": EarlyStopRule("none"), "median": EarlyStopRule("median", min_steps=3),
            "asha": EarlyStopRule("asha", min_steps=2, reduction_factor=3, max_steps=max_steps)}


def simulate(curves: list[dict], rule: EarlyStopRule, slots: int = QUOTA) -> dict:
    tracker = StopTracker(rule)
    queue = list(range(len(curves)))
    running: dict[int, int] = {}  # trial → epochs reported
    histories: dict[int, list[tuple[int, float]]] = {}
    finished: dict[int, float] = {}
    gpu_time = clock = 0
    while queue or running:
        while queue and len(running) < slots:
            trial = queue.pop(0)
            running[trial], histories[trial] = 0, []
        clock += 1
        for trial in list(running):  # each running trial reports its next epoch
            running[trial] += 1
            gpu_time += 1
            epoch = running[trial]
            histories[trial].append((epoch, curves[trial]["val_f1"][epoch - 1]))
        for trial in sorted(running):
            epoch = running[trial]
            if tracker.decide([trial], histories):  # type: ignore[arg-type]
                del running[trial]
            elif epoch == len(curves[trial]["val_f1"]):
                finished[trial] = curves[trial]["val_f1"][-1]
                del running[trial]
    best = max(finished.values())
    return {"gpu_epochs": gpu_time, "makespan_epochs": clock, "best_finished_f1": best, "finished": len(finished)}


def table(results: dict[str, dict], unit: str) -> str:
    base = results["none"]
    lines = [f"| rule | GPU-time ({unit}) | share | makespan, quota {QUOTA} ({unit}) | best FINISHED F1 | regret |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['gpu']:.1f} | {r['gpu'] / base['gpu']:.0%} | {r['makespan']:.1f} | "
                     f"{r['best']:.4f} | {base['best'] - r['best']:.4f} |")
    return "\n".join(lines)


def real(curves: list[dict], epochs: int, epoch_s: float) -> dict[str, dict]:
    """Each rule as a real sweep (its own experiment) with the replay trainer; numbers from the report."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        for name in ("train.csv", "val.csv"):
            (root / "data" / name).write_text("x\n0\n")  # the replay trainer reads no data; validation wants a row
        (root / "combos.yaml").write_text("combinations:\n" + "".join(f"  - {json.dumps(c['hparams'])}\n"
                                                                        for c in curves))
        env = {"PYTHONPATH": str(REPO), "HPSWEEP_EARLY_STOP_POLL_S": str(epoch_s / 2),
               "HPSWEEP_STOP_POLL_S": str(epoch_s / 2), "HPSWEEP_SYSTEM_METRICS_S": "0"}
        import os

        for name, rule in rules(epochs).items():
            (root / "spec.yaml").write_text(f"name: bench-{name}\ntrainer: {{entrypoint: 'bench.replay_trainer:train'}}\n"
                                            f"settings: {{epochs: {epochs}, epoch_s: {epoch_s}}}\nresources: {{gpus: 1}}\n")
            flags = ["--early-stop", rule.rule, "--early-stop-min-steps", str(rule.min_steps)]
            started = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "hpsweep.cli", "run", "--combinations", "combos.yaml",
                                  "--spec", "spec.yaml", "--train", "data/train.csv", "--val", "data/val.csv",
                                  "--quota", str(QUOTA), "--no-register", *flags], cwd=root,
                                 env={**os.environ, **env}, capture_output=True, text=True)
            wall = time.monotonic() - started
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            board = json.loads((root / "reports" / f"bench-{name}" / "latest" / "leaderboard.json").read_text())
            done = [r for r in board["rows"] if r["status"] == "FINISHED"]
            starts = [r for r in board["rows"] if r["duration_s"]]
            results[name] = {"gpu": sum(r["duration_s"] for r in starts), "makespan": wall,
                             "best": max(r["f1"] for r in done)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="replay", choices=["replay", "record"])
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--real", action="store_true", help="run real sweeps instead of the simulation")
    parser.add_argument("--epoch-s", type=float, default=0.5, help="--real: seconds per replayed epoch")
    parser.add_argument("--seeds", type=int, default=0, help="also summarise N shuffled orders (seeds 0..N-1): "
                        "a sweep's real order depends on its trial keys, which hold the code and data versions")
    parser.add_argument("--seed", type=int, default=None, help="dispatch in a shuffled order (default: the grid's "
                        "order, small networks and low learning rates first: the hardest for asynchronous rules)")
    args = parser.parse_args()
    if args.command == "record":
        record(args.data)
        return
    doc = json.loads(CURVES.read_text())
    curves = doc["curves"]
    print(f"{len(curves)} combinations × {doc['epochs']} epochs of {doc['trainer']}; exhaustive best "
          f"{max(c['val_f1'][-1] for c in curves):.4f}")
    if args.real:  # the sweep orders the trials itself (shuffled when early stopping is on)
        print(table(real(curves, doc["epochs"], args.epoch_s), "s"))
        return
    orders = {"grid order (the file's; a sweep without early stopping)": curves,
              "hpsweep's order with early stopping (shuffled, seeded by the trial keys)": sweep_order(curves)}
    if args.seed is not None:
        import random

        orders = {f"shuffled, seed {args.seed}": random.Random(args.seed).sample(curves, len(curves))}
    for title, ordered in orders.items():
        results = {}
        for name, rule in rules(doc["epochs"]).items():
            r = simulate(ordered, rule)
            results[name] = {"gpu": r["gpu_epochs"], "makespan": r["makespan_epochs"], "best": r["best_finished_f1"]}
        print(f"\n{title}\n{table(results, 'epochs')}")
    if args.seeds:
        print(f"\n{args.seeds} shuffled orders (seeds 0–{args.seeds - 1})\n{seeds_table(curves, doc['epochs'], args.seeds)}")


def seeds_table(curves: list[dict], epochs: int, n: int) -> str:
    import random

    best = max(c["val_f1"][-1] for c in curves)
    lines = ["| rule | GPU-time share: min–max (mean) | regret 0 in | largest regret |", "|---|---|---:|---:|"]
    for name, rule in rules(epochs).items():
        shares, regrets = [], []
        for seed in range(n):
            r = simulate(random.Random(seed).sample(curves, len(curves)), rule)
            shares.append(r["gpu_epochs"] / (epochs * len(curves)))
            regrets.append(round(best - r["best_finished_f1"], 6))
        lines.append(f"| {name} | {min(shares):.0%}–{max(shares):.0%} ({sum(shares) / n:.0%}) | "
                     f"{sum(x == 0 for x in regrets)}/{n} | {max(regrets):.4f} |")
    return "\n".join(lines)


def sweep_order(curves: list[dict]) -> list[dict]:
    """The curves in the order an early-stopping sweep starts them (``hpsweep.plan.dispatch_order``)."""
    from hpsweep.inputs import canonical_json
    from hpsweep.plan import Estimate, PlannedTrial, dispatch_order

    trials = [PlannedTrial(i, c["hparams"], canonical_json(c["hparams"])) for i, c in enumerate(curves)]
    ordered, _, _ = dispatch_order(trials, [Estimate(None, "unknown")] * len(trials), early_stop=True)
    return [curves[t.index] for t in ordered]


if __name__ == "__main__":
    main()
