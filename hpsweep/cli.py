"""`hpsweep` command line. Exit codes (a public contract):

0  every trial has an F1
1  the sweep finished but some trials failed (the report is still written)
2  invalid input (nothing was written to MLflow or the report folder)
3  hpsweep itself failed (a bug or an unreachable service); the traceback is printed
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from hpsweep.config import SweepConfig, build_config
from hpsweep.gpus import host_gpus
from hpsweep.inputs import SweepInputError, SweepInputs, load_inputs
from hpsweep.progress import ProgressSink

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_INVALID_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
DEMO_DATA = Path("data")

console = Console(stderr=True)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    fields = SweepConfig.model_fields
    for name, typ in (("combinations", Path), ("spec", Path), ("train", Path), ("val", Path), ("quota", int),
                      ("name", str), ("report_dir", Path), ("work_dir", Path), ("tracking_uri", str),
                      ("max_attempts", int), ("retry_delay_s", float), ("launcher", str), ("pool", str),
                      ("trial_deployment", str), ("quota_limit", str)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, dest=name,
                            help=f"{fields[name].description} (default: params.yaml's sweep.{name}"
                                 f"{'' if fields[name].is_required() else f', else {fields[name].default}'})")
    parser.add_argument("--retrain", action="store_true", default=None,
                        help=f"{fields['retrain'].description} (default: reuse them)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="YAML whose `sweep:` section gives defaults for the flags above (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsweep", description="Train one model with every hyperparameter "
                                     "combination, under a GPU quota, and rank the results by F1.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep", description="Validate the inputs, train every combination "
                         "(at most quota / gpus-per-trial at once), write the leaderboard, register the best model.",
                         epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(run)
    demo = sub.add_parser("demo", help="prepare the digits data (if missing) and run the demo sweep from params.yaml")
    _run_flags(demo)
    prep = sub.add_parser("prepare", help="write the demo's train/validation split (scikit-learn digits)")
    prep.add_argument("--out", type=Path, default=DEMO_DATA, help="output folder (default: %(default)s)")
    return parser


class RichProgress(ProgressSink):
    """The terminal view: one live line with done / failed / running / ETA."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
        self._task = None

    def render(self) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self.summary(), total=self.total or None)
        self._progress.update(self._task, completed=self.done + self.failed, total=self.total,
                              description=self.summary())

    def close(self) -> None:
        if self._task is not None:
            self.render()
            self._progress.stop()


def _print_summary(result: dict[str, Any]) -> None:
    table = Table(title=f"Top trials of {result['sweep_id']}")
    table.add_column("rank", justify="right")
    table.add_column("hparams")
    table.add_column("F1", justify="right")
    table.add_column("status")
    for r in result["top"]:
        table.add_row(str(r["rank"]), " ".join(f"{k}={v}" for k, v in r["hparams"].items()),
                      "—" if r["f1"] is None else f"{r['f1']:.4f}", r["status"])
    out = Console()
    out.print(table)
    c = result["counts"]
    out.print(f"{c['total']} trials: {c['finished']} trained, {c['reused']} reused (already FINISHED), "
              f"{c['failed']} failed")
    out.print(f"report: {Path(result['report_dir']) / 'leaderboard.md'}")
    if result.get("champion"):
        out.print(f"champion: {result['champion']}")
    uri = result["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    out.print(f"MLflow UI: {ui}  (experiment {result['experiment_id']}, parent run {result['parent_run_id']})")


def _validated(args: argparse.Namespace) -> tuple[SweepConfig, SweepInputs]:
    """The config and inputs of `run`/`plan`, checked before anything starts (no Prefect, no MLflow,
    no report folder on bad input); raises SweepInputError listing every problem."""
    config = build_config({k: getattr(args, k) for k in SweepConfig.model_fields}, args.params)
    # Trials on this host cannot use more GPUs than it has (a CPU host, or a pool: no check).
    host = host_gpus() if config.launcher == "local" else ()
    inputs = load_inputs(config.combinations, config.spec, config.train, config.val, config.quota, host)
    if config.launcher == "pool":
        from hpsweep.pool import check_pool_limit

        check_pool_limit(config.pool, config.quota)
    return config, inputs


def _input_errors(e: SweepInputError) -> int:
    for problem in e.problems:
        console.print(f"[red]error:[/red] {escape(str(problem))}", highlight=False, soft_wrap=True)
    return EXIT_INVALID_INPUT


def _run(args: argparse.Namespace) -> int:
    try:
        config, _ = _validated(args)
    except SweepInputError as e:
        return _input_errors(e)

    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    logging.getLogger("hpsweep").setLevel(logging.INFO)
    # The embedded default starts Prefect's temporary API; its 20 s start-up budget is too
    # short on a busy 2-core machine (seen in CI), so give it two minutes unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from hpsweep import progress
    from flows.sweep import sweep

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)  # one line per trial comes from us
    progress.install(RichProgress())
    result = sweep(config)
    _print_summary(result)
    return EXIT_OK if result["counts"]["failed"] == 0 else EXIT_TRIALS_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from trainer.prepare import prepare

            train, val = prepare(args.out)
            console.print(f"wrote {train} and {val}")
            return EXIT_OK
        if args.command == "demo":
            if not (DEMO_DATA / "train.csv").exists() or not (DEMO_DATA / "val.csv").exists():
                from trainer.prepare import prepare

                prepare(DEMO_DATA)
        return _run(args)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume (finished trials are reused)")
        return 130
    except Exception:
        console.print("[red]hpsweep failed (not a problem with your inputs):[/red]")
        traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
