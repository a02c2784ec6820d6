"""Invalid input through the real CLI: exit code 2, one line per problem naming file, row and key,
no traceback, and nothing written (no MLflow store, no report, no trial folders).

Validation runs before Prefect or MLflow is imported, so each of these takes about half a second.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.test_inputs import INVALID, INVALID_COMBINATIONS, INVALID_SPECS, VALID


VALID_COMBOS = "combos.yaml"
VALID_SPEC = "spec.yaml"


def put(project: Project, source: Path, name: str | None = None) -> str:
    """Copy a sample file into the project's params/ folder; return its path as the user types it."""
    rel = f"params/{name or source.name}"
    (project.root / rel).parent.mkdir(parents=True, exist_ok=True)
    (project.root / rel).write_bytes(source.read_bytes())
    return rel


def run(project: Project, combos: str, spec: str, *extra: str, train: str = "data/train.csv",
        val: str = "data/val.csv", quota: str = "2") -> subprocess.CompletedProcess:
    return project.hpsweep("run", "--combinations", combos, "--spec", spec, "--train", train, "--val", val,
                           "--quota", quota, *extra, timeout=60)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_rejected(project: Project, result: subprocess.CompletedProcess) -> list[str]:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    assert project.state_written() == [], out
    lines = error_lines(result)
    assert lines and all(line.startswith("error: ") for line in lines), out  # one line per problem, no noise
    return lines


def expected_line(rel: str, row: int | None, key: str | None, pattern: str) -> str:
    where = re.escape(rel) + (f": row {row}" if row is not None else "") + (
        f": key '{re.escape(key)}'" if key else "")
    message = pattern[1:] if pattern.startswith("^") else ".*" + pattern  # patterns are for the message alone
    return f"^error: {where}: {message}"


@pytest.mark.parametrize("name", sorted(INVALID_COMBINATIONS))
def test_invalid_combinations_file(project: Project, name: str):
    combos = put(project, INVALID / name)
    spec = put(project, VALID / VALID_SPEC)
    lines = assert_rejected(project, run(project, combos, spec))
    expected = INVALID_COMBINATIONS[name]
    assert len(lines) == len(expected), lines
    for line, (row, key, pattern) in zip(lines, expected):
        assert re.search(expected_line(combos, row, key, pattern), line), line


@pytest.mark.parametrize("name", sorted(INVALID_SPECS))
def test_invalid_spec_file(project: Project, name: str):
    combos = put(project, VALID / VALID_COMBOS)
    spec = put(project, INVALID / name)
    lines = assert_rejected(project, run(project, combos, spec))
    expected = INVALID_SPECS[name]
    assert len(lines) == len(expected), lines
    for line, (row, key, pattern) in zip(lines, expected):
        assert re.search(expected_line(spec, row, key, pattern), line), line


def test_bad_combinations_and_bad_spec_and_missing_data_all_reported(project: Project):
    combos = put(project, INVALID / "combos_several.yaml")
    spec = put(project, INVALID / "spec_several.yaml")
    lines = assert_rejected(project, run(project, combos, spec, train="data/missing_train.csv"))
    expected = [expected_line(combos, *p) for p in INVALID_COMBINATIONS["combos_several.yaml"]]
    expected += [expected_line(spec, *p) for p in INVALID_SPECS["spec_several.yaml"]]
    expected += [r"^error: data/missing_train\.csv: --train data not found"]
    assert len(lines) == len(expected) == 8, lines
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), line


@pytest.mark.parametrize("flag", ["train", "val"])
def test_missing_data_path_is_named(project: Project, flag: str):
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC)
    result = run(project, combos, spec, **{flag: "data/nowhere"})
    assert assert_rejected(project, result) == [
        f"error: data/nowhere: --{flag} data not found (expected a file or folder)"]


def test_data_folders_are_accepted_as_paths(project: Project):
    # A folder (of shards in any format) is valid data: with --train a folder, only the bad spec is reported.
    (project.root / "data" / "train_dir").mkdir()
    (project.root / "data" / "train_dir" / "part-0.parquet").write_bytes(b"PAR1")
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, INVALID / "spec_bad_gpus.yaml")
    lines = assert_rejected(project, run(project, combos, spec, train="data/train_dir"))
    assert len(lines) == 1 and "resources.gpus" in lines[0]


def test_quota_smaller_than_gpus_per_trial(project: Project):
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, INVALID / "spec_needs_4_gpus.yaml")
    lines = assert_rejected(project, run(project, combos, spec, quota="2"))
    assert lines == [f"error: {spec}: key 'resources.gpus': a trial needs 4 GPUs but the quota is 2: "
                     "no trial could ever start"]


def test_quota_below_one(project: Project):
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC)
    assert assert_rejected(project, run(project, combos, spec, quota="0")) == [
        "error: --quota: must be at least 1, got 0"]


def test_quota_not_a_number_is_a_usage_error(project: Project):
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC)
    result = run(project, combos, spec, quota="two")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--quota" in result.stderr and "invalid int value: 'two'" in result.stderr
    assert project.state_written() == []


