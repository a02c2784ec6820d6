"""Load and validate a sweep's inputs before anything runs.

Every problem is collected (not just the first) and reported with the file, the row
and the key it concerns, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Scalar = Union[bool, int, float, str]
Hparams = dict[str, Scalar]


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    row: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f": row {self.row}"
        if self.key is not None:
            where += f": key '{self.key}'"
        return f"{where}: {self.message}"


class SweepInputError(Exception):
    """Invalid sweep input; carries one Problem per thing to fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------- combinations


def load_combinations(path: Path) -> list[Hparams]:
    """Read a YAML (`combinations:` list of mappings) or CSV (header row) file."""
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".csv"):
        raise SweepInputError(
            [Problem(name, f"unknown file type '{path.suffix}': use .yaml, .yml or .csv")]
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SweepInputError([Problem(name, f"cannot read the file: {e}")]) from e
    if not text.strip():
        raise SweepInputError([Problem(name, "the file is empty")])
    rows = _yaml_rows(name, text) if suffix != ".csv" else _csv_rows(name, text)
    problems = _check_rows(name, rows)
    if problems:
        raise SweepInputError(problems)
    return [values for _, values in rows]


def _yaml_rows(name: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepInputError([Problem(name, f"not valid YAML: {e}")]) from e
    if not isinstance(doc, dict) or "combinations" not in doc:
        raise SweepInputError([Problem(name, "expected a mapping with a 'combinations:' list")])
    extra = sorted(set(doc) - {"combinations"})
    if extra:
        raise SweepInputError([Problem(name, "unknown top-level key", key=extra[0])])
    combos = doc["combinations"]
    if combos is None or combos == []:
        raise SweepInputError([Problem(name, "no combinations", key="combinations")])
    if not isinstance(combos, list):
        raise SweepInputError([Problem(name, "must be a list of mappings", key="combinations")])
    problems, rows = [], []
    for i, combo in enumerate(combos, start=1):
        if not isinstance(combo, dict) or not combo:
            problems.append(Problem(name, "a combination must be a non-empty mapping of key: value", row=i))
        else:
            rows.append((i, {str(k): v for k, v in combo.items()}))
    if problems:
        raise SweepInputError(problems)
    return rows


_INT = re.compile(r"[+-]?\d+")


def parse_csv_value(text: str) -> Scalar:
    """Type a CSV cell the way a person reading it would: int, float, bool, else str."""
    s = text.strip()
    if _INT.fullmatch(s):
        return int(s)
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    try:
        return float(s)
    except ValueError:
        return s


def _csv_rows(name: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader)]
    problems: list[Problem] = []
    if any(not h for h in header):
        problems.append(Problem(name, "the header has an empty column name", row=1))
    dupes = sorted({h for h in header if header.count(h) > 1})
    problems += [Problem(name, "column named twice in the header", row=1, key=h) for h in dupes]
    if problems:
        raise SweepInputError(problems)
    rows = []
    for line_no, cells in enumerate(reader, start=2):  # rows are numbered as file lines
        if not any(c.strip() for c in cells):
            continue  # blank line
        row: dict[str, Any] = {}
        for i, cell in enumerate(cells):
            key = header[i] if i < len(header) else f"<column {i + 1}>"
            row[key] = parse_csv_value(cell) if cell.strip() else None
        rows.append((line_no, row))
    if not rows:
        raise SweepInputError([Problem(name, "no combinations: the file has a header but no rows")])
    return rows


def _check_rows(name: str, rows: list[tuple[int, dict[str, Any]]]) -> list[Problem]:
    problems: list[Problem] = []
    expected = list(rows[0][1])
    seen: dict[str, int] = {}
    for row_no, values in rows:
        for key in expected:
            if key not in values or values[key] is None:
                problems.append(Problem(name, "missing value", row=row_no, key=key))
        for key in values:
            if key not in expected:
                problems.append(Problem(name, f"unexpected key (the first row has {expected})", row=row_no, key=key))
        for key, value in values.items():
            if value is None:
                continue
            if not isinstance(value, (bool, int, float, str)):
                problems.append(
                    Problem(name, f"value {value!r} is not a scalar (int, float, str or bool)", row=row_no, key=key)
                )
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(Problem(name, f"value {value} is not a finite number", row=row_no, key=key))
        canonical = canonical_json(values)
        if canonical in seen:
            problems.append(Problem(name, f"duplicate of row {seen[canonical]}", row=row_no))
        else:
            seen[canonical] = row_no
    return problems


def canonical_json(values: dict[str, Any]) -> str:
    """One spelling per combination: sorted keys, no whitespace (used for duplicates and keys)."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------- model spec


class TrainerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    entrypoint: str | None = Field(default=None, description="package.module:function")
    command: list[str] | None = Field(default=None, min_length=1, description="argv of an executable")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TrainerSpec":
        if (self.entrypoint is None) == (self.command is None):
            raise ValueError("give exactly one of 'entrypoint' or 'command'")
        return self


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    gpus: int = Field(default=1, ge=1, description="GPUs (quota slots) one trial occupies")


class ModelSpec(BaseModel):
    """The model spec file (a public contract: keys may be added, never renamed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    trainer: TrainerSpec
    settings: dict[str, Scalar] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    time_limit_s: float | None = Field(default=None, gt=0)


def load_spec(path: Path) -> ModelSpec:
    name = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SweepInputError([Problem(name, f"cannot read the file: {e}")]) from e
    except yaml.YAMLError as e:
        raise SweepInputError([Problem(name, f"not valid YAML: {e}")]) from e
    if not isinstance(doc, dict):
        raise SweepInputError([Problem(name, "expected a mapping with at least a 'trainer:' key")])
    try:
        spec = ModelSpec.model_validate(doc)
    except ValidationError as e:
        raise SweepInputError([_pydantic_problem(name, err) for err in e.errors()]) from e
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    problems = check_trainer(name, spec.trainer)
    if problems:
        raise SweepInputError(problems)
    return spec


def _pydantic_problem(name: str, err: Any) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return Problem(name, msg, key=loc or None)


def check_trainer(name: str, trainer: TrainerSpec) -> list[Problem]:
    if trainer.entrypoint is not None:
        try:
            resolve_entrypoint(trainer.entrypoint)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            return [Problem(name, str(e), key="trainer.entrypoint")]
        return []
    exe = trainer.command[0]  # type: ignore[index]
    if shutil.which(exe) is None:
        return [Problem(name, f"executable '{exe}' not found (not on PATH, or not executable)", key="trainer.command")]
    return []


def resolve_entrypoint(entrypoint: str):
    """Import ``package.module:function`` (the working directory is importable, like `python -m`)."""
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point '{entrypoint}' must look like 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import error inside the user's module is still "cannot import"
        raise ImportError(f"cannot import module '{module_name}': {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise TypeError(f"'{entrypoint}' is not callable")
    return fn


# ---------------------------------------------------------------- everything together


@dataclass(frozen=True)
class SweepInputs:
    combinations: list[Hparams]
    spec: ModelSpec
    train: Path
    val: Path


def load_inputs(combinations: Path, spec: Path, train: Path, val: Path, quota: int) -> SweepInputs:
    """Validate all inputs; raise one SweepInputError listing every problem found."""
    problems: list[Problem] = []
    loaded_combos: list[Hparams] = []
    loaded_spec: ModelSpec | None = None
    try:
        loaded_combos = load_combinations(combinations)
    except SweepInputError as e:
        problems += e.problems
    try:
        loaded_spec = load_spec(spec)
    except SweepInputError as e:
        problems += e.problems
    for flag, path in (("--train", train), ("--val", val)):
        if not path.exists():
            problems.append(Problem(str(path), f"{flag} data not found (expected a file or folder)"))
    if quota < 1:
        problems.append(Problem("--quota", f"must be at least 1, got {quota}"))
    elif loaded_spec is not None and loaded_spec.resources.gpus > quota:
        problems.append(
            Problem(str(spec), f"a trial needs {loaded_spec.resources.gpus} GPUs but the quota is {quota}: "
                    "no trial could ever start", key="resources.gpus")
        )
    if problems:
        raise SweepInputError(problems)
    assert loaded_spec is not None
    return SweepInputs(loaded_combos, loaded_spec, train, val)
