"""Data staging benchmark (issue 5): a synthetic dataset of SIZE GB on a local S3 endpoint (moto in
server mode), staged through the per-host data cache the way trials stage it.

    .venv/bin/python bench/bench_staging.py            # 2 GB
    .venv/bin/python bench/bench_staging.py --size-gb 0.5

Prints: cold fetch time and MB/s, warm hit time, the hit after a lost seal (a full re-hash),
and the bytes fetched when 8 trials start on one host at once (should be 1x the dataset).
Everything lives in a temporary folder and the moto server's memory; nothing is left behind.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hpsweep.datacache import DataCache, DataRef, Remote  # noqa: E402

CHUNK = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}")


def synthetic_file(path: Path, size: int) -> str:
    """Incompressible bytes (so nothing along the way can cheat), and their md5 (the DVC hash)."""
    h = hashlib.md5()
    block = os.urandom(CHUNK)
    with path.open("wb") as f:
        written = 0
        while written < size:
            piece = block[: min(CHUNK, size - written)]
            piece = written.to_bytes(8, "little") + piece[8:]  # every block differs
            f.write(piece)
            h.update(piece)
            written += len(piece)
    return h.hexdigest()


def _trial(root: str, ref: dict, barrier, out) -> None:
    cache = DataCache(Path(root))
    barrier.wait()
    start = time.perf_counter()
    cache.stage(DataRef.from_dict(ref))
    out.put((cache.stats.bytes_fetched, time.perf_counter() - start))


def eight_trials(root: Path, ref: DataRef, trials: int = 8) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(trials), ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(str(root), ref.as_dict(), barrier, out)) for _ in range(trials)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(b for b, _ in results), max(t for _, t in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    args = parser.parse_args()
    size = int(args.size_gb * (1 << 30))
    console = Console()
    with tempfile.TemporaryDirectory(prefix="hpsweep-staging-") as tmp:
        tmp_path = Path(tmp)
        proc, url = start_moto(tmp_path / "moto.log")
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig

            console.print(f"writing {size / 1e9:.2f} GB of synthetic data…")
            source = tmp_path / "dataset.bin"
            md5 = synthetic_file(source, size)
            s3 = boto3.client("s3", endpoint_url=url)
            s3.create_bucket(Bucket="bench")
            start = time.perf_counter()
            s3.upload_file(str(source), "bench", f"dvc/files/md5/{md5[:2]}/{md5[2:]}",
                           Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8))
            upload_s = time.perf_counter() - start
            source.unlink()  # the trial host has no copy: only the remote does
            ref = DataRef(path="data/train.bin", md5=md5, size=size, remote=Remote("s3://bench/dvc", url))

            cache = DataCache(tmp_path / "host-a")
            start = time.perf_counter()
            cache.stage(ref)
            cold_s = time.perf_counter() - start

            start = time.perf_counter()
            DataCache(tmp_path / "host-a").stage(ref)  # the next trial on this host
            warm_s = time.perf_counter() - start

            seal = cache.path_for(md5).with_name(cache.path_for(md5).name + ".ok")
            seal.unlink()
            start = time.perf_counter()
            DataCache(tmp_path / "host-a").stage(ref)  # seal lost: the copy is re-hashed, not re-fetched
            rehash_s = time.perf_counter() - start
            shutil.rmtree(tmp_path / "host-a")

            fetched, eight_s = eight_trials(tmp_path / "host-b", ref)
        finally:
            proc.terminate()
            proc.wait()

    mb = size / 1e6
    table = Table(title=f"Data staging from a local S3 endpoint (moto), {size / 1e9:.2f} GB")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("upload to the remote (setup)", f"{upload_s:.1f} s ({mb / upload_s:.0f} MB/s)")
    table.add_row("cold fetch (first trial on a host)", f"{cold_s:.1f} s")
    table.add_row("cold fetch throughput (download + md5 check)", f"{mb / cold_s:.0f} MB/s")
    table.add_row("warm hit (later trial on the host)", f"{warm_s * 1000:.1f} ms")
    table.add_row("hit after a lost seal (full re-hash, no fetch)", f"{rehash_s:.1f} s")
    table.add_row("8 trials at once on a fresh host: bytes fetched", f"{fetched / 1e9:.2f} GB ({fetched / size:.2f}x)")
    table.add_row("8 trials at once: slowest trial's staging", f"{eight_s:.1f} s")
    console.print(table)


if __name__ == "__main__":
    main()