def test_missing_required_flags_are_named(project: Project):
    result = project.hpsweep("run", "--train", "data/train.csv", timeout=60)
    assert assert_rejected(project, result) == [
        "error: --combinations: required (no flag given and no sweep.combinations in params.yaml)",
        "error: --spec: required (no flag given and no sweep.spec in params.yaml)",
        "error: --val: required (no flag given and no sweep.val in params.yaml)",
    ]


def test_params_yaml_defaults_are_validated_too(project: Project):
    put(project, INVALID / "combos_missing_key.yaml", "c.yaml")
    put(project, VALID / VALID_SPEC, "s.yaml")
    project.write("params.yaml", "sweep:\n  combinations: params/c.yaml\n  spec: params/s.yaml\n"
                                 "  train: data/train.csv\n  val: data/val.csv\n")
    assert assert_rejected(project, project.hpsweep("run", timeout=60)) == [
        "error: params/c.yaml: row 3: key 'lr': missing value"]


def test_unknown_key_in_params_yaml(project: Project):
    project.write("params.yaml", "sweep:\n  combinations: params/c.yaml\n  qouta: 4\n")
    result = run(project, put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC))
    assert assert_rejected(project, result) == ["error: params.yaml: key 'sweep.qouta': unknown key"]


def test_run_help_documents_every_flag(project: Project):
    result = project.hpsweep("run", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--combinations", "--spec", "--train", "--val", "--quota", "--name", "--report-dir"):
        assert re.search(rf"^\s+{flag} \S+\s+\S", result.stdout, re.MULTILINE), f"{flag} undocumented"
    assert "invalid input" in result.stdout  # the exit codes are part of the help
    assert project.state_written() == []


def test_brackets_in_keys_and_paths_are_printed_as_typed(project: Project):
    combos = project.write("params/[old]/c.csv", "lr,[/x]\n0.1,1\n0.2\n")
    result = run(project, "params/[old]/c.csv", put(project, VALID / VALID_SPEC))
    assert assert_rejected(project, result) == [  # brackets: Rich markup, were it not escaped
        "error: params/[old]/c.csv: row 1: key '[/x]': MLflow param keys may only hold letters, digits, '_', '-', "
        "'.', ' ', ':' and '/'",
        "error: params/[old]/c.csv: row 3: key '[/x]': missing value"]
    assert combos.exists()


def test_trial_needing_more_gpus_than_the_host_has(project: Project):
    # CUDA_VISIBLE_DEVICES names the host's GPUs: four of them, and a trial asks for five.
    combos = put(project, VALID / VALID_COMBOS)
    spec = project.write("params/big.yaml", "trainer: {entrypoint: 'tests.trainers:sleepy'}\n"
                                            "resources: {gpus: 5}\n").relative_to(project.root)
    result = project.hpsweep("run", "--combinations", combos, "--spec", str(spec), "--train", "data/train.csv",
                             "--val", "data/val.csv", "--quota", "8", timeout=60,
                             env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert assert_rejected(project, result) == [
        f"error: {spec}: key 'resources.gpus': a trial needs 5 GPUs but this host has 4 (0,1,2,3): "
        "no trial could ever start"]


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "..", "it's", "a" * 300, "é", "a b", ".hidden",
                                  "x/../../etc"])
def test_a_sweep_name_outside_the_spec_names_pattern_is_rejected(project: Project, name: str):
    # Each trained everything and then failed (exit 3), or wrote the report outside reports/.
    combos, spec = put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC)
    before = sorted(project.root.parent.iterdir())
    lines = assert_rejected(project, run(project, combos, spec, "--name", name))
    message = ("a name of 300 characters: the limit is 200" if len(name) > 200 else
               f"{name!r} is not a sweep name: it names the MLflow experiment and the report folder reports/<name>")
    assert len(lines) == 1 and lines[0].startswith(f"error: --name: {message}"), lines
    assert sorted(project.root.parent.iterdir()) == before  # nothing written beside the project either


def test_a_spec_name_obeys_the_same_rule(project: Project):
    combos = put(project, VALID / VALID_COMBOS)
    spec = project.write("params/spec.yaml", "name: ../../x\ntrainer: {entrypoint: 'tests.trainers:sleepy'}\n")
    assert assert_rejected(project, run(project, combos, "params/spec.yaml")) == [
        "error: params/spec.yaml: key 'name': '../../x' is not a sweep name: it names the MLflow experiment and the "
        "report folder reports/<name>, so it must start with a letter or digit and hold only letters, digits, '.', "
        "'_' and '-'"]
    assert spec.exists()


def test_a_typo_in_the_commands_script_is_refused_identically_by_plan_and_run(project: Project):
    # sm_gleu.py for sm_glue.py: refused before any trial starts, with the likely name.
    project.write("sm_glue.py", "print('training')\n")
    spec = project.write("params/cmd.yaml", f"trainer:\n  command: [{sys.executable!r}, sm_gleu.py, --fast]\n")
    combos = put(project, VALID / VALID_COMBOS)
    expected = [f"error: params/cmd.yaml: key 'trainer.command': file 'sm_gleu.py' (argv[1]) not found in "
                f"{project.root} (did you mean 'sm_glue.py'?)"]
    for command in ("plan", "run"):
        result = project.hpsweep(command, "--combinations", combos, "--spec", "params/cmd.yaml", "--train",
                                 "data/train.csv", "--val", "data/val.csv", "--quota", "2", timeout=60)
        assert assert_rejected(project, result) == expected, command
    assert spec.exists()


