"""Prepare the demo dataset: scikit-learn's bundled digits, split into train/val CSVs.

Nothing is downloaded (the digits data ships inside scikit-learn), so this works offline.
Usage: ``python -m trainer.prepare --out data``
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


def prepare(out_dir: Path, val_fraction: float = 0.25, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``val.csv`` (columns p0..p63, label) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    # Stratified so every digit class appears in validation in the same proportion.
    X_tr, X_val, y_tr, y_val = train_test_split(
        X, y, test_size=val_fraction, random_state=seed, stratify=y
    )
    columns = [f"p{i}" for i in range(N_FEATURES)]
    paths = []
    for name, X_part, y_part in (("train", X_tr, y_tr), ("val", X_val, y_val)):
        df = pd.DataFrame(X_part.astype(np.int64), columns=columns)
        df["label"] = y_part
        path = out_dir / f"{name}.csv"
        _write_csv_atomic(df, path)
        paths.append(path)
    return paths[0], paths[1]


def load_xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features as float32 scaled to [0, 1], labels as int."""
    df = pd.read_csv(path)
    if "label" not in df.columns:
        raise ValueError(f"{path}: no 'label' column (found {list(df.columns)[:5]}...)")
    X = df.drop(columns="label").to_numpy(dtype=np.float32) / PIXEL_MAX
    y = df["label"].to_numpy(dtype=np.int64)
    return X, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the digits train/val CSVs.")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, val = prepare(args.out, args.val_fraction, args.seed)
    print(f"wrote {train} and {val}")


if __name__ == "__main__":
    main()
