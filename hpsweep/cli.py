"""`hpsweep` command line. Exit codes (a public contract):

0  every trial has an F1
1  the sweep finished but some trials failed (the report is still written)
2  invalid input (nothing was written to MLflow or the report folder)
3  hpsweep itself failed (a bug or an unreachable service); the traceback is printed
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from hpsweep.config import SweepConfig, build_config, check_tie_break, early_stop_rule, read_params
from hpsweep.engine.gpus import host_gpus
from hpsweep.inputs import Problem, SweepInputError, SweepInputs, load_inputs, resolved_interpreter
from hpsweep.limits import cut_at_word
from hpsweep.plan import DEFAULT_PRICE_PER_GPU_HOUR, DEFAULT_SPOT_PRICE_PER_GPU_HOUR
from hpsweep.engine.callbacks import SweepCallback
from hpsweep.model import AttemptResult, PlannedTrial, TrialRow

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_INVALID_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# `plan`, `status` and `report` wait this long for a tracking store that does not answer (a sweep: 15 min).
COMMAND_PATIENCE_S = 60.0
SWEEP_FLOW = "flows.sweep:sweep"  # the flow `hpsweep run` runs (prefect.yaml deploys the same one)
DEMO_DATA = Path("data")

# soft_wrap: a long line stays one line (a terminal wraps it itself; a CI log keeps it whole).
console = Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    """Where results go. Not a terminal (CI logs, `| tee`): full lines, since Rich would otherwise
    lay tables and lines out for 80 columns."""
    out = Console(soft_wrap=True)
    if not out.is_terminal:
        out.width = 10_000  # tables are sized to their content; only a wider one wraps
    return out


def _log_handler() -> logging.Handler:
    """Rich's columns on a terminal; elsewhere one plain line per record, never wrapped."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    return handler


