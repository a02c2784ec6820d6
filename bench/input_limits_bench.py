"""How fast validation refuses hostile inputs and judges huge data files (issue 14). One table.

    .venv/bin/python bench/input_limits_bench.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpsweep.inputs import SweepInputError, data_problems, load_combinations  # noqa: E402
from tests.test_input_limits import BOMB  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    try:
        fn()
    except SweepInputError:
        pass
    return time.perf_counter() - started


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="hpsweep-limits-bench-"))
    bomb = root / "bomb.yaml"
    bomb.write_text(BOMB)
    deep = root / "deep.yaml"
    deep.write_text("combinations:\n  - {lr: " + "[" * 10_000 + "]" * 10_000 + "}\n")
    big = root / "big.csv"
    big.write_text("label,note\n" + "1,é\n" * 30_000)
    with big.open("r+b") as f:
        f.truncate(20 * 2**30)  # sparse: 20 GiB on paper
    rows = [(f"YAML alias bomb ({len(BOMB)} bytes, 9**8 values)", timed(lambda: load_combinations(bomb))),
            ("list nested 10,000 deep", timed(lambda: load_combinations(deep))),
            ("20 GiB CSV data file (sparse)", timed(lambda: data_problems("--train", big)))]
    print("| input | seconds to judge |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} |")


if __name__ == "__main__":
    main()
