"""Load and validate a sweep's inputs before anything runs.

Every problem is collected (not just the first) and reported with the file, the row
and the key it concerns, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import glob
import importlib
import io
import json
import math
import os
import re
import shutil
import sys
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema,
                      field_validator, model_validator)

from hpsweep.limits import (MAX_INPUT_FILE_BYTES, MAX_VALUE_CHARS, MAX_YAML_DEPTH, MLFLOW_MAX_KEY_CHARS,
                            MLFLOW_MAX_TAG_VALUE_CHARS, BoundedLoader, mlflow_key_problem, shortened, shown,
                            value_too_long, yaml_limit_hit)

Scalar = Union[bool, int, float, str]
MAX_MESSAGE_CHARS = 1000
Hparams = dict[str, Scalar]


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    row: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        # Messages quote values through `shown`; the cut is a backstop, no message floods the terminal.
        where = self.file
        if self.row is not None:
            where += f": row {self.row}"
        if self.key is not None:
            where += f": key '{shortened(self.key)}'"
        return f"{where}: {shortened(self.message, MAX_MESSAGE_CHARS)}"


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
    return f"not valid YAML: {shortened(what)}{where}"


def read_input_text(path: Path, encoding: str = "utf-8") -> str:
    """An input file's text, refused past MAX_INPUT_FILE_BYTES (read no further: `/dev/zero` ends too)."""
    name = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT_FILE_BYTES + 1)
        if len(data) > MAX_INPUT_FILE_BYTES:
            raise SweepInputError([Problem(name, f"the file is larger than {MAX_INPUT_FILE_BYTES // 2**20} MiB, "
                                                 "the limit for a combinations, spec or params file")])
        return data.decode(encoding)
    except (OSError, UnicodeDecodeError) as e:
        raise SweepInputError([Problem(name, f"cannot read the file: {shortened(str(e))}")]) from e


Place = Callable[[tuple[Any, ...]], tuple[Union[int, None], Union[str, None]]]


def key_place(path: tuple[Any, ...]) -> tuple[int | None, str | None]:
    """A spot in a YAML document as a Problem's (row, key): its keys joined with dots."""
    return None, ".".join(str(p) for p in path) or None


def load_yaml(name: str, text: str, place: Place = key_place, max_depth: int = MAX_YAML_DEPTH) -> Any:
    """``yaml.safe_load(text)`` once the document is known to stay within bounds (depth, size after
    aliases); else SweepInputError naming the spot past one (``place``: its row and key), or the
    YAML error."""
    try:
        hit = yaml_limit_hit(text, max_depth)
        if hit is None:
            return yaml.load(text, Loader=BoundedLoader)  # BoundedLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise SweepInputError([Problem(name, yaml_error_message(e))]) from e
    except RecursionError as e:  # a backstop: the scan bounds depth where the two parsers agree
        raise SweepInputError([Problem(name, "not valid YAML: nested too deep to read")]) from e
    raise SweepInputError([Problem(name, hit.message, *place(hit.path))])


# ---------------------------------------------------------------- combinations


def load_combinations(path: Path) -> list[Hparams]:
    """Read a YAML (`combinations:` list of mappings) or CSV (header row) file."""
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".csv"):
        raise SweepInputError(
            [Problem(name, f"unknown file type '{path.suffix}': use .yaml, .yml or .csv")]
        )
    text = read_input_text(path, encoding="utf-8-sig")  # -sig: a spreadsheet's BOM is not part of the first key
    if not text.strip():
        raise SweepInputError([Problem(name, "the file is empty")])
    if suffix == ".csv":
        header, rows, header_line = _csv_rows(name, text)
        problems = _check_rows(name, rows, expected=header, key_row=header_line)
    else:
        problems, rows = _yaml_rows(name, text)
        problems += _check_rows(name, rows)
    if problems:
        raise SweepInputError(problems)
    return [values for _, values in rows]


def _yaml_rows(name: str, text: str) -> tuple[list[Problem], list[tuple[int, dict[str, Any]]]]:
    doc = load_yaml(name, text, _combination_place)
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