def _run_flags(parser: argparse.ArgumentParser) -> None:
    fields = SweepConfig.model_fields
    for name, typ in (("combinations", Path), ("spec", Path), ("train", Path), ("val", Path), ("quota", int),
                      ("name", str), ("report_dir", Path), ("work_dir", Path), ("tracking_uri", str),
                      ("max_attempts", int), ("retry_delay_s", float), ("launcher", str), ("pool", str),
                      ("trial_deployment", str), ("quota_limit", str), ("grace_s", float),
                      ("max_failures", int), ("early_stop", str), ("early_stop_metric", str),
                      ("early_stop_min_steps", int), ("early_stop_reduction_factor", int),
                      ("early_stop_max_steps", int), ("early_stop_grace_s", float),
                      ("tie_break", str)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, dest=name,
                            help=f"{fields[name].description} (default: params.yaml's sweep.{name}"
                                 f"{'' if fields[name].is_required() else f', else {fields[name].default}'})")
    parser.add_argument("--retrain", action="store_true", default=None,
                        help=f"{fields['retrain'].description} (default: reuse them)")
    parser.add_argument("--no-register", action="store_false", default=None, dest="register",
                        help="leave the model registry alone: do not register the best model nor move "
                             "@champion (default: params.yaml's sweep.register, else register)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="YAML whose `sweep:` section gives defaults for the flags above (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsweep", description="Train one model with every hyperparameter "
                                     "combination, under a GPU quota, and rank the results by F1.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hpsweep {_version()}")
    sub = parser.add_subparsers(dest="command")  # none: the help
    run = sub.add_parser("run", help="run a sweep", description="Validate the inputs, train every combination "
                         "(at most quota / gpus-per-trial at once), write the leaderboard, register the best model.",
                         epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(run)
    demo = sub.add_parser("demo", help="prepare the digits data (if missing) and run the demo sweep from params.yaml")
    _run_flags(demo)
    plan = sub.add_parser("plan", help="what `run` would do and cost, without starting anything",
                          description="Validate like `run` (same flags, same errors, exit 2), then show how many "
                          "trials would train and how many are reused, the GPU-hours, the makespan under the quota "
                          "(longest first) and the cost on demand and on spot. Durations come from earlier trials "
                          "of the same experiment (same hparams and spec: measured; else their median) or the "
                          "spec's expected_duration_s. Starts no trial and writes nothing.",
                          epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(plan)
    plan.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, dest="price",
                      help="on-demand $ per GPU-hour (default: %(default)s, a g5.xlarge's assumed list price)")
    plan.add_argument("--spot-price-per-gpu-hour", type=float, default=DEFAULT_SPOT_PRICE_PER_GPU_HOUR,
                      dest="spot_price", help="spot $ per GPU-hour (default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (for machines)")
    listing = sub.add_parser("list", help="past sweeps, newest first: id, start, trials, finished/failed/reused, "
                             "best F1, champion (from MLflow)")
    listing.add_argument("name", nargs="?", default=None, metavar="NAME", help="only the sweeps of this name")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default: %(default)s)")
    listing.add_argument("--json", action="store_true", help="print the rows as JSON (for machines)")
    listing.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: params.yaml's "
                         "sweep.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    listing.add_argument("--params", type=Path, default=Path("params.yaml"),
                         help="YAML whose `sweep:` section gives the tracking URI (default: %(default)s)")
    for command, text in (("status", "what a sweep is doing: running, queued, done, failed, ETA (from MLflow, "
                                     "and Prefect: PREFECT_API_URL's, or the local server)"),
                          ("report", "write the report of a past (or running) sweep again, from MLflow")):
        cmd = sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("sweep", nargs="?", default=None, metavar="SWEEP",
                         help="a sweep name (its latest execution) or a sweep id (default: params.yaml's sweep.name)")
        cmd.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: params.yaml's "
                         "sweep.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db)")
        cmd.add_argument("--params", type=Path, default=Path("params.yaml"),
                         help="YAML whose `sweep:` section gives the defaults (default: %(default)s)")
        if command == "report":
            cmd.add_argument("--report-dir", type=Path, default=None, help="where to write it, exactly (default: "
                             "params.yaml's sweep.report_dir for its sweep, else reports/<name>/<sweep id>, "
                             "and reports/<name>/latest then shows it if it is the newest sweep of its name)")
        else:
            cmd.add_argument("--json", action="store_true", help="print the status as JSON (for machines)")
    prep = sub.add_parser("prepare", help="write the demo's train/validation split (scikit-learn digits)")
    prep.add_argument("--out", type=Path, default=DEMO_DATA, help="output folder (default: %(default)s)")
    quota = sub.add_parser("quota", help="show or set the GPU quota every sweep on this Prefect shares",
                           description="Show the Prefect concurrency limit that holds the GPU quota, its slots in "
                           "use and which sweeps hold them; with N, set it to N slots (and activate it). The first "
                           "sweep creates it from its --quota; later sweeps never change it. Without "
                           "PREFECT_API_URL it lives in Prefect's local database (PREFECT_HOME), reached through "
                           "the local Prefect server, as for `run` (`hpsweep server`).")
    quota.add_argument("size", nargs="?", type=int, default=None, metavar="N", help="set the limit to N slots")
    quota.add_argument("--force", action="store_true", help="set N even below the slots in use")
    quota.add_argument("--limit-name", default=None, dest="quota_limit", help="the limit's name (default: "
                       "params.yaml's sweep.quota_limit, else hpsweep-gpus)")
    quota.add_argument("--params", type=Path, default=Path("params.yaml"),
                       help="YAML whose `sweep:` section gives the default name (default: %(default)s)")
    server = sub.add_parser("server", help="the local Prefect server sweeps share without PREFECT_API_URL: "
                            "status, start, stop",
                            description="Without PREFECT_API_URL the first sweep (or `hpsweep quota`) starts a "
                            "local Prefect server on PREFECT_HOME's database, in its own session on loopback, and "
                            "later sweeps, `status`, `quota` and the Prefect UI share it. It stops by itself once "
                            "no sweep has used it for $HPSWEEP_SERVER_IDLE_S seconds (default 1800), "
                            "even if every sweep was killed.")
    server.add_argument("action", choices=("status", "start", "stop"), help="status: where it runs and whether it "
                        "is in use; start: start it now (to open its UI); stop: stop it now")
    server.add_argument("--force", action="store_true", help="stop it even while a sweep uses it (that sweep fails)")
    return parser


