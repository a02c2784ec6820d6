"""Load and validate a sweep's inputs before anything runs.

Every problem is collected (not just the first) and reported with the file, the row
and the key it concerns, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import csv
import glob
import importlib
import io
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def yaml_error_message(e: yaml.YAMLError) -> str:
    """One line (PyYAML's own text spans several and names '<unicode string>')."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"not valid YAML: {what}{where}"


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
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's BOM is not part of the first key
    except (OSError, UnicodeDecodeError) as e:
        raise SweepInputError([Problem(name, f"cannot read the file: {e}")]) from e
    if not text.strip():
        raise SweepInputError([Problem(name, "the file is empty")])
    if suffix == ".csv":
        header, rows = _csv_rows(name, text)
        problems = _check_rows(name, rows, expected=header)
    else:
        problems, rows = _yaml_rows(name, text)
        problems += _check_rows(name, rows)
    if problems:
        raise SweepInputError(problems)
    return [values for _, values in rows]


def _yaml_rows(name: str, text: str) -> tuple[list[Problem], list[tuple[int, dict[str, Any]]]]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepInputError([Problem(name, yaml_error_message(e))]) from e
    if not isinstance(doc, dict) or "combinations" not in doc:
        raise SweepInputError([Problem(name, "expected a mapping with a 'combinations:' list")])
    problems = [Problem(name, "unknown top-level key (only 'combinations' is allowed)", key=str(k))
                for k in doc if k != "combinations"]
    combos = doc["combinations"]
    if combos is None or combos == []:
        raise SweepInputError(problems + [Problem(name, "no combinations", key="combinations")])
    if not isinstance(combos, list):
        raise SweepInputError(problems + [Problem(name, "must be a list of mappings", key="combinations")])
    rows = []
    for i, combo in enumerate(combos, start=1):
        if not isinstance(combo, dict) or not combo:
            problems.append(Problem(name, "a combination must be a non-empty mapping of key: value", row=i))
        else:
            rows.append((i, {str(k): v for k, v in combo.items()}))
    if not rows:
        raise SweepInputError(problems)
    return problems, rows


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


def _csv_rows(name: str, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    # Rows are numbered as file lines (the header is line 1 unless blank lines come first); a
    # StringIO with newline="" keeps a quoted cell's line breaks and the line count right.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _read_csv(name, reader)
    except csv.Error as e:
        raise SweepInputError([Problem(name, f"not valid CSV: {e}", row=reader.line_num)]) from e


def _read_csv(name: str, reader) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    for cells in reader:
        if any(c.strip() for c in cells):  # blank lines before the header are skipped
            break
    else:
        raise SweepInputError([Problem(name, "no header row (column names) found")])
    header_line = reader.line_num
    header = [h.strip() for h in cells]
    problems: list[Problem] = []
    if any(not h for h in header):
        problems.append(Problem(name, "the header has an empty column name", row=header_line))
    dupes = sorted({h for h in header if header.count(h) > 1})
    problems += [Problem(name, "column named twice in the header", row=header_line, key=h) for h in dupes]
    if problems:
        raise SweepInputError(problems)
    rows = []
    line_no = reader.line_num + 1
    for cells in reader:
        start, line_no = line_no, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue  # blank line
        row: dict[str, Any] = {}
        for i, cell in enumerate(cells):
            key = header[i] if i < len(header) else f"<column {i + 1}>"
            row[key] = parse_csv_value(cell) if cell.strip() else None
        rows.append((start, row))
    if not rows:
        raise SweepInputError([Problem(name, "no combinations: the file has a header but no rows")])
    return header, rows


def _check_rows(name: str, rows: list[tuple[int, dict[str, Any]]], expected: list[str] | None = None
                ) -> list[Problem]:
    """Same keys on every row: a CSV's header, else the keys most rows have (the first row's on a tie)."""
    problems: list[Problem] = []
    if expected is None:
        counts = Counter(frozenset(values) for _, values in rows)
        most = max(counts.values())
        expected = next(list(values) for _, values in rows if counts[frozenset(values)] == most)
    seen: dict[str, int] = {}
    for row_no, values in rows:
        for key in expected:
            if key not in values or values[key] is None:
                problems.append(Problem(name, "missing value", row=row_no, key=key))
        for key in values:
            if key not in expected:
                problems.append(Problem(name, f"unexpected key (expected only: {', '.join(expected)})",
                                        row=row_no, key=key))
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


# A sweep's and a spec's name: an MLflow experiment and registered model, part of MLflow filters and paths.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


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
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    trainer: TrainerSpec
    settings: dict[str, Scalar] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    time_limit_s: float | None = Field(default=None, gt=0)
    # A planning hint, not part of what a trial computes: excluded from the dump, so from the spec hash
    # and trial keys (changing the guess never retrains anything).
    expected_duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False, exclude=True,
                                              description="expected wall-clock seconds of one trial")
    # The files that make up the trainer (paths or globs, files or folders, relative to the working
    # directory). Excluded from the dump like the hint above: what counts is their content (the code
    # version), not how they are listed.
    code: list[str] | None = Field(default=None, min_length=1, exclude=True,
                                   description="the trainer's files and folders (default: its package/folder)")

    @field_validator("expected_duration_s", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # pydantic would read `true` as 1.0 and "90" as 90.0: a duration is written as a number.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"expected a number of seconds (e.g. 3600), got {value!r}")
        return value

    @field_validator("code")
    @classmethod
    def _code_exists(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if any(not entry.strip() for entry in value):
            raise ValueError("an entry is empty: give a path or glob relative to the working directory")
        missing = code_paths(value, Path.cwd())[1]
        if missing:
            raise ValueError(f"no file or folder matches {', '.join(repr(m) for m in missing)} (paths are "
                             f"relative to the working directory, {Path.cwd()})")
        return value


_GLOB = re.compile(r"[*?[]")


def code_paths(entries: list[str], cwd: Path) -> tuple[list[Path], list[str]]:
    """The files/folders that the spec's ``code:`` entries (paths or globs, relative to ``cwd``)
    name, and the entries that name nothing."""
    found: list[Path] = []
    missing: list[str] = []
    for entry in entries:
        if _GLOB.search(entry):
            matches = [cwd / m for m in sorted(glob.glob(entry, root_dir=cwd, recursive=True))]
        else:
            matches = [cwd / entry] if (cwd / entry).exists() else []
        if not matches:
            missing.append(entry)
        found += [Path(os.path.abspath(m)) for m in matches]
    return found, missing


def load_spec(path: Path) -> ModelSpec:
    name = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SweepInputError([Problem(name, f"cannot read the file: {e}")]) from e
    except yaml.YAMLError as e:
        raise SweepInputError([Problem(name, yaml_error_message(e))]) from e
    if not isinstance(doc, dict):
        raise SweepInputError([Problem(name, "expected a mapping with at least a 'trainer:' key")])
    try:
        spec = ModelSpec.model_validate(doc)
    except ValidationError as e:
        problems = _pydantic_problems(name, e)
        if not any(p.key == "trainer" or (p.key or "").startswith("trainer.") for p in problems):
            # The trainer itself is well-formed: still report an entry point / command that won't work.
            problems += check_trainer(name, TrainerSpec.model_validate(doc["trainer"]))
        raise SweepInputError(problems) from e
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    problems = check_trainer(name, spec.trainer)
    if problems:
        raise SweepInputError(problems)
    return spec


_SCALAR_MEMBERS = {"bool", "int", "float", "str"}  # pydantic tags each Union[bool, int, float, str] attempt


def _pydantic_problems(name: str, error: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for err in error.errors():
        loc = err["loc"]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        if loc[:1] == ("settings",) and len(loc) == 3 and loc[2] in _SCALAR_MEMBERS:
            # One problem per setting, not one per member of the Scalar union it failed.
            loc, msg = loc[:2], f"value {err['input']!r} is not a scalar (int, float, str or bool)"
        problem = Problem(name, msg, key=".".join(str(p) for p in loc) or None)
        if problem not in problems:
            problems.append(problem)
    return problems


def check_trainer(name: str, trainer: TrainerSpec, cwd: Path | None = None) -> list[Problem]:
    """What would stop the trainer from starting: an entry point that does not import, or a command
    whose program or scripts are not there (``cwd``: where trials run, default the working directory)."""
    if trainer.entrypoint is not None:
        try:
            resolve_entrypoint(trainer.entrypoint)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            return [Problem(name, str(e), key="trainer.entrypoint")]
        return []
    return command_problems(name, trainer.command or [], cwd)


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


# An argv element naming a script the command runs: it must exist before any trial starts.
SCRIPT_SUFFIXES = (".py", ".sh")
# Not a path: shell or Python code (`bash -c '…'`), an option's value, a URL, a glob.
_NOT_A_PATH = re.compile(r"""[\s;|&$`'"()<>*?\[\]{}=]|://""")


def script_arguments(command: list[str]) -> list[tuple[int, str]]:
    """(index, argument) of each argv element after the program that looks like a path to a script:
    it ends in .py/.sh or contains a '/', and is neither an option nor code (the value after -c)."""
    found = []
    for i, arg in enumerate(command[1:], start=1):
        if arg.startswith("-") or command[i - 1] == "-c" or _NOT_A_PATH.search(arg):
            continue
        if arg.endswith(SCRIPT_SUFFIXES) or "/" in arg:
            found.append((i, arg))
    return found


def resolve_executable(program: str, cwd: Path | None = None) -> str | None:
    """The absolute path a command's program runs from: a bare name through PATH, as the trial will
    find it; a path relative to ``cwd``. None when it is missing or not executable."""
    base = cwd or Path.cwd()
    found = shutil.which(program) if "/" not in program else shutil.which(str(base / program))
    return os.path.abspath(found) if found else None


def resolved_interpreter(spec: ModelSpec, cwd: Path | None = None) -> str | None:
    """The program that runs the spec's trainer: the command's argv[0] resolved now (a bare `python`
    through PATH), or this Python for an entry point (trials fork from this process). None: not found."""
    if spec.trainer.command is None:
        return sys.executable
    return resolve_executable(spec.trainer.command[0], cwd)


def command_problems(name: str, command: list[str], cwd: Path | None = None) -> list[Problem]:
    """One Problem (key trainer.command) for the program and for each script argument that is not there."""
    import difflib

    base = cwd or Path.cwd()
    problems = []
    program = command[0]
    if resolve_executable(program, base) is None:
        if "/" not in program:
            message = f"executable '{program}' not found (not on PATH, or not executable)"
        elif (base / program).exists():
            message = f"executable '{program}' is not executable (chmod +x it, or run it through its interpreter)"
        else:
            message = f"executable '{program}' not found in {base}"
        problems.append(Problem(name, message, key="trainer.command"))
    for i, arg in script_arguments(command):
        path = base / arg
        if path.exists():
            continue
        message = f"file '{arg}' (argv[{i}]) not found in {base}"
        try:
            siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        except OSError:
            siblings = []
        close = difflib.get_close_matches(path.name, siblings, n=1)
        if close:
            stem = arg.rstrip("/")
            message += f" (did you mean '{stem[:len(stem) - len(path.name)]}{close[0]}'?)"
        problems.append(Problem(name, message, key="trainer.command"))
    return problems


# ---------------------------------------------------------------- everything together


@dataclass(frozen=True)
class SweepInputs:
    combinations: list[Hparams]
    spec: ModelSpec
    train: Path
    val: Path


def load_inputs(combinations: Path, spec: Path, train: Path, val: Path, quota: int,
                host_gpus: tuple[int, ...] = ()) -> SweepInputs:
    """Validate all inputs; raise one SweepInputError listing every problem found.

    ``host_gpus``: the GPUs of the host the trials run on (local launcher); a trial needing more
    than there are could never start. Empty: a CPU host, or trials run elsewhere (no check).
    """
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
    elif loaded_spec is not None and host_gpus and loaded_spec.resources.gpus > len(host_gpus):
        problems.append(
            Problem(str(spec), f"a trial needs {loaded_spec.resources.gpus} GPUs but this host has "
                    f"{len(host_gpus)} ({','.join(map(str, host_gpus))}): no trial could ever start",
                    key="resources.gpus")
        )
    if problems:
        raise SweepInputError(problems)
    assert loaded_spec is not None
    return SweepInputs(loaded_combos, loaded_spec, train, val)