def _combination_place(path: tuple[Any, ...]) -> tuple[int | None, str | None]:
    """A spot in a combinations YAML as (row, key): ``combinations[i].key`` is row i + 1."""
    if len(path) >= 2 and path[0] == "combinations" and isinstance(path[1], int):
        return path[1] + 1, (str(path[2]) if len(path) > 2 else None)
    return key_place(path)


_INT = re.compile(r"[+-]?\d+")


def parse_csv_value(text: str) -> Scalar:
    """Type a CSV cell the way a person reading it would: int, float, bool, else str. A cell past
    MAX_VALUE_CHARS stays text, to be refused as too long (int() stops at 4,300 digits)."""
    s = text.strip()
    if len(s) > MAX_VALUE_CHARS:
        return s
    if _INT.fullmatch(s):
        return int(s)
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    try:
        return float(s)
    except ValueError:
        return s


def _csv_rows(name: str, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]], int]:
    # Rows are numbered as file lines (the header is line 1 unless blank lines come first); a
    # StringIO with newline="" keeps a quoted cell's line breaks and the line count right.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _read_csv(name, reader)
    except csv.Error as e:
        raise SweepInputError([Problem(name, f"not valid CSV: {shortened(str(e))}", row=reader.line_num)]) from e


def _read_csv(name: str, reader) -> tuple[list[str], list[tuple[int, dict[str, Any]]], int]:
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
    return header, rows, header_line


def _check_rows(name: str, rows: list[tuple[int, dict[str, Any]]], expected: list[str] | None = None,
                key_row: int | None = None) -> list[Problem]:
    """Same keys on every row: a CSV's header, else the keys most rows have (the first row's on a tie).
    Keys are MLflow param keys, checked once (on ``key_row``, else the first row that has the key)."""
    problems: list[Problem] = []
    if expected is None:
        counts = Counter(frozenset(values) for _, values in rows)
        most = max(counts.values())
        expected = next(list(values) for _, values in rows if counts[frozenset(values)] == most)
    for key in expected:
        message = hparam_key_problem(key)
        if message:
            row = key_row if key_row is not None else next(r for r, values in rows if key in values)
            problems.append(Problem(name, message, row=row, key=key))
    seen: dict[str, int] = {}
    for row_no, values in rows:
        for key in expected:
            if key not in values or values[key] is None:
                problems.append(Problem(name, "missing value", row=row_no, key=key))
        for key in values:
            if key not in expected:
                problems.append(Problem(name, f"unexpected key (expected only: {', '.join(expected)})",
                                        row=row_no, key=key))
        bad_values = [Problem(name, message, row=row_no, key=key) for key, value in values.items()
                      if value is not None and (message := value_problem(value))]
        problems += bad_values
        tagged = 0 if bad_values else len(json.dumps(values))  # as hpsweep.store tags it (hpsweep.hparams)
        if tagged > MLFLOW_MAX_TAG_VALUE_CHARS:
            problems.append(Problem(name, f"the combination is {tagged:,} characters as JSON: MLflow's limit for "
                                          f"the tag that holds it is {MLFLOW_MAX_TAG_VALUE_CHARS:,}", row=row_no))
        canonical = canonical_json(values)
        if canonical in seen:
            problems.append(Problem(name, f"duplicate of row {seen[canonical]}", row=row_no))
        else:
            seen[canonical] = row_no
    return problems


# The spec's settings are MLflow params `settings.<name>` (hpsweep.store.tags.SETTINGS_PARAM_PREFIX).
SETTINGS_PARAM_PREFIX = "settings."


def hparam_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an hparam (an MLflow param key of every trial run); None: it can."""
    if key.startswith(SETTINGS_PARAM_PREFIX):
        return f"keys starting with '{SETTINGS_PARAM_PREFIX}' are the spec's settings in MLflow: rename it"
    return mlflow_key_problem(key)


def value_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an hparam or a setting; None: it can."""
    if not isinstance(value, (bool, int, float, str)):
        return f"value {shown(value)} is not a scalar (int, float, str or bool)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"value {value} is not a finite number"
    if isinstance(value, int) and value.bit_length() > 4 * MAX_VALUE_CHARS:  # surely too long: skip str()
        return value_too_long(value, int(value.bit_length() * math.log10(2)) + 1)
    length = len(str(value))
    return value_too_long(value, length) if length > MAX_VALUE_CHARS else None