class RichProgress(SweepCallback):
    """The terminal view of a running sweep: one live line with ended / finished / failed / running / ETA.
    Not on a terminal (``live=False``): that line printed plainly each time a trial ends."""

    def __init__(self, live: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._live = live
        self._progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
        self._lock = threading.Lock()
        self._task = None
        self.total = self.parallel = self.done = self.failed = self.stopped = self.interrupted = self.running = 0
        self._durations: list[float] = []

    def on_sweep_start(self, total: int, parallel: int) -> None:
        with self._lock:
            self.total, self.parallel = total, parallel
        self._render()

    def on_trial_start(self, trial: PlannedTrial) -> None:
        with self._lock:
            self.running += 1
        self._render()

    def on_trial_end(self, trial: PlannedTrial, attempts: int, result: AttemptResult) -> None:
        with self._lock:
            self.running -= 1
            self.done += result.outcome.ok
            self.stopped += result.outcome.stopped  # the early-stopping rule's call, not a failure
            self.interrupted += result.outcome.interrupted  # Ctrl-C's, not the trial's: a rerun trains it
            self.failed += not (result.outcome.ok or result.outcome.stopped or result.outcome.interrupted)
            self._durations.append(result.outcome.duration_s)
        if not self._live:
            console.print(f"sweep {self.summary()}", markup=False, highlight=False)
        self._render()

    def on_sweep_end(self) -> None:
        if self._task is not None:  # only set when live
            self._render()
            self._progress.stop()

    def summary(self) -> str:
        """Remaining trials × mean duration / slots is the ETA (unknown until one trial has ended)."""
        with self._lock:
            ended = self.done + self.failed + self.stopped + self.interrupted
            eta = ((self.total - ended) * sum(self._durations) / len(self._durations) / max(1, self.parallel)
                   if self._durations else None)
            others = (f"{self.stopped} stopped early · " if self.stopped else "") + \
                     (f"{self.interrupted} interrupted · " if self.interrupted else "")
            return (f"{ended}/{self.total} ended · {self.done} finished · {self.failed} failed · {others}"
                    f"{self.running} running · ETA {'?' if eta is None else f'{eta:.0f}s'}")

    def _render(self) -> None:
        if not self._live:
            return
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self.summary(), total=self.total or None)
        self._progress.update(self._task, completed=self.done + self.failed + self.stopped + self.interrupted,
                              total=self.total,
                              description=self.summary())


def _print_summary(result: dict[str, Any]) -> None:
    """Print a sweep's summary (``hpsweep.report.assemble.sweep_summary``): its top trials, counts and files."""
    out = stdout_console()
    if not result["top"]:  # every trial failed, was stopped or never started: nothing to rank
        out.print(f"No trial of {result['sweep_id']} has an F1: nothing to rank.", markup=False, highlight=False)
    else:
        out.print(_top_table(result))
    if result.get("tie_note"):  # the leaderboard's order among the top is noise: say so first
        out.print(result["tie_note"], markup=False, highlight=False)
    c = result["counts"]
    stopped = f"{c['stopped']} stopped early (a rerun resumes them), " if c.get("stopped") else ""
    out.print(f"{c['total']} trials: {c['finished']} trained, {c['reused']} reused (already FINISHED), {stopped}"
              f"{c['failed']} failed{' or interrupted' if result.get('interrupted') else ''}")
    if result.get("gpu_hours_saved") is not None:
        out.print(f"GPU-hours: {result['gpu_hours_used']:.3f} used, {result['gpu_hours_saved']:.3f} saved by early "
                  "stopping (estimated)")
    for failure in result.get("failure_reasons", [])[:5]:  # a reason shared by many trials: once, with its count
        out.print(f"  {failure['trials']}× {cut_at_word(failure['reason'], 300)}", markup=False, highlight=False)
    report = Path(result["report_dir"]) / "leaderboard.md"
    latest = f" (also {result['latest']}{os.sep})" if result.get("latest") else ""
    out.print(f"report: {report}{latest}" if report.is_file() else f"report: not written to {result['report_dir']} "
              "(see the warning above); leaderboard.json is on the parent run in MLflow")
    if result.get("champion") or result.get("champion_note"):
        moved = "moved by this sweep" if result.get("champion_moved") else "not moved by this sweep"
        out.print(f"champion: {result.get('champion') or 'none'}, {moved}", markup=False, highlight=False)
    if result.get("champion_note"):
        out.print(result["champion_note"], markup=False, highlight=False)
    if result.get("champion_rule") and result["champion_rule"] != "highest F1":
        out.print(f"champion picked by: {result['champion_rule']}", markup=False, highlight=False)
    from hpsweep.store.uri import is_tracking_server, ui_url

    uri = result["tracking_uri"]
    # The runs table with the f1 column: MLflow 3.17's UI opens an experiment on its GenAI pages otherwise.
    url = ui_url(uri, result["experiment_id"])
    start = "" if is_tracking_server(uri) else f"mlflow ui --backend-store-uri {uri}, then open "
    out.print(f"MLflow UI: {start}{url}  (parent run {result['parent_run_id']})", markup=False, highlight=False)