# ---------------------------------------------------------------- limits: what passed validation and failed later

LIMITS_COMBOS = ("combinations:\n"
                 "  - {lr: 0.1, ../x: 1, %s: 1, note: a}\n"
                 "  - {lr: .inf, ../x: 2, %s: 2, note: %s}\n" % ("k" * 300, "k" * 300, "v" * 9000))


def test_limits_are_refused_identically_by_plan_and_run(project: Project):
    # A 300-character key, a path-like key, a 9,000-character value (PostgreSQL's varchar(8000)), inf,
    # an empty validation file and /etc/passwd as training data: each failed only after GPU time.
    combos = project.write("params/c.yaml", LIMITS_COMBOS).relative_to(project.root)
    spec = put(project, VALID / VALID_SPEC)
    (project.root / "data" / "val.csv").write_bytes(b"")
    expected = [
        f"error: {combos}: row 1: key '../x': MLflow refuses path-like param keys: this one is '.' or starts with "
        "'..' or '/'",
        f"error: {combos}: row 1: key '{'k' * 200}… (300 characters)': a key of 300 characters: MLflow's limit for a "
        "param key is 250",
        f"error: {combos}: row 2: key 'lr': value inf is not a finite number",
        f"error: {combos}: row 2: key 'note': value '{'v' * 200}…' is 9,000 characters long: the limit is 1,000",
        "error: /etc/passwd: --train data file has no suffix, so no format (.csv, .parquet, ...): name"
        " the data file by its format, or pass a folder",
        "error: data/val.csv: --val data file is empty (0 bytes)",
    ]
    for command in ("plan", "run"):
        result = project.hpsweep(command, "--combinations", str(combos), "--spec", spec, "--train", "/etc/passwd",
                                 "--val", "data/val.csv", "--quota", "2", timeout=60)
        assert assert_rejected(project, result) == expected, command


def test_an_alias_bomb_is_refused_in_a_moment_with_one_short_line(project: Project):
    # 322 bytes gave exit 2 after 105 s, with 226 MB of stderr.
    from tests.test_input_limits import BOMB

    project.write("params/c.yaml", BOMB)
    result = run(project, "params/c.yaml", put(project, VALID / VALID_SPEC))
    (line,) = assert_rejected(project, result)
    assert line.endswith("more than 2,000,000 values once aliases are expanded") and len(result.stderr) < 300


def test_a_list_nested_ten_thousand_deep_is_refused_without_a_traceback(project: Project):
    project.write("params/c.yaml", "combinations:\n  - {lr: " + "[" * 10_000 + "]" * 10_000 + "}\n")
    result = run(project, "params/c.yaml", put(project, VALID / VALID_SPEC))
    assert assert_rejected(project, result) == [
        "error: params/c.yaml: row 1: key 'lr': nested deeper than 8 levels"]


@pytest.mark.parametrize("data", ["label,p0\n", "\n"])
def test_a_validation_file_without_rows_is_refused(project: Project, data: str):
    # An empty validation file passed validation and failed every trial.
    (project.root / "data" / "val.csv").write_text(data)
    result = run(project, put(project, VALID / VALID_COMBOS), put(project, VALID / VALID_SPEC))
    (line,) = assert_rejected(project, result)
    assert line.startswith("error: data/val.csv: --val data file has ")


def test_a_trainer_module_that_cannot_be_imported_says_where_it_was_looked_for(project: Project):
    # The trainer sits beside the spec, but modules are found from the working directory (as `python -m`).
    project.write("params/my_trainer.py", "def train(hparams, data, ctx):\n    return 0.5\n")
    spec = project.write("params/spec.yaml", "trainer: {entrypoint: 'my_trainer:train'}\n")
    combos = project.write("params/combos.yaml", "combinations:\n  - {lr: 0.1}\n")
    result = run(project, str(combos.relative_to(project.root)), str(spec.relative_to(project.root)))
    [line] = assert_rejected(project, result)  # caught before anything starts: exit 2
    assert line.startswith(f"error: params/spec.yaml: key 'trainer.entrypoint': cannot import module 'my_trainer': "
                           "ModuleNotFoundError: No module named 'my_trainer' (looked in the working directory "
                           f"{project.root}, then PYTHONPATH ({project.env['PYTHONPATH']}), then the installed "
                           "packages; the spec's folder is not searched"), line
    # As it says: the spec's folder on PYTHONPATH finds it.
    env = {"PYTHONPATH": f"{project.root / 'params'}:{project.env['PYTHONPATH']}"}
    plan = project.hpsweep("plan", "--combinations", "params/combos.yaml", "--spec", "params/spec.yaml",
                           "--train", "data/train.csv", "--val", "data/val.csv", timeout=120, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