def canonical_json(values: dict[str, Any]) -> str:
    """One spelling per combination: sorted keys, no whitespace (used for duplicates and keys)."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------- model spec


# A sweep's and a spec's name: an MLflow experiment and registered model, part of MLflow filters, of
# Prefect artifact keys and of the report folder reports/<name>: one plain path component, never '..'.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_MAX_CHARS = 200


def sweep_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a sweep; None: it can."""
    if len(name) > NAME_MAX_CHARS:
        return f"a name of {len(name):,} characters: the limit is {NAME_MAX_CHARS}"
    if not re.fullmatch(NAME_PATTERN, name, re.ASCII):
        return (f"{shown(name)} is not a sweep name: it names the MLflow experiment and the report folder "
                "reports/<name>, so it must start with a letter or digit and hold only letters, digits, "
                "'.', '_' and '-'")
    return None


def _valid_sweep_name(name: str) -> str:
    problem = sweep_name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


# The schema keeps the rule visible to Prefect's UI (a deployment's parameters) and to JSON Schema readers.
SweepName = Annotated[str, AfterValidator(_valid_sweep_name),
                      WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": NAME_MAX_CHARS})]


class TrainerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    entrypoint: str | None = Field(default=None, description="package.module:function")
    command: list[str] | None = Field(default=None, min_length=1, description="argv of an executable")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TrainerSpec":
        if (self.entrypoint is None) == (self.command is None):
            raise ValueError("give exactly one of 'entrypoint' or 'command'")
        return self


# Far above any host: a bound keeps a 4,000-digit `gpus:` out of every message that prints it.
MAX_GPUS_PER_TRIAL = 4096


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    gpus: int = Field(default=1, ge=1, le=MAX_GPUS_PER_TRIAL, description="GPUs (quota slots) one trial occupies")


class MetricSpec(BaseModel):
    """How hpsweep recomputes F1 from a trial's validation predictions, and how it bootstraps it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # macro: what both reference trainers compute (their `settings.average` default).
    average: Literal["binary", "macro", "micro", "weighted"] = Field(
        default="macro", description="how F1 averages over classes (as scikit-learn's f1_score)")
    pos_label: Any = Field(default=1, description="the positive class for average: binary (an int or a string)")
    resamples: int = Field(default=2000, ge=100, le=100_000, description="bootstrap resamples (B)")
    seed: int = Field(default=0, ge=0, description="the bootstrap's seed: the same seed, the same intervals")

    @field_validator("pos_label")
    @classmethod
    def _a_label(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected a class label (an integer or a string), got {shown(value)}")
        return value


class ModelSpec(BaseModel):
    """The model spec file (a public contract: keys may be added, never renamed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: SweepName | None = None
    trainer: TrainerSpec
    settings: dict[str, Scalar] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    time_limit_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # How the report judges the trials' F1s, not what a trial computes: excluded from the dump (the
    # spec hash and trial keys), so changing it re-judges finished trials instead of retraining them.
    metric: MetricSpec = Field(default_factory=MetricSpec, exclude=True)
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
            raise ValueError(f"expected a number of seconds (e.g. 3600), got {shown(value)}")
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
            raise ValueError(f"no file or folder matches {', '.join(shown(m) for m in missing)} (paths are "
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
    doc = load_yaml(name, read_input_text(path))
    if not isinstance(doc, dict):
        raise SweepInputError([Problem(name, "expected a mapping with at least a 'trainer:' key")])
    try:
        spec = ModelSpec.model_validate(doc)
    except ValidationError as e:
        problems = _pydantic_problems(name, e, ModelSpec)
        if not any(p.key == "trainer" or (p.key or "").startswith("trainer.") for p in problems):
            # The trainer itself is well-formed: still report an entry point / command that won't work.
            problems += check_trainer(name, TrainerSpec.model_validate(doc["trainer"]))
        raise SweepInputError(problems) from e
    problems = settings_problems(name, spec.settings)
    if spec.name is None:
        if sweep_name_problem(path.stem) is None:
            spec = spec.model_copy(update={"name": path.stem})
        else:
            problems.append(Problem(name, f"no name given, and the file's name {shown(path.stem)} is not a valid sweep "
                                          "name (letters, digits, '.', '_', '-'): add a name", key="name"))
    problems += check_trainer(name, spec.trainer)
    if problems:
        raise SweepInputError(problems)
    return spec


def settings_problems(name: str, settings: dict[str, Any]) -> list[Problem]:
    """The spec's settings within MLflow's limits: each is a param ``settings.<key>`` of every run, and
    all of them one tag (hpsweep.settings, JSON) on the sweep's run."""
    problems = []
    for key, value in settings.items():
        message = mlflow_key_problem(SETTINGS_PARAM_PREFIX + key)
        if message and len(SETTINGS_PARAM_PREFIX + key) > MLFLOW_MAX_KEY_CHARS:
            message = (f"a key of {len(key):,} characters: as the MLflow param '{SETTINGS_PARAM_PREFIX}<key>' "
                       f"it may have {MLFLOW_MAX_KEY_CHARS - len(SETTINGS_PARAM_PREFIX)}")
        message = message or value_problem(value)
        if message:
            problems.append(Problem(name, message, key=f"settings.{key}"))
    if not problems:
        tagged = len(json.dumps(settings, sort_keys=True, default=str))  # as the sweep tags it
        if tagged > MLFLOW_MAX_TAG_VALUE_CHARS:
            problems.append(Problem(name, f"the settings are {tagged:,} characters as JSON: MLflow's limit for the "
                                          f"tag that holds them is {MLFLOW_MAX_TAG_VALUE_CHARS:,}", key="settings"))
    return problems


_SCALAR_MEMBERS = {"bool", "int", "float", "str"}  # pydantic tags each Union[bool, int, float, str] attempt


def _pydantic_problems(name: str, error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    problems: list[Problem] = []
    for err in error.errors():
        loc = err["loc"]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(str(loc[-1]), _known_keys(model, loc[:-1]))
        elif err["type"] == "missing":
            msg = "required key is missing"
        if loc[:1] == ("settings",) and len(loc) == 3 and loc[2] in _SCALAR_MEMBERS:
            # One problem per setting, not one per member of the Scalar union it failed.
            loc, msg = loc[:2], f"value {shown(err['input'])} is not a scalar (int, float, str or bool)"
        problem = Problem(name, msg, key=".".join(str(p) for p in loc) or None)
        if problem not in problems:
            problems.append(problem)
    return problems


def _known_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The keys allowed where ``path`` leads inside ``model`` (nested models, optional or not)."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        candidates = (field.annotation, *typing.get_args(field.annotation))  # X, or the X of `X | None`
        nested = [t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    """Import ``package.module:function`` as `python -m` would from the working directory: the
    working directory first, then PYTHONPATH, then the installed packages (not the spec's folder).
    Trials run in the sweep's working directory, so they find the same module."""
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point '{shortened(entrypoint)}' must look like 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import error inside the user's module is still "cannot import"
        raise ImportError(f"cannot import module '{shortened(module_name)}': {type(e).__name__}: "
                          f"{shortened(str(e))}{_import_hint(module_name, e)}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"module '{shortened(module_name)}' has no attribute '{shortened(attr)}'")
    if not callable(fn):
        raise TypeError(f"'{shortened(entrypoint)}' is not callable")
    return fn


def _import_hint(module_name: str, error: Exception) -> str:
    """Where the module was looked for, when it is the module itself (or its package) that is missing;
    when something it imports is missing, which Python lacks it."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return ""
    parts = module_name.split(".")
    if error.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
        return f" (imported by '{shortened(module_name)}': install it for {sys.executable})"
    top = parts[0]
    found = sys.modules.get(top)
    if error.name != top and found is not None:  # the package is there, not this module of it
        where = list(getattr(found, "__path__", [])) or [getattr(found, "__file__", "?")]
        return f" (package '{shortened(top)}' was found in {shortened(str(where[0]))}, without '{error.name}')"
    pythonpath = os.environ.get("PYTHONPATH")
    return (f" (looked in the working directory {os.getcwd()}, then PYTHONPATH "
            f"({shortened(pythonpath) if pythonpath else 'not set'}), then the installed packages; the spec's "
            f"folder is not searched: run hpsweep from the folder that holds '{shortened(top)}', or add that "
            "folder to PYTHONPATH)")


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
    shown_program = shortened(program)
    if resolve_executable(program, base) is None:
        if "/" not in program:
            message = f"executable '{shown_program}' not found (not on PATH, or not executable)"
        elif (base / program).exists():
            message = f"executable '{shown_program}' is not executable (chmod +x it, or run it through its interpreter)"
        else:
            message = f"executable '{shown_program}' not found in {base}"
        problems.append(Problem(name, message, key="trainer.command"))
    for i, arg in script_arguments(command):
        path = base / arg
        if path.exists():
            continue
        message = f"file '{shortened(arg)}' (argv[{i}]) not found in {base}"
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


# ---------------------------------------------------------------- data

DATA_FILE_SUFFIXES = (".csv", ".tsv")  # checked for a header row and a row; other formats only for bytes
# Enough of a data file to see its header and first row; a file of tens of GB is not read further.
DATA_SAMPLE_BYTES = 64 * 1024


def data_problems(flag: str, path: Path) -> list[Problem]:
    """What makes ``path`` no data for ``flag``: missing, a folder with no file holding bytes, an empty
    file, a file whose name says no format (``/etc/passwd``), or a CSV/TSV file without a header row
    and at least one row (every trial would fail on it). Parquet, NumPy and other formats the
    trainer reads are only checked for bytes: hpsweep cannot judge them."""
    if not path.exists():
        return [Problem(str(path), f"{flag} data not found (expected a file or folder)")]
    if path.is_dir():
        # Folder datasets hold shards of any format: only their presence is checked.
        return [] if _holds_a_file_with_data(path) else [
            Problem(str(path), f"{flag} data is a folder with no file in it that holds any data")]
    message = _csv_file_problem(path)
    return [Problem(str(path), f"{flag} data {message}")] if message else []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _holds_a_file_with_data(folder: Path) -> bool:
    for root, _, files in os.walk(folder):  # stops at the first one
        for file in files:
            try:
                if os.stat(os.path.join(root, file)).st_size > 0:
                    return True
            except OSError:
                continue
    return False


def _csv_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a CSV file with a header and a row, judged from its first DATA_SAMPLE_BYTES."""
    if not path.suffix:
        return ("file has no suffix, so no format (.csv, .parquet, ...): name the data file by its format, "
                "or pass a folder")
    if path.suffix.lower() not in DATA_FILE_SUFFIXES:
        return None if _size(path) else "file is empty (0 bytes)"
    try:
        with path.open("rb") as f:
            sample = f.read(DATA_SAMPLE_BYTES)
            whole = len(sample) < DATA_SAMPLE_BYTES or not f.read(1)
    except OSError as e:
        return f"cannot be read: {shortened(str(e))}"
    if not sample:
        return "file is empty (0 bytes)"
    try:
        # The cut may fall inside a character: only a whole file must decode to its end.
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(sample, final=whole)
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        return "file is not text: a CSV file is UTF-8 text with a header row"
    lines = text.split("\n") if whole else text.split("\n")[:-1]  # the sample's last line may be cut short
    filled = [line for line in lines if line.strip()][:2]
    if not whole and len(filled) < 2:
        return None  # a header wider than the sample: not worth reading further to judge
    if not filled:
        return "file has only blank lines: a CSV file starts with a header row"
    if len(filled) < 2:
        return "file has a header row but no rows"
    return None


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
        problems += data_problems(flag, path)
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
