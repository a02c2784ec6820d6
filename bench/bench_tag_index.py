"""Does a sweep's run lookup need the tag index, and how long does a 10,000-trial report take?

Part 1 (``--runs``, default 100,000): a scratch PostgreSQL database with MLflow's schema is
filled by COPY (not through the API) with hpsweep-shaped runs: sweeps of 1,000 trials, each
trial with the tags, params and metrics hpsweep writes. Half the sweeps share one experiment
(one sweep name rerun for months), the rest are spread over 9 experiments; one extra sweep has
16 trials. Then hpsweep's own lookups, through MLflow's SqlAlchemyStore (the code the server
runs, without HTTP), are timed without and with ``mlflow_server``'s hash index on tags.value:

- ``sweep_trials``: the report's read of one sweep (``tags.hpsweep.sweep_id = …``), and
- ``finished_trials_by_key``: the planning read of every FINISHED trial in the experiment.

Part 2 (``--report-trials``, default 10,000): ``hpsweep.report.leaderboard.rank_rows`` + ``write_report`` on
synthetic rows, each step timed.

    python bench/bench_tag_index.py                      # both parts, ~15 min on 2 busy cores
    python bench/bench_tag_index.py --report-trials 0    # only the database part
    python bench/bench_tag_index.py --runs 0 --report-trials 2000

PostgreSQL: ``HPSWEEP_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432``). The scratch
database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlflow_server.database import TAG_VALUE_INDEX, apply_indexes  # noqa: E402

PG = os.environ.get("HPSWEEP_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
TRIALS_PER_SWEEP = 1000
EPOCHS = 10
T0 = 1_790_000_000_000  # ms


@dataclass
class Sweep:
    sweep_id: str
    experiment_id: int
    trials: int


def _line(*cols) -> str:
    return "\t".join("\\N" if c is None else str(c) for c in cols) + "\n"


def build(db_uri: str, n_runs: int, seed: int = 0) -> tuple[list[Sweep], dict[str, float]]:
    """MLflow's schema through its own store, then hpsweep-shaped rows by COPY."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    rng = random.Random(seed)
    timings = {}
    t = time.perf_counter()
    store = SqlAlchemyStore(db_uri, tempfile.mkdtemp())
    exps = [int(store.create_experiment(f"model-{e}")) for e in range(10)]
    store.engine.dispose()
    timings["schema"] = time.perf_counter() - t

    n_sweeps = max(1, n_runs // TRIALS_PER_SWEEP)
    sweeps = []
    for s in range(n_sweeps):
        exp = exps[0] if s < n_sweeps // 2 else exps[1 + (s - n_sweeps // 2) % 9]
        sweeps.append(Sweep(f"model-{exp}-2026{s:04d}-{uuid.UUID(int=rng.getrandbits(128)).hex[:6]}", exp,
                            TRIALS_PER_SWEEP))
    sweeps.append(Sweep(f"model-{exps[0]}-demo-{uuid.UUID(int=rng.getrandbits(128)).hex[:6]}", exps[0], 16))

    runs, tags, params, latest, metrics = (io.StringIO() for _ in range(5))
    ts = T0
    for sw in sweeps:
        parent = uuid.UUID(int=rng.getrandbits(128)).hex
        spec, data, code = (hashlib.md5(f"{sw.sweep_id}{k}".encode()).hexdigest()[:12] for k in "sdc")
        ts += 3_600_000
        runs.write(_line(parent, f"sweep {sw.sweep_id}", "UNKNOWN", "hpsweep", "", "ci", "FINISHED", ts, ts + 10**7,
                         "", "active", f"mlflow-artifacts:/{sw.experiment_id}/{parent}/artifacts", sw.experiment_id,
                         None))
        for k, v in (("mlflow.runName", f"sweep {sw.sweep_id}"), ("mlflow.user", "ci"),
                     ("hpsweep.sweep_id", sw.sweep_id), ("hpsweep.role", "sweep"), ("hpsweep.spec_hash", spec),
                     ("hpsweep.data_version", data), ("hpsweep.code_version", code), ("hpsweep.quota", "8"),
                     ("hpsweep.git_commit", code), ("hpsweep.owner", "orchestrator:1234:1790000000"),
                     ("hpsweep.heartbeat", str(ts // 1000))):
            tags.write(_line(k, v, parent))
        for i in range(1, sw.trials + 1):
            rid = uuid.UUID(int=rng.getrandbits(128)).hex
            hp = {"lr": round(10 ** rng.uniform(-4, -1), 6), "depth": rng.randint(2, 12), "dropout": i % 5 / 10}
            name = " ".join(f"{k}={v}" for k, v in hp.items())
            start = ts + i * 1000
            f1 = rng.random()
            runs.write(_line(rid, name, "UNKNOWN", "hpsweep", "", "ci", "FINISHED", start, start + 3_600_000, "",
                             "active", f"mlflow-artifacts:/{sw.experiment_id}/{rid}/artifacts", sw.experiment_id,
                             None))
            for k, v in (("mlflow.runName", name), ("mlflow.user", "ci"), ("mlflow.source.name", "hpsweep"),
                         ("mlflow.source.type", "LOCAL"), ("mlflow.parentRunId", parent),
                         ("hpsweep.sweep_id", sw.sweep_id), ("hpsweep.role", "trial"),
                         ("hpsweep.trial_key", hashlib.sha1(f"{sw.sweep_id}{i}".encode()).hexdigest()[:16]),
                         ("hpsweep.hparams", json.dumps(hp)), ("hpsweep.index", str(i)), ("hpsweep.attempt", "1"),
                         ("hpsweep.status", "FINISHED"), ("hpsweep.owner", f"gpu-host-{i % 8}:{1000 + i}:1790000000"),
                         ("hpsweep.heartbeat", str(start // 1000 + 3600)), ("hpsweep.gpus", str(i % 8)),
                         ("hpsweep.duration_s", "3600.000")):
                tags.write(_line(k, v, rid))
            for k, v in hp.items():
                params.write(_line(k, v, rid))
            for epoch in range(1, EPOCHS + 1):
                metrics.write(_line("val_f1", f1 * epoch / EPOCHS, start + epoch * 360_000, rid, epoch, "f"))
            metrics.write(_line("f1", f1, start + 3_600_000, rid, 0, "f"))
            latest.write(_line("val_f1", f1, start + 3_600_000, EPOCHS, "f", rid))
            latest.write(_line("f1", f1, start + 3_600_000, 0, "f", rid))
    timings["generate"] = time.perf_counter() - t - timings["schema"]

    t = time.perf_counter()
    with psycopg.connect(db_uri, autocommit=True) as conn:
        for table, cols, buf in (
                ("runs", "run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time, "
                         "end_time, source_version, lifecycle_stage, artifact_uri, experiment_id, deleted_time", runs),
                ("tags", "key, value, run_uuid", tags), ("params", "key, value, run_uuid", params),
                ("metrics", "key, value, timestamp, run_uuid, step, is_nan", metrics),
                ("latest_metrics", "key, value, timestamp, step, is_nan, run_uuid", latest)):
            with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                copy.write(buf.getvalue())
        conn.execute("VACUUM ANALYZE")
    timings["copy+vacuum"] = time.perf_counter() - t
    return sweeps, timings


def sizes(db_uri: str) -> dict[str, int]:
    with psycopg.connect(db_uri) as conn:
        rows = conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
            "('runs','tags','params','metrics','latest_metrics') OR relname = %s", (TAG_VALUE_INDEX.name,)).fetchall()
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "tags", "metrics")}
    return {**dict(rows), **{f"rows:{k}": v for k, v in counts.items()}}


def time_calls(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm: caches, connection pool
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), min(samples)


class SqlCapture:
    """Records the SQL MLflow sends for the main search statement, to EXPLAIN it."""

    def __init__(self, engine):
        from sqlalchemy import event

        self.engine, self.last = engine, None
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, conn, cursor, statement, parameters, context, executemany):
        if "FROM runs" in statement and "tags" in statement and "JOIN" in statement:
            self.last = (statement, parameters)

    def explain(self) -> str:
        statement, parameters = self.last
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) " + statement, parameters)
            return "\n".join(r[0] for r in cur.fetchall())
        finally:
            raw.close()


def bench_lookups(db_uri: str, sweeps: list[Sweep], repeat: int) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from hpsweep.store.runs import sweep_trials

    client = MlflowClient(db_uri)
    store = client._tracking_client.store
    capture = SqlCapture(store.engine)
    picks = [sweeps[0], sweeps[-1]] + ([sweeps[-2]] if len(sweeps) > 2 else [])
    cases = [(f"sweep_trials: {sw.trials:,}-trial sweep", sw.experiment_id, sw) for sw in picks]
    n_in = {e: sum(s.trials + 1 for s in sweeps if s.experiment_id == e) for e in {c[1] for c in cases}}
    results = []
    for label, exp, sw in cases:
        got = sweep_trials(client, str(exp), sw.sweep_id)
        assert len(got) == sw.trials, (label, len(got))
        median, best = time_calls(lambda exp=exp, sw=sw: sweep_trials(client, str(exp), sw.sweep_id), repeat)
        plan = capture.explain()
        results.append({"query": label, "runs in experiment": n_in[exp], "median_s": median, "min_s": best,
                        "sql_ms": _execution_ms(plan), "plan": plan})
    store.engine.dispose()
    return results


def bench_planning_read(db_uri: str, sweeps: list[Sweep]) -> dict:
    """The read every sweep does first: all FINISHED trials of its experiment (to reuse by key)."""
    from mlflow.tracking import MlflowClient

    from hpsweep.store.runs import finished_trials_by_key

    client = MlflowClient(db_uri)
    exp = sweeps[0].experiment_id
    t = time.perf_counter()
    found = finished_trials_by_key(client, str(exp), {"no-such-key"})
    elapsed = time.perf_counter() - t
    client._tracking_client.store.engine.dispose()
    n = sum(s.trials for s in sweeps if s.experiment_id == exp)
    return {"query": f"finished_trials_by_key: every FINISHED trial ({n:,}) of the experiment", "seconds": elapsed,
            "found": len(found)}


def _execution_ms(plan: str) -> float:
    for line in plan.splitlines():
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return float("nan")


def bench_write_overhead(db_uri: str, n_runs: int = 500) -> float:
    """µs per tag row INSERTed one at a time (as MLflow writes them), on existing runs, with the
    values hpsweep repeats most (``trial``, ``RUNNING``, ``1``): the worst case for a hash index,
    whose equal values share one bucket chain."""
    with psycopg.connect(db_uri) as conn:
        run_ids = [r[0] for r in conn.execute("SELECT run_uuid FROM runs LIMIT %s", (n_runs,))]
        rows = [(f"bench.{k}", v, rid) for rid in run_ids
                for k, v in (("role", "trial"), ("status", "RUNNING"), ("attempt", "1"), ("sweep_id", "bench-write"),
                             ("trial_key", rid[:16]), ("user", "ci"))]
        t = time.perf_counter()
        with conn.cursor() as cur:
            for row in rows:
                cur.execute("INSERT INTO tags (key, value, run_uuid) VALUES (%s, %s, %s)", row)
        conn.commit()
        elapsed = time.perf_counter() - t
        conn.execute("DELETE FROM tags WHERE key LIKE 'bench.%%'")
        conn.commit()
    return elapsed / len(rows) * 1e6


def bench_report(n: int, seed: int = 0) -> dict[str, float]:
    from hpsweep.model import TrialRow, TrialState
    from hpsweep.report import leaderboard as report

    rng = random.Random(seed)
    runs = []
    for i in range(1, n + 1):
        failed = i % 50 == 0
        hp = {"lr": round(10 ** rng.uniform(-4, -1), 6), "depth": rng.randint(2, 12), "dropout": i % 5 / 10}
        runs.append(TrialRow(run_id=uuid.UUID(int=rng.getrandbits(128)).hex, run_name=" ".join(f"{k}={v}" for k, v in hp.items()),
                             state=TrialState.FAILED if failed else TrialState.FINISHED,
                             hparams=hp, f1=None if failed else rng.random(), reason="CUDA out of memory" if failed else None,
                             index=i, attempt=1, key=f"{i:016x}", duration_s=3600.0))
    sweep = {"sweep_id": "bench-sweep", "name": "bench", "experiment_id": "1", "parent_run_id": "p"}
    out: dict[str, float] = {}
    t = time.perf_counter()
    rows = report.rank_rows(runs)
    out["rank_rows"] = time.perf_counter() - t
    # One write_report call, its steps timed from inside (write_report calls them by module name).
    originals = {name: getattr(report, name) for name in ("render_markdown", "leaderboard_frame",
                                                          "leaderboard_json", "plot_f1")}

    def timed(name):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                out[name] = out.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        for name in originals:
            setattr(report, name, timed(name))
        try:
            t = time.perf_counter()
            paths = report.write_report(Path(tmp) / "report", sweep, rows)
            out["write_report (all four files)"] = time.perf_counter() - t
        finally:
            for name, fn in originals.items():
                setattr(report, name, fn)
        out["png size (MB)"] = paths["f1_by_combination.png"].stat().st_size / 1e6
    out["total: rank + write"] = out["rank_rows"] + out["write_report (all four files)"]
    return out


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100_000, help="trial runs in the scratch database (0: skip)")
    ap.add_argument("--repeat", type=int, default=7, help="timed repetitions per lookup (median reported)")
    ap.add_argument("--report-trials", type=int, default=10_000, help="rows in the report benchmark (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    ap.add_argument("--plans", action="store_true", help="print the EXPLAIN ANALYZE plans")
    args = ap.parse_args()

    if args.runs:
        name = f"hpsweep_bench_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(f"{PG}/postgres", autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        db_uri = f"{PG}/{name}"
        try:
            sweeps, build_t = build(db_uri, args.runs)
            sz = sizes(db_uri)
            n_trials = sum(s.trials for s in sweeps)
            print(f"\n## {n_trials:,} trial runs + {len(sweeps)} parent runs in {len({s.experiment_id for s in sweeps})} "
                  f"experiments (build: " + ", ".join(f"{k} {v:.1f}s" for k, v in build_t.items()) + ")\n")
            print(table(["table", "rows", "total size (MB)", "bytes / trial run"],
                        [[t, f"{sz.get('rows:' + t, ''):,}" if f"rows:{t}" in sz else "", f"{sz[t] / 1e6:.1f}",
                          f"{sz[t] / n_trials:.0f}"] for t in ("runs", "tags", "params", "metrics", "latest_metrics")]))

            before = bench_lookups(db_uri, sweeps, args.repeat)
            write_before = bench_write_overhead(db_uri)
            with psycopg.connect(db_uri, autocommit=True) as conn:
                t = time.perf_counter()
                apply_indexes(conn)
                build_s = time.perf_counter() - t
            index_mb = sizes(db_uri)[TAG_VALUE_INDEX.name] / 1e6
            after = bench_lookups(db_uri, sweeps, args.repeat)
            write_after = bench_write_overhead(db_uri)
            planning = bench_planning_read(db_uri, sweeps)

            print(f"\n## search_runs for one sweep, without and with `{TAG_VALUE_INDEX.name}` "
                  f"(hash on tags.value; built in {build_s:.1f}s, {index_mb:.0f} MB)\n")
            print(table(["lookup (hpsweep.store)", "runs in experiment", "no index: median s", "SQL ms",
                         "hash index: median s", "SQL ms", "end-to-end ratio", "SQL ratio"],
                        [[b["query"], f"{b['runs in experiment']:,}", f"{b['median_s']:.3f}", f"{b['sql_ms']:.1f}",
                          f"{a['median_s']:.3f}", f"{a['sql_ms']:.1f}", f"{b['median_s'] / a['median_s']:.1f}x",
                          f"{b['sql_ms'] / a['sql_ms']:.0f}x"]
                         for b, a in zip(before, after, strict=True)]))
            print("\n(end to end: MLflow's search_runs incl. loading each run's tags/params/metrics; "
                  "SQL: EXPLAIN ANALYZE of its main statement)")
            print(f"\nTag INSERT, one row at a time: {write_before:.0f} µs/row without the index, "
                  f"{write_after:.0f} µs/row with it.")
            print(f"{planning['query']}: {planning['seconds']:.1f}s (the index does not serve it: it is not selective)")
            if args.plans:
                for label, res in (("without", before), ("with", after)):
                    for r in res:
                        print(f"\n### {r['query']} ({r['runs in experiment']:,} runs), {label} the index\n{r['plan']}")
        finally:
            if not args.keep:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()

    if args.report_trials:
        for n in sorted({min(1000, args.report_trials), args.report_trials}):
            res = bench_report(n)
            print(f"\n## report for a {n:,}-trial sweep (hpsweep.report.leaderboard, synthetic rows, 2% failed)\n")
            print(table(["step", "seconds"], [[k, f"{v:.2f}"] for k, v in res.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
