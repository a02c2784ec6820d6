"""Input validation, in process and fast: the sample files under tests/data load to typed values
or fail with one Problem per thing to fix, each naming the file, the row and the key.

Row numbers: a YAML file's row N is its N-th combination; a CSV file's row N is line N of the file
(the header is row 1, so the first combination is row 2), as a spreadsheet shows it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from hpsweep.config import SweepConfig, build_config, read_params
from hpsweep.inputs import (ModelSpec, Problem, SweepInputError, load_combinations, load_inputs, load_spec,
                            parse_csv_value, resolved_interpreter)

DATA = Path(__file__).resolve().parent / "data"
VALID = DATA / "valid"
INVALID = DATA / "invalid"

# file under tests/data/invalid -> the problems it must produce, in order: (row, key, message regex).
INVALID_COMBINATIONS: dict[str, list[tuple[int | None, str | None, str]]] = {
    "combos_missing_key.yaml": [(3, "lr", r"^missing value$")],
    "combos_missing_value.csv": [(3, "hidden", r"^missing value$")],
    "combos_extra_key.yaml": [(2, "dropout", r"^unexpected key \(expected only: lr, hidden\)$")],
    "combos_extra_key.csv": [(3, "<column 3>", r"^unexpected key \(expected only: lr, hidden\)$")],
    "combos_nonscalar.yaml": [(2, "hidden", r"^value \[32, 64\] is not a scalar \(int, float, str or bool\)$")],
    "combos_duplicate.csv": [(4, None, r"^duplicate of row 2$")],
    "combos_nan.yaml": [(2, "lr", r"^value nan is not a finite number$")],
    "combos_inf.csv": [(4, "lr", r"^value inf is not a finite number$")],
    "combos_empty.yaml": [(None, None, r"^the file is empty$")],
    "combos_no_rows.csv": [(None, None, r"^no combinations: the file has a header but no rows$")],
    "combos_empty_list.yaml": [(None, "combinations", r"^no combinations$")],
    "combos.txt": [(None, None, r"^unknown file type '\.txt': use \.yaml, \.yml or \.csv$")],
    "combos_not_yaml.yaml": [(None, None, r"^not valid YAML: .* \(line 3, column 5\)$")],
    "combos_several.yaml": [
        (2, "hidden", r"^missing value$"),
        (3, "hidden", r"^value \{'a': 1\} is not a scalar"),
        (4, "lr", r"^value inf is not a finite number$"),
        (5, None, r"^duplicate of row 1$"),
    ],
}

INVALID_SPECS: dict[str, list[tuple[int | None, str | None, str]]] = {
    "spec_unknown_key.yaml": [(None, "epochs", r"^unknown key$")],
    "spec_both_trainers.yaml": [(None, "trainer", r"^give exactly one of 'entrypoint' or 'command'$")],
    "spec_empty_trainer.yaml": [(None, "trainer", r"^give exactly one of 'entrypoint' or 'command'$")],
    "spec_no_trainer.yaml": [(None, "trainer", r"^required key is missing$")],
    "spec_bad_entrypoint.yaml": [
        (None, "trainer.entrypoint", r"^cannot import module 'no_such_module_for_hpsweep_tests': ModuleNotFoundError")],
    "spec_bad_entrypoint_attr.yaml": [
        (None, "trainer.entrypoint", r"^module 'tests\.trainers' has no attribute 'no_such_function'$")],
    "spec_missing_command.yaml": [
        (None, "trainer.command", r"^executable 'no-such-executable-for-hpsweep-tests' not found")],
    "spec_missing_script.yaml": [
        (None, "trainer.command", r"^file 'trainers/sm_gleu\.sh' \(argv\[1\]\) not found in /")],
    "spec_missing_program_path.yaml": [
        (None, "trainer.command", r"^executable '\./no-such-trainer-for-hpsweep-tests' not found in /")],
    "spec_missing_command_and_script.yaml": [
        (None, "trainer.command", r"^executable 'no-such-executable-for-hpsweep-tests' not found"),
        (None, "trainer.command", r"^file 'no_such_script_for_hpsweep_tests\.py' \(argv\[1\]\) not found in /")],
    "spec_bad_gpus.yaml": [(None, "resources.gpus", r"greater than or equal to 1")],
    "spec_nonscalar_setting.yaml": [
        (None, "settings.layers", r"^value \[64, 32\] is not a scalar \(int, float, str or bool\)$")],
    "spec_bad_time_limit.yaml": [(None, "time_limit_s", r"greater than 0")],
    "spec_bad_duration.yaml": [
        (None, "expected_duration_s", r"^expected a number of seconds \(e\.g\. 3600\), got '2h'$")],
    "spec_not_mapping.yaml": [(None, None, r"^expected a mapping with at least a 'trainer:' key$")],
    "spec_several.yaml": [
        (None, "resources.gpus", r"greater than or equal to 1"),
        (None, "epochs", r"^unknown key$"),
        (None, "trainer.entrypoint", r"^cannot import module 'no_such_module_for_hpsweep_tests'"),
    ],
}


def assert_problems(error: SweepInputError, path: Path, expected: list[tuple[int | None, str | None, str]]):
    got = [(p.file, p.row, p.key) for p in error.problems]
    assert got == [(str(path), row, key) for row, key, _ in expected], "\n".join(map(str, error.problems))
    for problem, (row, key, pattern) in zip(error.problems, expected):
        assert re.search(pattern, problem.message), str(problem)
        # What the user reads: file, then row and key where there is one, then the message.
        where = str(path) + (f": row {row}" if row is not None else "") + (f": key '{key}'" if key else "")
        assert str(problem) == f"{where}: {problem.message}"
        assert "\n" not in str(problem)
    # The exception's own text lists every problem, one per line.
    assert str(error).splitlines() == [str(p) for p in error.problems]


# ---------------------------------------------------------------- valid files


def test_yaml_combinations_keep_their_types():
    assert load_combinations(VALID / "combos.yaml") == [
        {"lr": 0.001, "hidden": 64, "activation": "relu", "early_stopping": True},
        {"lr": 0.01, "hidden": 32, "activation": "tanh", "early_stopping": False},
        {"lr": 1e-4, "hidden": 128, "activation": "relu", "early_stopping": True},
    ]
    types = [type(v) for v in load_combinations(VALID / "combos.yaml")[0].values()]
    assert types == [float, int, str, bool]


def test_csv_values_are_typed_sensibly():
    combos = load_combinations(VALID / "combos.csv")
    assert combos == [
        {"lr": 0.1, "hidden": 3, "activation": "relu", "early_stopping": True},
        {"lr": 0.001, "hidden": 64, "activation": "tanh", "early_stopping": False},
        {"lr": 0.5, "hidden": -2, "activation": "logistic", "early_stopping": True},
    ]
    for combo in combos:  # 3 is an int (not 3.0), true is a bool (not the string), relu stays a string
        assert [type(v) for v in combo.values()] == [float, int, str, bool]


@pytest.mark.parametrize("text, value", [("3", 3), ("-2", -2), ("+7", 7), ("0.1", 0.1), ("1e-3", 0.001),
                                         ("true", True), ("False", False), ("TRUE", True), ("relu", "relu"),
                                         (" 64 ", 64), ("3.0", 3.0), ("0x10", "0x10")])
def test_parse_csv_value(text: str, value):
    parsed = parse_csv_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_csv_from_a_spreadsheet_bom_and_crlf():
    # Excel writes a UTF-8 byte-order mark and CRLF line ends: neither may leak into keys or values.
    assert load_combinations(VALID / "combos_excel.csv") == [{"lr": 0.1, "hidden": 32}, {"lr": 0.01, "hidden": 64}]


def test_full_spec_loads_every_key():
    spec = load_spec(VALID / "spec.yaml")
    assert spec.name == "digits-mlp"
    assert spec.trainer.entrypoint == "tests.trainers:sleepy" and spec.trainer.command is None
    assert spec.settings == {"epochs": 10, "seed": 0, "optimizer": "adam", "warmup": 0.1, "shuffle": True}
    assert type(spec.settings["epochs"]) is int and type(spec.settings["shuffle"]) is bool
    assert spec.resources.gpus == 1
    assert spec.time_limit_s == 7200
    assert spec.expected_duration_s == 5400


def test_minimal_spec_defaults_name_to_file_stem_and_one_gpu():
    spec = load_spec(VALID / "minimal-spec.yaml")
    assert spec.name == "minimal-spec"
    assert spec.resources.gpus == 1
    assert spec.settings == {} and spec.time_limit_s is None and spec.expected_duration_s is None


def test_command_trainer_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # trials run in the working directory: the script is found there
    (tmp_path / "my_train.py").write_text("print('training')\n")
    path = tmp_path / "cmd.yaml"
    # Options, option values, URLs, globs and code after -c are not scripts: none of them must exist.
    argv = [sys.executable, "my_train.py", "--fast", "--out", "--model=results/m.pkl", "s3://bucket/data",
            "data/*.csv", "-c", "import x; x.run('a/b')"]
    path.write_text(f"trainer:\n  command: {argv!r}\n")
    spec = load_spec(path)
    assert spec.trainer.command == argv and spec.trainer.entrypoint is None
    assert spec.name == "cmd"


def test_a_typo_in_the_commands_script_is_caught_with_the_likely_name(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sm_glue.py").write_text("print('training')\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tree.yaml").write_text("{}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(f"trainer:\n  command: [{sys.executable!r}, sm_gleu.py, --config, conf/tre.yaml]\n")
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: key 'trainer.command': file 'sm_gleu.py' (argv[1]) not found in {tmp_path} "
        "(did you mean 'sm_glue.py'?)",
        f"{path}: key 'trainer.command': file 'conf/tre.yaml' (argv[3]) not found in {tmp_path} "
        "(did you mean 'conf/tree.yaml'?)"]


def test_the_interpreter_is_resolved_through_path_as_the_trial_will_find_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    # Which `python` a command means depends on PATH: resolved now, so the plan can show it.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/sh\n")
    (venv_bin / "python").chmod(0o755)
    (tmp_path / "train.py").write_text("print('training')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "spec.yaml"
    path.write_text("trainer:\n  command: [python, train.py]\n")
    assert resolved_interpreter(load_spec(path)) == str(venv_bin / "python")
    (venv_bin / "python").chmod(0o644)  # not executable: the trial could not start it
    path.write_text("trainer:\n  command: [./venv/bin/python, train.py]\n")
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: key 'trainer.command': executable './venv/bin/python' is not executable "
        "(chmod +x it, or run it through its interpreter)"]
    # An entry point runs in this very Python (trials fork from the sweep's process).
    assert resolved_interpreter(load_spec(VALID / "spec.yaml")) == sys.executable


def test_load_inputs_accepts_the_valid_files(tmp_path: Path):
    (tmp_path / "train.csv").write_text("x\n1\n")
    (tmp_path / "val").mkdir()  # data may be a folder too, of shards in any format
    (tmp_path / "val" / "part-0.parquet").write_bytes(b"PAR1")
    inputs = load_inputs(VALID / "combos.csv", VALID / "spec.yaml", tmp_path / "train.csv", tmp_path / "val", 2)
    assert len(inputs.combinations) == 3
    assert inputs.spec.name == "digits-mlp"
    assert inputs.train == tmp_path / "train.csv" and inputs.val == tmp_path / "val"


@pytest.mark.parametrize("value, message", [
    ("true", r"expected a number of seconds \(e\.g\. 3600\), got True"),
    ("'90'", r"expected a number of seconds \(e\.g\. 3600\), got '90'"),
    ("0", r"greater than 0"), ("-1.5", r"greater than 0"), (".inf", r"finite number"),
])
def test_expected_duration_must_be_a_positive_number(tmp_path: Path, value: str, message: str):
    path = tmp_path / "spec.yaml"
    path.write_text(f"trainer: {{entrypoint: 'tests.trainers:sleepy'}}\nexpected_duration_s: {value}\n")
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    assert_problems(info.value, path, [(None, "expected_duration_s", message)])


def test_expected_duration_is_not_part_of_the_spec_hash(tmp_path: Path):
    # A planning hint: changing it must not change trial keys (nothing is retrained for a new guess).
    from hpsweep.versions import spec_hash

    plain, hinted = tmp_path / "a.yaml", tmp_path / "b.yaml"
    plain.write_text("name: s\ntrainer: {entrypoint: 'tests.trainers:sleepy'}\n")
    hinted.write_text(plain.read_text() + "expected_duration_s: 120\n")
    assert spec_hash(load_spec(plain)) == spec_hash(load_spec(hinted))


def test_trial_needing_more_gpus_than_the_host_has_is_refused(tmp_path: Path):
    (tmp_path / "train.csv").write_text("x\n1\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("trainer: {entrypoint: 'tests.trainers:sleepy'}\nresources: {gpus: 5}\n")
    with pytest.raises(SweepInputError) as info:
        load_inputs(VALID / "combos.csv", spec, tmp_path / "train.csv", tmp_path / "train.csv", 8, (0, 1, 2, 3))
    assert [str(p) for p in info.value.problems] == [
        f"{spec}: key 'resources.gpus': a trial needs 5 GPUs but this host has 4 (0,1,2,3): "
        "no trial could ever start"]
    # A CPU host (no GPUs) or trials run elsewhere: no host check.
    assert load_inputs(VALID / "combos.csv", spec, tmp_path / "train.csv", tmp_path / "train.csv", 8).spec


# ---------------------------------------------------------------- invalid files


@pytest.mark.parametrize("name", sorted(INVALID_COMBINATIONS))
def test_invalid_combinations(name: str):
    path = INVALID / name
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert_problems(info.value, path, INVALID_COMBINATIONS[name])


@pytest.mark.parametrize("name", sorted(INVALID_SPECS))
def test_invalid_specs(name: str):
    path = INVALID / name
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    assert_problems(info.value, path, INVALID_SPECS[name])


def test_every_invalid_sample_is_covered():
    assert sorted(p.name for p in INVALID.iterdir()) == sorted(
        [*INVALID_COMBINATIONS, *INVALID_SPECS, "spec_needs_4_gpus.yaml"])


def test_missing_key_message_names_row_and_key():
    path = INVALID / "combos_missing_key.yaml"
    with pytest.raises(SweepInputError, match=r"combos_missing_key\.yaml: row 3: key 'lr': missing value"):
        load_combinations(path)


def test_odd_row_out_is_the_one_reported(tmp_path: Path):
    # The first row lacks a key the others have: row 1 is reported, not rows 2 and 3.
    path = tmp_path / "c.yaml"
    path.write_text("combinations:\n  - {lr: 0.1}\n  - {lr: 0.2, hidden: 3}\n  - {lr: 0.3, hidden: 4}\n")
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert info.value.problems == [Problem(str(path), "missing value", row=1, key="hidden")]


def test_csv_first_row_with_an_extra_cell(tmp_path: Path):
    # The header defines the keys, even when the first data row is the odd one out.
    path = tmp_path / "c.csv"
    path.write_text("lr,hidden\n0.1,32,relu\n0.2,64\n0.3,128\n")
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert [(p.row, p.key) for p in info.value.problems] == [(2, "<column 3>")]


def test_csv_rows_are_file_lines(tmp_path: Path):
    # Blank lines and a quoted cell spanning two lines still give the line a spreadsheet shows.
    path = tmp_path / "c.csv"
    path.write_text('\nnote,lr\n\n"two\nlines",0.1\nx,nan\n')
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert [(p.row, p.key) for p in info.value.problems] == [(6, "lr")]
    path.write_text('note,lr\n"two\nlines",0.1\n')
    assert load_combinations(path) == [{"note": "two\nlines", "lr": 0.1}]


@pytest.mark.parametrize("text, row, key, message", [
    ("lr,lr\n1,2\n", 1, "lr", "column named twice in the header"),
    ("lr,\n1,2\n", 1, None, "the header has an empty column name"),
    (",,\n", None, None, "no header row (column names) found"),
])
def test_bad_csv_header(tmp_path: Path, text: str, row, key, message: str):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert info.value.problems == [Problem(str(path), message, row=row, key=key)]


@pytest.mark.parametrize("text, expected", [
    ("- {lr: 1}\n", [(None, None, "expected a mapping with a 'combinations:' list")]),
    ("combinations: {lr: 1}\n", [(None, "combinations", "must be a list of mappings")]),
    ("combinations:\n", [(None, "combinations", "no combinations")]),
    ("combos: []\ncombinations:\n  - {lr: 1}\n  - 3\n",
     [(None, "combos", "unknown top-level key (only 'combinations' is allowed)"),
      (2, None, "a combination must be a non-empty mapping of key: value")]),
    ("combinations:\n  - {lr: 1, hidden: null}\n  - {lr: 2, hidden: 3}\n", [(1, "hidden", "missing value")]),
])
def test_bad_yaml_shape(tmp_path: Path, text: str, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SweepInputError) as info:
        load_combinations(path)
    assert info.value.problems == [Problem(str(path), msg, row=row, key=key) for row, key, msg in expected]


def test_unreadable_files(tmp_path: Path):
    for path in (tmp_path / "nope.yaml", tmp_path / "nope.csv"):
        with pytest.raises(SweepInputError, match=r"nope\.(yaml|csv): cannot read the file: .*No such file"):
            load_combinations(path)
    with pytest.raises(SweepInputError, match=r"nope\.yaml: cannot read the file"):
        load_spec(tmp_path / "nope.yaml")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00\x80lr\n")
    with pytest.raises(SweepInputError, match=r"b\.csv: cannot read the file"):
        load_combinations(binary)
    blank = tmp_path / "blank.csv"
    blank.write_text("  \n\n")
    with pytest.raises(SweepInputError, match=r"blank\.csv: the file is empty$"):
        load_combinations(blank)


def test_spec_with_bad_yaml_is_one_line(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("trainer:\n  entrypoint: [a\n")
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert problem.message.startswith("not valid YAML: ") and "\n" not in problem.message


def test_spec_name_must_be_a_safe_name(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("name: my model/v2\ntrainer: {entrypoint: 'tests.trainers:sleepy'}\n")
    with pytest.raises(SweepInputError) as info:
        load_spec(path)
    assert [(p.key, p.row) for p in info.value.problems] == [("name", None)]


def test_spec_shape_is_the_public_contract():
    # Renaming or removing one of these keys breaks users' spec files.
    assert set(ModelSpec.model_fields) >= {"name", "trainer", "settings", "resources", "time_limit_s"}


# ---------------------------------------------------------------- everything together


def test_load_inputs_reports_every_problem_at_once(tmp_path: Path):
    with pytest.raises(SweepInputError) as info:
        load_inputs(INVALID / "combos_missing_key.yaml", INVALID / "spec_unknown_key.yaml",
                    tmp_path / "no_train.csv", tmp_path / "no_val", 2)
    assert [str(p) for p in info.value.problems] == [
        f"{INVALID / 'combos_missing_key.yaml'}: row 3: key 'lr': missing value",
        f"{INVALID / 'spec_unknown_key.yaml'}: key 'epochs': unknown key",
        f"{tmp_path / 'no_train.csv'}: --train data not found (expected a file or folder)",
        f"{tmp_path / 'no_val'}: --val data not found (expected a file or folder)",
    ]


def test_quota_smaller_than_a_trial(tmp_path: Path):
    data = tmp_path / "d.csv"
    data.write_text("x\n1\n")
    load_inputs(VALID / "combos.yaml", INVALID / "spec_needs_4_gpus.yaml", data, data, 4)  # fits exactly
    with pytest.raises(SweepInputError) as info:
        load_inputs(VALID / "combos.yaml", INVALID / "spec_needs_4_gpus.yaml", data, data, 2)
    (problem,) = info.value.problems
    assert (problem.file, problem.key) == (str(INVALID / "spec_needs_4_gpus.yaml"), "resources.gpus")
    assert problem.message.startswith("a trial needs 4 GPUs but the quota is 2")
    with pytest.raises(SweepInputError, match=r"^--quota: must be at least 1, got 0$"):
        load_inputs(VALID / "combos.yaml", VALID / "spec.yaml", data, data, 0)


# ---------------------------------------------------------------- config: params.yaml + flags

FLAGS_NONE = {name: None for name in SweepConfig.model_fields}


def test_params_yaml_gives_defaults_and_flags_override(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("sweep:\n  combinations: params/c.yaml\n  spec: params/s.yaml\n  train: data/train.csv\n"
                      "  val: data/val.csv\n  quota: 4\n  name: from-params\n")
    config = build_config(FLAGS_NONE, params)
    assert config.combinations == Path("params/c.yaml") and config.spec == Path("params/s.yaml")
    assert config.train == Path("data/train.csv") and config.val == Path("data/val.csv")
    assert config.quota == 4 and config.name == "from-params"
    assert config.report_dir is None and config.work_dir == Path(".hpsweep")  # model defaults

    config = build_config({**FLAGS_NONE, "quota": 2, "spec": Path("other.yaml"), "report_dir": Path("out")}, params)
    assert config.quota == 2 and config.spec == Path("other.yaml") and config.report_dir == Path("out")
    assert config.name == "from-params" and config.combinations == Path("params/c.yaml")


def test_flags_alone_without_params_yaml(tmp_path: Path):
    flags = {**FLAGS_NONE, "combinations": Path("c.csv"), "spec": Path("s.yaml"), "train": Path("t"),
             "val": Path("v")}
    config = build_config(flags, tmp_path / "params.yaml")
    assert config.quota == 1 and config.combinations == Path("c.csv")


def test_missing_required_input_names_the_flag(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("sweep:\n  combinations: c.yaml\n  train: data/train.csv\n")
    with pytest.raises(SweepInputError) as info:
        build_config(FLAGS_NONE, params)
    assert [p.file for p in info.value.problems] == ["--spec", "--val"]
    assert str(info.value.problems[0]) == f"--spec: required (no flag given and no sweep.spec in {params})"


def test_unknown_key_in_params_yaml(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("sweep:\n  combinations: c.yaml\n  qouta: 4\n  report-dir: out\n")
    with pytest.raises(SweepInputError) as info:
        read_params(params)
    assert info.value.problems == [Problem(str(params), "unknown key", key="sweep.qouta"),
                                   Problem(str(params), "unknown key", key="sweep.report-dir")]
    with pytest.raises(SweepInputError, match=r"key 'sweep\.qouta': unknown key"):
        build_config({**FLAGS_NONE, "combinations": Path("c"), "spec": Path("s"), "train": Path("t"),
                      "val": Path("v")}, params)


def test_bad_value_in_params_yaml_names_the_file_not_a_flag(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("sweep:\n  combinations: c.yaml\n  spec: s.yaml\n  train: t\n  val: v\n  quota: two\n")
    with pytest.raises(SweepInputError) as info:
        build_config(FLAGS_NONE, params)
    (problem,) = info.value.problems
    assert (problem.file, problem.key) == (str(params), "sweep.quota")
    assert "integer" in problem.message
    # The same value given as a flag wins, so params.yaml's bad one no longer matters.
    assert build_config({**FLAGS_NONE, "quota": 3}, params).quota == 3


@pytest.mark.parametrize("text, key, message", [
    ("sweep: [a, b]\n", "sweep", "expected a mapping"),
    ("sweep:\n  quota: [1\n", None, "not valid YAML: "),
])
def test_malformed_params_yaml(tmp_path: Path, text: str, key, message: str):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(SweepInputError) as info:
        read_params(params)
    (problem,) = info.value.problems
    assert problem.file == str(params) and problem.key == key and problem.message.startswith(message)
    assert "\n" not in str(problem)


def test_no_params_yaml_is_no_defaults(tmp_path: Path):
    assert read_params(tmp_path / "params.yaml") == {}
    (tmp_path / "p.yaml").write_text("other: 1\n")
    assert read_params(tmp_path / "p.yaml") == {}