def _top_table(result: dict[str, Any]) -> Table:
    """The summary's ranked trials (those with an F1), with their 95% intervals when known."""
    from hpsweep.report.leaderboard import interval_text  # pandas: not at `hpsweep --help`

    table = Table(title=f"Top trials of {result['sweep_id']}")
    table.add_column("rank", justify="right")
    table.add_column("hparams")
    table.add_column("F1", justify="right")
    intervals = any(r.get("f1_ci_low") is not None for r in result["top"])
    if intervals:
        table.add_column("95% CI", justify="right")
    table.add_column("status")
    for r in result["top"]:
        ci = [interval_text(r["f1_ci_low"], r["f1_ci_high"]) if r.get("f1_ci_low") is not None else ""]
        table.add_row(str(r["rank"]), " ".join(f"{k}={v}" for k, v in r["hparams"].items()),
                      "—" if r["f1"] is None else f"{r['f1']:.4f}", *(ci if intervals else []), r["status"])
    return table


def _validated(args: argparse.Namespace) -> tuple[SweepConfig, SweepInputs]:
    """The config and inputs of `run`/`plan`, checked before anything starts (no Prefect, no MLflow,
    no report folder on bad input); raises SweepInputError listing every problem."""
    config = build_config({k: getattr(args, k) for k in SweepConfig.model_fields}, args.params)
    # Credentials in a tracking URI go to the environment before the config reaches Prefect (a parameter).
    if config.tracking_uri and "@" in config.tracking_uri:
        from hpsweep.store.uri import credentials_to_environment

        config = config.model_copy(update={"tracking_uri": credentials_to_environment(config.tracking_uri)})
    # Trials on this host cannot use more GPUs than it has (a CPU host, or a pool: no check).
    host = host_gpus() if config.launcher == "local" else ()
    inputs = load_inputs(config.combinations, config.spec, config.train, config.val, config.quota, host)
    check_tie_break(config, inputs)
    if config.launcher == "pool":
        from hpsweep.engine.pool import check_pool_limit

        check_pool_limit(config.pool, config.quota)
    return config, inputs


def _input_errors(e: SweepInputError) -> int:
    for problem in e.problems:
        console.print(f"[red]error:[/red] {escape(str(problem))}", highlight=False)
    return EXIT_INVALID_INPUT


def _run(args: argparse.Namespace) -> int:
    try:
        config, inputs = _validated(args)
    except SweepInputError as e:
        return _input_errors(e)
    if config.launcher == "local":
        # Preloading the trials' fork server takes seconds: now, before this process imports MLflow
        # and Prefect; it opens the tracking store once this process has checked it (below).
        from hpsweep.runtime.forkserver import start_fork_server

        entry_module = (inputs.spec.trainer.entrypoint or "").partition(":")[0]
        start_fork_server([entry_module] if entry_module else [], uri_later=True)
    from hpsweep import store
    from hpsweep.engine import sweep as engine
    from hpsweep.runtime.forkserver import hand_over_tracking_store

    try:
        tracking_uri = store.resolve_tracking_uri(config.tracking_uri)
    except SweepInputError as e:  # an empty or damaged SQLite store
        return _input_errors(e)
    hand_over_tracking_store(tracking_uri)

    # Before Prefect is imported: Prefect then leaves the root logger's handler alone.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[_log_handler()])
    logging.getLogger("hpsweep").setLevel(logging.INFO)
    local_prefect = _local_prefect_in_background()  # a cold start overlaps the parent run's creation
    # The parent run first (STARTING): `hpsweep status` sees the sweep while Prefect starts.
    sweep_store = store.SweepStore.at(tracking_uri)
    started = engine.start_sweep(config, inputs, sweep_store)
    try:
        with engine.kept_alive(sweep_store, started):
            result = _sweep_flow(config, started, local_prefect)
    except SweepInputError as e:  # found only once Prefect is up (e.g. a quota limit too small for a trial)
        return _input_errors(e)
    except KeyboardInterrupt:  # Ctrl-C before the sweep could take signals over (Prefect starting up)
        return 128 + signal.SIGINT
    _print_summary(result)
    if result.get("interrupted"):  # stopped by a signal: the shell's 128 + its number (130, 143)
        console.print(f"interrupted by {result['interrupted']}: rerun the same command to train the rest")
        return 128 + signal.Signals[result["interrupted"]].value
    return EXIT_OK if result["counts"]["failed"] == 0 else EXIT_TRIALS_FAILED


