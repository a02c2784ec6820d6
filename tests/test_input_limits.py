"""Names and values that would pass hpsweep's checks yet fail later (in MLflow, in the report, in
PyYAML itself) are refused at validation, in milliseconds, each with one short message naming the
file, row and key: MLflow's limits on keys and values, non-finite numbers, over-long values, deep or
alias-expanded YAML, oversized files, unsafe sweep names and data that is no data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpsweep import limits
from hpsweep.config import SweepConfig, build_config, read_params
from hpsweep.inputs import (SETTINGS_PARAM_PREFIX, Problem, SweepInputError,
                            data_problems, load_combinations, load_inputs, load_spec)
from hpsweep.limits import MAX_VALUE_CHARS, mlflow_key_problem, shown

TRAINER = "trainer: {entrypoint: 'tests.trainers:sleepy'}\n"
# Whatever a message quotes, a line stays short: the quote (~200) plus file, row, key and words.
MAX_LINE = 700


def problems_of(load, path: Path) -> list[Problem]:
    with pytest.raises(SweepInputError) as info:
        load(path)
    for problem in info.value.problems:
        assert len(str(problem)) < MAX_LINE and "\n" not in str(problem), str(problem)[:2000]
    return info.value.problems


def combos(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def spec(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TRAINER + text)
    return path


# ---------------------------------------------------------------- MLflow's own limits


def test_the_mirrored_limits_are_mlflows():
    from mlflow.utils import validation

    assert limits.MLFLOW_MAX_KEY_CHARS == validation.MAX_ENTITY_KEY_LENGTH
    assert limits.MLFLOW_MAX_PARAM_VALUE_CHARS == validation.MAX_PARAM_VAL_LENGTH
    assert limits.MLFLOW_MAX_TAG_VALUE_CHARS == validation.MAX_TAG_VAL_LENGTH
    # A value fits a param (and PostgreSQL's varchar(8000)) with room to spare.
    assert MAX_VALUE_CHARS < min(validation.MAX_PARAM_VAL_LENGTH, 8000)


def test_the_settings_prefix_is_the_stores():
    from hpsweep.store.tags import SETTINGS_PARAM_PREFIX as STORES

    assert SETTINGS_PARAM_PREFIX == STORES


KEYS = ["lr", "learning rate", "a/b", "x:y", "é", "hidden.size", "-x", "k" * 250, "settings...", " lr",
        "../x", "..", ".", "/abs", "a/../b", "a//b", "a/", "./a", "", "k" * 251, "a\nb", "a\n", "lr!", "[/x]",
        "a'b", 'a"b', "a\\b", "a\tb", "x;y", "$HOME"]


@pytest.mark.parametrize("key", KEYS)
def test_a_key_is_refused_exactly_when_mlflow_refuses_it(key: str):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param

    try:
        _validate_param(key, "1")
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    # Stricter only where MLflow's `$` lets a trailing newline through.
    assert (mlflow_key_problem(key) is not None) == (mlflow_refuses or key == "a\n"), key


def test_hparam_keys_mlflow_refuses_are_named_with_their_row(tmp_path: Path):
    path = combos(tmp_path, "combinations:\n  - {lr: 1, ../x: 2, %s: 3}\n  - {lr: 2, ../x: 3, %s: 4}\n"
                  % ("k" * 300, "k" * 300))
    problems = problems_of(load_combinations, path)
    assert [(p.row, p.key) for p in problems] == [(1, "../x"), (1, "k" * 300)]
    assert problems[0].message == "MLflow refuses path-like param keys: this one is '.' or starts with '..' or '/'"
    assert problems[1].message == "a key of 300 characters: MLflow's limit for a param key is 250"
    assert str(problems[1]).count("k") < 220  # the key is quoted shortened too


def test_csv_header_keys_are_checked_on_the_header_row(tmp_path: Path):
    path = combos(tmp_path, "lr,a/../b,settings.epochs\n0.1,1,2\n", "c.csv")
    assert [(p.row, p.key, p.message) for p in problems_of(load_combinations, path)] == [
        (1, "a/../b", "MLflow refuses path-like param keys: this one would resolve to 'b'"),
        (1, "settings.epochs", "keys starting with 'settings.' are the spec's settings in MLflow: rename it")]


def test_a_combination_too_long_for_its_mlflow_tag_is_refused(tmp_path: Path):
    # Each value is allowed; together, as the JSON tag hpsweep.hparams, they pass MLflow's 8,000.
    row = ", ".join(f"k{i}: {'x' * 900}" for i in range(9))
    path = combos(tmp_path, f"combinations:\n  - {{{row}}}\n  - {{{row.replace('x', 'y')}}}\n")
    problems = problems_of(load_combinations, path)
    assert [(p.row, p.key) for p in problems] == [(1, None), (2, None)]
    assert problems[0].message == ("the combination is 8,190 characters as JSON: MLflow's limit for the tag "
                                   "that holds it is 8,000")
    shorter = combos(tmp_path, f"combinations:\n  - {{{', '.join(f'k{i}: {chr(120) * 800}' for i in range(9))}}}\n")
    assert len(json.dumps(load_combinations(shorter)[0])) < 8000


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("length, refused", [(MAX_VALUE_CHARS, False), (MAX_VALUE_CHARS + 1, True), (9000, True)])
def test_value_length(tmp_path: Path, length: int, refused: bool):
    for path in (combos(tmp_path, f"combinations:\n  - {{lr: 1, note: {'v' * length}}}\n"),
                 combos(tmp_path, f"lr,note\n1,{'v' * length}\n", "c.csv")):
        if not refused:
            assert load_combinations(path)[0]["note"] == "v" * length
            continue
        (problem,) = problems_of(load_combinations, path)
        assert (problem.row, problem.key) == (1 if path.suffix == ".yaml" else 2, "note")
        assert problem.message == f"value {shown('v' * length)} is {length:,} characters long: the limit is 1,000"
        assert "v" * 200 + "…'" in problem.message and "v" * 201 not in problem.message


@pytest.mark.parametrize("text", ["1" * 5000, "0x" + "f" * 990, "-" + "9" * 4400])
def test_an_integer_too_long_to_print_is_a_long_value_not_a_crash(tmp_path: Path, text: str):
    # PyYAML's and the CSV reader's int() stop at 4,300 digits with a ValueError (a traceback before);
    # 990 hex digits are 1,193 decimal ones (a CSV cell keeps `0x…` as text, short enough).
    paths = [combos(tmp_path, f"combinations:\n  - {{lr: {text}}}\n")]
    paths += [combos(tmp_path, f"lr\n{text}\n", "c.csv")] if not text.startswith("0x") else []
    for path in paths:
        (problem,) = problems_of(load_combinations, path)
        assert problem.key == "lr" and "characters long: the limit is 1,000" in problem.message


def test_non_finite_numbers_are_refused_and_huge_finite_ones_pass(tmp_path: Path):
    path = combos(tmp_path, "combinations:\n  - {lr: .inf, wd: 1}\n  - {lr: 1.0e+308, wd: .nan}\n"
                            "  - {lr: -.inf, wd: 2}\n")
    assert [(p.row, p.key, p.message) for p in problems_of(load_combinations, path)] == [
        (1, "lr", "value inf is not a finite number"), (2, "wd", "value nan is not a finite number"),
        (3, "lr", "value -inf is not a finite number")]
    assert load_combinations(combos(tmp_path, "combinations:\n  - {lr: 1.0e+308}\n  - {lr: -1.0e-308}\n")) == [
        {"lr": 1e308}, {"lr": -1e-308}]


# ---------------------------------------------------------------- YAML: depth, aliases, size

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else 'lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefg"], "abcdefgh")) + "combinations: [{lr: *h}]\n"


def test_an_alias_bomb_is_refused_before_anything_expands_it(tmp_path: Path):
    # 9**8 = 43 million values from a few hundred bytes (the observed one: 105 s and 226 MB of stderr).
    assert len(BOMB) < 400
    (problem,) = problems_of(load_combinations, combos(tmp_path, BOMB))  # how fast: bench/input_limits_bench.py
    assert problem.message == "more than 2,000,000 values once aliases are expanded"


def test_aliases_within_bounds_still_work(tmp_path: Path):
    path = combos(tmp_path, "base: &base {lr: 0.1, wd: 0}\ncombinations:\n  - {<<: *base, depth: 2}\n"
                            "  - {<<: *base, depth: 3}\n")
    with pytest.raises(SweepInputError, match="unknown top-level key"):  # `base:` is not allowed...
        load_combinations(path)
    path.write_text("combinations:\n  - &base {lr: 0.1, depth: 2}\n  - {<<: *base, depth: 3}\n")
    assert load_combinations(path) == [{"lr": 0.1, "depth": 2}, {"lr": 0.1, "depth": 3}]  # ...an anchor is


def test_a_recursive_alias_is_refused(tmp_path: Path):
    (problem,) = problems_of(load_combinations, combos(tmp_path, "combinations:\n  - &a {lr: [1, *a]}\n"))
    assert (problem.row, problem.key) == (1, "lr")
    assert problem.message == "the alias *a refers to a value that contains it (a recursive document)"


@pytest.mark.parametrize("depth", [9, 10_000])
def test_deep_nesting_is_refused_without_recursing(tmp_path: Path, depth: int):
    # A list 10,000 deep: PyYAML's composer recursed into RecursionError (and its scanner takes 15 s).
    path = combos(tmp_path, "combinations:\n  - {lr: " + "[" * depth + "]" * depth + "}\n")
    (problem,) = problems_of(load_combinations, path)
    assert (problem.row, problem.key, problem.message) == (1, "lr", "nested deeper than 8 levels")


def test_nesting_within_the_bound_is_an_ordinary_non_scalar(tmp_path: Path):
    (problem,) = problems_of(load_combinations, combos(tmp_path, "combinations:\n  - {lr: [[[[[1]]]]]}\n"))
    assert problem.message == "value [[[[...]]]] is not a scalar (int, float, str or bool)"


def test_an_alias_that_nests_too_deep_once_expanded(tmp_path: Path):
    path = combos(tmp_path, "combinations:\n  - {lr: 1, x: &d [[[[[1]]]]]}\n  - {lr: 2, x: [[[*d]]]}\n")
    (problem,) = problems_of(load_combinations, path)
    assert (problem.row, problem.key) == (2, "x")
    assert problem.message == "nested deeper than 8 levels once aliases are expanded"


def test_files_past_the_size_limit_are_not_read(tmp_path: Path):
    path = combos(tmp_path, "lr\n" + "0.1\n" * (limits.MAX_INPUT_FILE_BYTES // 4 + 1), "c.csv")
    (problem,) = problems_of(load_combinations, path)
    assert problem.message == "the file is larger than 10 MiB, the limit for a combinations, spec or params file"
    (problem,) = problems_of(load_spec, Path("/dev/zero"))  # endless: read no further than the limit
    assert problem.message.startswith("the file is larger than 10 MiB")


def test_a_huge_value_costs_nothing_to_quote():
    assert shown("x" * 10_000_000) == repr("x" * 200)[:-1] + "…'"
    assert shown("it's" * 100) .endswith('…"')
    nested: list = []
    for _ in range(10_000):
        nested = [nested]
    assert shown(nested) == "[[[[...]]]]"
    assert shown(int("9" * 4000) ** 2) == "<an integer of 26,576 bits>"


# ---------------------------------------------------------------- the spec


def test_settings_obey_the_same_limits(tmp_path: Path):
    path = spec(tmp_path, "settings: {lr: .inf, %s: 1, ok: 2, note: %s, a/../b: 3, %s: 4}\n"
                % ("k" * 242, "v" * 1200, "k" * 241))
    problems = problems_of(load_spec, path)
    assert [(p.key, p.message) for p in problems] == [
        ("settings.lr", "value inf is not a finite number"),
        ("settings." + "k" * 242, "a key of 242 characters: as the MLflow param 'settings.<key>' it may have 241"),
        ("settings.note", f"value {shown('v' * 1200)} is 1,200 characters long: the limit is 1,000"),
        ("settings.a/../b", "MLflow refuses path-like param keys: this one would resolve to 'b'"),
    ]


def test_settings_too_long_for_their_mlflow_tag(tmp_path: Path):
    path = spec(tmp_path, "settings: {%s}\n" % ", ".join(f"k{i}: {'x' * 900}" for i in range(9)))
    (problem,) = problems_of(load_spec, path)
    assert problem.key == "settings" and problem.message.startswith("the settings are 8,")


@pytest.mark.parametrize("text, key, message", [
    (f"time_limit_s: {'1' * 5000}\n", "time_limit_s", "Input should be a finite number"),  # a traceback before
    ("time_limit_s: .inf\n", "time_limit_s", "Input should be a finite number"),
    (f"resources: {{gpus: 0x{'f' * 3900}}}\n", "resources.gpus", "less than or equal to 4096"),  # str() fails
    (f"settings: {{x: {'1' * 5000}}}\n", "settings.x", "is 5,000 characters long: the limit is 1,000"),
])
def test_spec_numbers_too_big_to_handle_are_refused(tmp_path: Path, text: str, key: str, message: str):
    (problem,) = problems_of(load_spec, spec(tmp_path, text))
    assert problem.key == key and message in problem.message


BAD_NAMES = ["../../x", "/abs/path", "..", ".", "...", "it's", "a" * 201, "é", "naïve", "a b", "x/y", "-x", "a\n",
             "", "reports/../../x", "_x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_sweep_names_are_refused_in_the_spec_and_on_the_command_line(tmp_path: Path, name: str):
    (problem,) = problems_of(load_spec, spec(tmp_path, f"name: {json.dumps(name)}\n"))
    assert problem.key == "name"
    with pytest.raises(SweepInputError) as info:
        build_config({"combinations": "c", "spec": "s", "train": "t", "val": "v", "name": name}, tmp_path / "p.yaml")
    (problem,) = info.value.problems
    assert problem.file == "--name"
    assert problem.message == (f"a name of {len(name)} characters: the limit is 200" if len(name) > 200 else
                               f"{shown(name)} is not a sweep name: it names the MLflow experiment and the report "
                               "folder reports/<name>, so it must start with a letter or digit and hold only "
                               "letters, digits, '.', '_' and '-'")


def test_a_spec_without_a_name_needs_a_file_name_that_is_one(tmp_path: Path):
    (problem,) = problems_of(load_spec, spec(tmp_path, "", "it's.yaml"))
    assert problem.key == "name" and problem.message.startswith("no name given, and the file's name \"it's\" is not")
    assert load_spec(spec(tmp_path, "", "digits-v2.yaml")).name == "digits-v2"


def test_an_accepted_name_keeps_the_default_report_folder_inside_reports(tmp_path: Path):
    # Every printable ASCII character, alone, doubled and around dots: what passes is one plain folder
    # name under reports/ (close_sweep's default: reports/<name>).
    candidates = {c * n for c in map(chr, range(32, 127)) for n in (1, 2, 3)}
    candidates |= {f"{a}{b}" for a in (".", "..", "/", "a") for b in ("", ".", "..", "/", "/..", "a")}
    reports = (tmp_path / "reports").resolve()
    accepted = []
    for name in sorted(candidates):
        try:
            SweepConfig(combinations="c", spec="s", train="t", val="v", name=name)
        except ValueError:
            continue
        accepted.append(name)
        assert (reports / name).resolve().parent == reports and not Path(name).is_absolute(), name
    assert "a" in accepted and ".." not in accepted and "/" not in accepted


# ---------------------------------------------------------------- data


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


NOT_TEXT = "--val data file is not text: a CSV file is UTF-8 text with a header row"


@pytest.mark.parametrize("name, data, message", [
    ("val.csv", b"", "--val data file is empty (0 bytes)"),
    ("val.csv", "label,p0\n", "--val data file has a header row but no rows"),
    ("val.csv", "label,p0\n\n  \n", "--val data file has a header row but no rows"),
    ("val.csv", "\n\n", "--val data file has only blank lines: a CSV file starts with a header row"),
    ("val.csv", b"\x89PNG\r\n\x1a\n\x00\x00", NOT_TEXT),
    ("val.csv", b"label\n\xff\xfe\n", NOT_TEXT),
    ("passwd", "root:x:0:0:root:/root:/bin/bash\n", "--val data file has no suffix, so no format (.csv, .parquet, ...): name the data file by its format, or pass a folder"),
    ("val.parquet", b"", "--val data file is empty (0 bytes)"),
])
def test_data_that_is_no_data_is_refused(tmp_path: Path, name: str, data: bytes | str, message: str):
    path = write(tmp_path / name, data)
    assert data_problems("--val", path) == [Problem(str(path), message)]


def test_etc_passwd_is_not_data():
    assert data_problems("--train", Path("/etc/passwd"))[0].message.startswith("--train data file has no suffix")


def test_formats_hpsweep_cannot_read_are_only_checked_for_bytes(tmp_path: Path):
    # A trainer may read Parquet, NumPy or compressed CSV: those stay data, as before.
    for name in ("train.parquet", "train.npz", "train.csv.gz"):
        assert data_problems("--train", write(tmp_path / name, b"PAR1")) == []


@pytest.mark.parametrize("name, data", [
    ("t.csv", "x\n1\n"), ("t.CSV", "\ufefflabel,p0\r\n1,2\r\n"), ("t.tsv", "a\tb\n1\t2\n"),
    ("t.csv", "\n\nlabel,note\n1,\"two\nlines\"\n"), ("t.csv", "é,ü\n1,2\n"),
])
def test_csv_data_files_pass(tmp_path: Path, name: str, data: str):
    assert data_problems("--train", write(tmp_path / name, data)) == []


def test_a_huge_data_file_is_judged_from_its_first_bytes(tmp_path: Path):
    # A 20 GiB (sparse) file: only the first 64 KiB are read. A character cut at that boundary is fine.
    path = write(tmp_path / "big.csv", "label,note\n" + "1,é\n" * 30_000)
    with path.open("r+b") as f:
        f.truncate(20 * 2**30)
    assert data_problems("--train", path) == []  # how fast: bench/input_limits_bench.py
    wide = write(tmp_path / "wide.csv", ",".join(f"p{i}" for i in range(20_000)) + "\n" + "1," * 19_999 + "1\n")
    assert data_problems("--train", wide) == []  # a header wider than what is read is not judged


def test_data_folders_need_a_file_with_bytes_in_them(tmp_path: Path):
    folder = tmp_path / "shards"
    folder.mkdir()
    assert [p.message for p in data_problems("--train", folder)] == [
        "--train data is a folder with no file in it that holds any data"]
    write(folder / "nested" / "empty.csv", b"")
    assert data_problems("--train", folder) != []
    write(folder / "nested" / "part-0.bin", b"\x00\x01")  # a shard of any format will do
    assert data_problems("--train", folder) == []


def test_load_inputs_reports_data_problems_with_the_rest(tmp_path: Path):
    good = write(tmp_path / "train.csv", "x\n1\n")
    empty = write(tmp_path / "val.csv", b"")
    path = combos(tmp_path, "combinations:\n  - {../x: 1}\n")
    with pytest.raises(SweepInputError) as info:
        load_inputs(path, spec(tmp_path, ""), good, empty, 1)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: row 1: key '../x': MLflow refuses path-like param keys: this one is '.' or starts with '..' or '/'",
        f"{empty}: --val data file is empty (0 bytes)"]


# ---------------------------------------------------------------- params.yaml


def test_params_yaml_is_bounded_too(tmp_path: Path):
    params = write(tmp_path / "params.yaml", BOMB.replace("combinations", "sweep"))
    with pytest.raises(SweepInputError, match=r"more than 2,000,000 values once aliases are expanded$"):
        read_params(params)
    # Other stages' settings may nest deeper than a sweep's files and hold long text.
    write(params, "train:\n  a: {b: {c: {d: {e: {f: {g: {h: {i: 1}}}}}}}}\n  prompt: %s\nsweep: {quota: 2}\n"
          % ("p" * 5000))
    assert read_params(params) == {"quota": 2}


def test_problem_lines_stay_short_whatever_they_quote():
    problem = Problem("f.yaml", "m" * 5000, row=1, key="k" * 5000)
    assert len(str(problem)) < 1300
    assert os.linesep not in str(problem)


def test_an_unknown_spec_key_suggests_the_closest_known_one(tmp_path: Path):
    from hpsweep.inputs import SweepInputError, load_spec

    spec = write(tmp_path / "spec.yaml", "name: x\ntrainer:\n  entry_point: trainer.reference:train\n"
                                          "setings: {a: 1}\nresources: {gpu: 1}\ncolour: blue\n")
    with pytest.raises(SweepInputError) as e:
        load_spec(spec)
    assert {(p.key, p.message) for p in e.value.problems} >= {
        ("trainer.entry_point", "unknown key (did you mean 'entrypoint'?)"),
        ("setings", "unknown key (did you mean 'settings'?)"),
        ("resources.gpu", "unknown key (did you mean 'gpus'?)"),
        ("colour", "unknown key")}
