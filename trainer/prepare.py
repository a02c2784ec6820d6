"""Prepare the demo dataset: scikit-learn's bundled digits, split into train/val CSVs.

Nothing is downloaded (the digits data ships inside scikit-learn), so this works offline.
Two steps, as `dvc.yaml`'s stages run them (the raw file stands in for a download):

    python -m trainer.prepare raw --out data/raw/digits.csv
    python -m trainer.prepare split --raw data/raw/digits.csv --out data [--val-fraction F] [--seed S]

``python -m trainer.prepare --out data`` does both without keeping the raw file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

N_FEATURES = 64  # 8x8 pixel intensities, each 0..16
PIXEL_MAX = 16.0


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    # Write to a temp name then rename, so a reader never sees a half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def raw_frame() -> pd.DataFrame:
    """The digits as one table: columns p0..p63 (pixel intensities 0..16) and label."""
    X, y = load_digits(return_X_y=True)
    df = pd.DataFrame(X.astype(np.int64), columns=[f"p{i}" for i in range(N_FEATURES)])
    df["label"] = y
    return df


def write_raw(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_csv_atomic(raw_frame(), path)
    return path


def split(raw: pd.DataFrame, out_dir: Path, val_fraction: float = 0.25, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``val.csv`` (columns p0..p63, label) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stratified so every digit class appears in validation in the same proportion.
    train, val = train_test_split(raw, test_size=val_fraction, random_state=seed, stratify=raw["label"])
    paths = []
    for name, part in (("train", train), ("val", val)):
        path = out_dir / f"{name}.csv"
        _write_csv_atomic(part, path)
        paths.append(path)
    return paths[0], paths[1]


def prepare(out_dir: Path, val_fraction: float = 0.25, seed: int = 0) -> tuple[Path, Path]:
    """Both steps at once (`hpsweep prepare`, `hpsweep demo`): the same split as raw → split."""
    return split(raw_frame(), out_dir, val_fraction, seed)


def load_xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features as float32 scaled to [0, 1], labels as int."""
    df = pd.read_csv(path)
    if "label" not in df.columns:
        raise ValueError(f"{path}: no 'label' column (found {list(df.columns)[:5]}...)")
    X = df.drop(columns="label").to_numpy(dtype=np.float32) / PIXEL_MAX
    y = df["label"].to_numpy(dtype=np.int64)
    return X, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the digits raw table, or its train/val split.")
    parser.add_argument("step", nargs="?", choices=["raw", "split"], help="one step (default: both, no raw file)")
    parser.add_argument("--out", type=Path, default=None, help="the raw CSV (raw) or the output folder")
    parser.add_argument("--raw", type=Path, default=Path("data/raw/digits.csv"), help="raw CSV to split")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.step == "raw":
        print(f"wrote {write_raw(args.out or Path('data/raw/digits.csv'))}")
        return
    raw = pd.read_csv(args.raw) if args.step == "split" else raw_frame()
    train, val = split(raw, args.out or Path("data"), args.val_fraction, args.seed)
    print(f"wrote {train} and {val}")


if __name__ == "__main__":
    main()