def _configured_prefect_api() -> str | None:
    from hpsweep.engine.localserver import configured_prefect_api

    return configured_prefect_api()


def _local_prefect_in_background() -> Callable[[], Any] | None:
    """On the embedded default, find or start the local Prefect server (held while this process
    lives) in a thread, so that a cold start overlaps the sweep's own start-up; the function
    returned waits for it (a ``localserver.ServerState``). None with a configured Prefect API."""
    if _configured_prefect_api():
        return None
    from concurrent.futures import Future

    from hpsweep.engine.localserver import find_local_server

    found: Future = Future()

    def find() -> None:
        try:
            found.set_result(find_local_server(start=True, hold=True))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            found.set_exception(e)

    # A daemon thread: Ctrl-C during a cold start exits at once (the server then stops when idle).
    threading.Thread(target=find, name="hpsweep-local-prefect", daemon=True).start()
    return found.result


def _use_local_prefect(local: Any) -> None:
    """Point Prefect at the local server ``local`` (a ``localserver.ServerState``), and say where it is."""
    from hpsweep.engine.localserver import adopt

    adopt(local)
    logging.getLogger("hpsweep").info("Prefect: local server %s (UI %s), shared by this user's sweeps; it stops "
                                      "after %s idle, or with `hpsweep server stop`", local.url, local.ui_url,
                                      _duration(local.idle_s))


def _duration(seconds: float) -> str:
    """76 → "1 min 16 s" (it printed "1.26667 min")."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min" + (f" {secs} s" if secs else "") if minutes else f"{secs} s"


def _sweep_flow(config: SweepConfig, started: Any, local_prefect: Callable[[], Any] | None) -> dict[str, Any]:
    """Run the `sweep` flow on the sweep ``started`` (``hpsweep.engine.sweep.StartedSweep``), with
    the terminal's progress; on the embedded default, against the local Prefect server that
    ``local_prefect`` waits for (``_local_prefect_in_background``)."""
    if local_prefect is not None:
        _use_local_prefect(local_prefect())
    from prefect.flows import load_flow_from_entrypoint

    from hpsweep.engine import quota
    from hpsweep.engine.callbacks import observing

    # The flow is looked up by its entrypoint, as a Prefect deployment of it is: hpsweep's own
    # code never imports the flows layer that is built on it.
    sweep = load_flow_from_entrypoint(SWEEP_FLOW, use_placeholder_flow=False)
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)  # one line per trial comes from us
    with observing(RichProgress(live=console.is_terminal)), \
            quota.dead_sweeps_slots_returned(config.launcher == "local"):
        return sweep(config, started=started, params=None)  # params.yaml's defaults are in config already


def _plan(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        config, inputs = _validated(args)
        bad = [Problem(f"--{flag}", f"must be at least 0, got {value}") for flag, value in
               (("price-per-gpu-hour", args.price), ("spot-price-per-gpu-hour", args.spot_price)) if value < 0]
        if bad:
            raise SweepInputError(bad)
    except SweepInputError as e:
        return _input_errors(e)
    from hpsweep import plan
    from hpsweep.report.status import SweepNotFound, existing_tracking_uri

    trials, versions = plan.plan_trials(inputs)
    name = config.name or inputs.spec.name or config.spec.stem
    reused: dict[str, TrialRow] = {}
    history = plan.DurationHistory()
    why = None
    try:
        uri = existing_tracking_uri(config.tracking_uri)
    except SweepNotFound:
        uri = None  # no store yet: nothing to reuse or learn from (and none is created)
    except SweepInputError as e:  # an empty or damaged SQLite store
        return _input_errors(e)
    if uri is not None:
        from hpsweep.store import SweepStore

        store = SweepStore.at(uri, patience_s=COMMAND_PATIENCE_S)
        exp_id = store.experiment_id(name)
        reused = plan.reusable_runs(store, exp_id, trials, versions, config.retrain)
        history = plan.duration_history(store, exp_id, versions["hpsweep.spec_hash"])
        why = plan.why_not_reused(store, exp_id, inputs.spec, versions, config.retrain)
    to_train = plan.trials_to_train(trials, reused)
    estimates = plan.estimate_durations(to_train, inputs.spec.expected_duration_s, history)
    host = host_gpus() if config.launcher == "local" else ()
    gpus = inputs.spec.resources.gpus
    result = plan.make_plan(trials, reused, estimates, plan.slots_for(config.quota, gpus, host), gpus,
                            plan.Prices(args.price, args.spot_price), why,
                            early_stop_rule(config, dict(inputs.spec.settings)))
    result = {"name": name, "quota": config.quota, "launcher": config.launcher, "host_gpus": list(host),
              "trainer_interpreter": resolved_interpreter(inputs.spec),
              "planning_s": round(time.monotonic() - started, 3), **result}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        Console(highlight=False).print(escape(plan.render_plan(result, name, config.quota, host, config.launcher)),
                                       soft_wrap=True)
    return EXIT_OK


def _open_sweep(args: argparse.Namespace):
    """The store and the sweep SWEEP names (default: params.yaml's sweep name), with params.yaml's sweep section."""
    from hpsweep.report.status import SweepNotFound, existing_tracking_uri, find_sweep
    from hpsweep.store import SweepStore

    params = read_params(args.params)
    sweep = args.sweep or params.get("name")
    if not sweep:
        raise SweepNotFound(f"give a sweep name or id ({args.params} has no sweep.name)")
    store = SweepStore.at(existing_tracking_uri(args.tracking_uri or params.get("tracking_uri")),
                          patience_s=COMMAND_PATIENCE_S)
    return store, find_sweep(store, sweep), params


def _status(args: argparse.Namespace) -> int:
    from hpsweep.model import ZOMBIE_AFTER_S
    from hpsweep.report.status import SweepNotFound, prefect_state, render, summarize
    from hpsweep.store import TAG_FLOW_RUN_ID

    try:
        store, record, _ = _open_sweep(args)
    except (SweepNotFound, SweepInputError) as e:
        return _not_found(e)
    runs = store.sweep_trials(record.experiment_id, record.sweep_id)
    prefect = None
    if record.parent_status == "RUNNING":  # a running sweep holds the local server: never started for this
        from hpsweep.engine.localserver import find_local_server

        local = None if _configured_prefect_api() else find_local_server(start=False, hold=False)
        prefect = prefect_state(record.tags.get(TAG_FLOW_RUN_ID), local.url if local else None)
    status = summarize(record, store.load_plan(record.parent_run_id), runs, time.time(), ZOMBIE_AFTER_S, prefect)
    if args.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        Console(highlight=False).print(escape(render(status)), soft_wrap=True)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from hpsweep.report.listing import list_sweeps, render_list
    from hpsweep.report.status import SweepNotFound, existing_tracking_uri
    from hpsweep.store import SweepStore

    try:
        uri = existing_tracking_uri(args.tracking_uri or read_params(args.params).get("tracking_uri"))
    except SweepNotFound:
        rows = []  # no store here yet: no sweep either
    except SweepInputError as e:
        return _input_errors(e)
    else:
        rows = list_sweeps(SweepStore.at(uri, patience_s=COMMAND_PATIENCE_S), args.name, args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        Console(highlight=False, width=200).print(escape(render_list(rows)), soft_wrap=True)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from hpsweep.report.status import SweepNotFound

    try:
        store, record, params = _open_sweep(args)
    except (SweepNotFound, SweepInputError) as e:
        return _not_found(e)
    from hpsweep.report import folders
    from hpsweep.report.assemble import ReportNotWritten, rebuild_report, show_as_latest, sweep_summary

    explicit = args.report_dir or (Path(params["report_dir"]) if params.get("report_dir")
                                   and params.get("name") == record.name else None)
    report_dir = explicit or folders.sweep_report_dir(record.name, record.sweep_id)
    try:
        rows, header, paths = rebuild_report(store, record, report_dir)
    except ReportNotWritten as e:  # writing the files is this command's whole job
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return EXIT_INTERNAL
    if record.parent_status == "RUNNING":
        console.print(f"note: sweep {record.sweep_id} is still running: trials not yet ended are listed as failed")
    summary = sweep_summary(header, rows, report_dir, paths)
    # `latest` shows the name's newest sweep: rewriting an older sweep's report never moves it back.
    newest = store.latest_parent_run([record.experiment_id]) if explicit is None else None
    if newest is not None and newest.info.run_id == record.parent_run_id:
        show_as_latest(summary, report_dir)
    _print_summary(summary)
    Console().print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)
    return EXIT_OK


def _quota(args: argparse.Namespace) -> int:
    from hpsweep.config import DEFAULT_LIMIT_NAME
    from hpsweep.engine import quota

    try:
        name = args.quota_limit or read_params(args.params).get("quota_limit") or DEFAULT_LIMIT_NAME
    except SweepInputError as e:
        return _input_errors(e)
    if not _configured_prefect_api():  # the embedded default: the limit is in the local server's database
        from hpsweep.engine.localserver import adopt, find_local_server

        adopt(find_local_server(start=True, hold=True))
    if args.size is None:
        if args.force:
            return _not_found(ValueError("--force goes with N (the new size of the limit)"))
        Console(highlight=False).print(escape(quota.render_quota(quota.show_quota(name))), soft_wrap=True)
        return EXIT_OK
    if args.size < 1:
        return _not_found(ValueError(f"N must be at least 1, got {args.size}"))
    try:
        before, after = quota.set_quota(name, args.size, args.force)
    except quota.QuotaInUse as e:
        return _not_found(e)
    was = ("absent" if before is None else f"{before.limit} slots" + ("" if before.active else ", inactive"))
    Console(highlight=False).print(escape(f"quota limit {name!r}: {after.limit} slots ({after.active_slots} in use); "
                                          f"was {was}"), soft_wrap=True)
    return EXIT_OK


def _server(args: argparse.Namespace) -> int:
    from hpsweep.engine import localserver

    out = Console(highlight=False)
    configured = _configured_prefect_api()
    if args.action == "stop":
        try:
            stopped = localserver.stop_local_server(args.force)
        except localserver.ServerInUse as e:
            return _not_found(e)
        out.print(f"stopped the local Prefect server at {stopped.url}" if stopped else
                  "no local Prefect server was running", soft_wrap=True)
    else:
        if args.action == "start":
            localserver.find_local_server(start=True, hold=False)
        out.print(escape(_server_status(*localserver.server_status())), soft_wrap=True)
    if configured:
        out.print(escape(f"note: PREFECT_API_URL is set ({configured}): sweeps use that Prefect server, not a local "
                         "one"), soft_wrap=True)
    return EXIT_OK


def _server_status(state: Any, holders: list[int], idle_s: float | None) -> str:
    """`hpsweep server status`'s text."""
    if state is None:
        return ("no local Prefect server running: the next sweep without PREFECT_API_URL starts one "
                "(or `hpsweep server start`)")
    lines = [f"local Prefect server: {state.url} (UI {state.ui_url}), pid {state.pid}",
             f"  database: PREFECT_HOME's ({os.environ.get('PREFECT_HOME') or '~/.prefect'}); state and log in "
             f"{state.folder}"]
    if holders:
        lines.append(f"  in use by {len(holders)} process(es) ({', '.join(map(str, holders))}): it stops "
                     f"{_duration(state.idle_s)} after the last one ends")
    else:
        lines.append(f"  idle for {_duration(idle_s or 0)}: it stops after {_duration(state.idle_s)} idle, "
                     "or now with `hpsweep server stop`")
    return "\n".join(lines)


def _not_found(e: Exception) -> int:
    problems = e.problems if isinstance(e, SweepInputError) else [str(e)]
    for problem in problems:
        console.print(f"[red]error:[/red] {escape(str(problem))}", highlight=False)
    return EXIT_INVALID_INPUT


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hpsweep")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    # At exit, CPython's last garbage collection walks every object Prefect, MLflow and pandas made:
    # 1.5-2 s after the command's last line (measured). Frozen, they are skipped; atexit handlers
    # and finalizers still run. (Once per process: tests call main() many times.)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `hpsweep` alone: what it can do
        parser.print_help()
        return EXIT_OK
    if "@" in os.environ.get("MLFLOW_TRACKING_URI", ""):  # its user:password@ → MLflow's credential variables
        from hpsweep.store.uri import credentials_to_environment

        credentials_to_environment(None)
    try:
        if args.command == "prepare":
            from trainer.prepare import prepare

            train, val = prepare(args.out)
            console.print(f"wrote {train} and {val}")
            return EXIT_OK
        commands = {"plan": _plan, "status": _status, "report": _report, "quota": _quota, "list": _list,
                    "server": _server}
        if args.command in commands:
            return commands[args.command](args)
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
