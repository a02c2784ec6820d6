"""The sweep's settings: CLI flags over `params.yaml` defaults, validated once into a frozen model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from hpsweep.engine.early_stop import EarlyStopRule, RuleName
from hpsweep.inputs import Problem, SweepInputError, SweepInputs, SweepName, load_yaml, read_input_text

DEFAULT_LIMIT_NAME = "hpsweep-gpus"
PARAMS_MAX_DEPTH = 32
# The `register` field "shadows" ABCMeta.register, a metaclass method no instance sees: nothing to warn about.
warnings.filterwarnings("ignore", r'Field name "register" in "Sweep(Config|Overrides)" shadows', UserWarning)
_NO_EARLY_STOP = EarlyStopRule()  # the early-stop settings' defaults are the rule's own


class SweepConfig(BaseModel):
    """Everything `hpsweep run` (and the `sweep` flow) needs. Paths are relative to the working directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    combinations: Path = Field(description="YAML (combinations: list) or CSV file of hparam combinations")
    spec: Path = Field(description="model spec YAML")
    train: Path = Field(description="training data (file or folder)")
    val: Path = Field(description="validation data (file or folder)")
    quota: int = Field(default=1, description="GPUs this sweep may use at once; creates the shared Prefect concurrency limit when absent (never changes it: `hpsweep quota N` does)")
    name: SweepName | None = Field(default=None, description="sweep name (MLflow experiment, registered model, "
                                   "report folder): letters, digits, '.', '_', '-', at most 200; default: the "
                                   "spec's name")
    report_dir: Path | None = Field(default=None, description="where the report goes, exactly; default "
                                    "reports/<name>/<sweep id>, with reports/<name>/latest showing the newest")
    work_dir: Path = Field(default=Path(".hpsweep"), description="trial folders: checkpoints, logs, results")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI; default "
                                                               "$MLFLOW_TRACKING_URI, else ./mlflow.db")
    retrain: bool = Field(default=False, description="train every combination again, even those with a "
                                                     "FINISHED run for the same trial key")
    register: bool = Field(default=True, description="point the model registry's @champion alias at the best "
                                                      "trial when it beats the champion (False: leave the "
                                                      "registry alone)")
    max_attempts: int = Field(default=3, ge=1, description="attempts per trial when the machine fails it (killed "
                                                         "by a signal, lost host, tracking unreachable); a "
                                                         "trainer's own error is never retried")
    retry_delay_s: float = Field(default=10.0, ge=0, description="wait before the first retry; x4 per retry")
    launcher: Literal["local", "pool"] = Field(default="local", description="where trials run: 'local' "
                                                "(processes on this host) or 'pool' (flow runs of the "
                                                "train-trial deployment on a Prefect work pool)")
    pool: str | None = Field(default=None, description="the work pool for --launcher pool; its concurrency "
                                                       "limit must be set and at most the quota")
    trial_deployment: str = Field(default="train-trial/hpsweep", description="the train-trial deployment "
                                                                             "(flow/deployment) for --launcher pool")
    max_failures: int | None = Field(default=None, ge=1, description="fail fast: after this many trials failed "
                                     "(the trainer's error, or retries used up), start no more; running ones "
                                     "finish and the rest are reported NOT STARTED (default: run them all)")
    grace_s: float = Field(default=30.0, ge=0, description="on Ctrl-C or SIGTERM: how long running trials get "
                                                            "to save a checkpoint and end before they are killed")
    early_stop: RuleName = Field(
        default=_NO_EARLY_STOP.rule, description="stop hopeless trials early: 'median' (below the median of the "
        "others' running averages) or 'asha' (not in the top 1/reduction_factor at a rung); stopped trials are "
        "STOPPED and a later sweep resumes them from their checkpoints ('none': train every trial to its end)")
    early_stop_metric: str = Field(default=_NO_EARLY_STOP.metric, description="the reported metric the rule "
                                   "reads (higher is better); its best value is a stopped trial's F1")
    early_stop_min_steps: int = Field(default=_NO_EARLY_STOP.min_steps, ge=1, description="no trial is stopped "
                                      "before it reported this many steps (ASHA's first rung)")
    early_stop_reduction_factor: int = Field(default=_NO_EARLY_STOP.reduction_factor, ge=2, description="ASHA: 1 "
                                             "in this many trials goes on at each rung")
    early_stop_max_steps: int | None = Field(default=None, ge=1, description="ASHA: the steps of a trial "
                                             "never stopped (default: the spec's settings.epochs)")
    early_stop_grace_s: float = Field(default=60.0, ge=0, description="a stopped trial's time to save a "
                                      "checkpoint and exit before it gets SIGTERM, then SIGKILL")
    quota_limit: str = Field(default=DEFAULT_LIMIT_NAME, description="name of the Prefect global "
                                                                      "concurrency limit that holds the quota")
    tie_break: str | None = Field(default=None, description="pick the champion among the trials statistically "
                                  "tied with the best by these hparams, e.g. 'hidden:asc,lr:desc' (the smallest "
                                  "model first); default: the highest F1")

    @field_validator("tie_break")
    @classmethod
    def _a_rule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_tie_break(value)
        return value


def parse_tie_break(rule: str) -> list[tuple[str, bool]]:
    """``"hidden:asc,lr:desc"`` as [(hparam, descending)]; ValueError says what is wrong."""
    keys: list[tuple[str, bool]] = []
    for part in rule.split(","):
        key, sep, order = part.strip().rpartition(":")
        if not sep or not key.strip() or order.strip() not in ("asc", "desc"):
            raise ValueError(f"tie-break {part.strip()!r}: write hparam:asc or hparam:desc, comma-separated "
                             "(e.g. 'hidden:asc,lr:desc')")
        keys.append((key.strip(), order.strip() == "desc"))
    return keys


def check_tie_break(config: SweepConfig, inputs: SweepInputs) -> None:
    """Raises SweepInputError for a tie-break naming an hparam the combinations do not have (it could never pick)."""
    if config.tie_break is None:
        return
    hparam_keys = list(inputs.combinations[0])
    problems = [Problem("--tie-break", f"no hparam {key!r} in the combinations (they have: {', '.join(hparam_keys)})")
                for key, _ in parse_tie_break(config.tie_break) if key not in hparam_keys]
    if problems:
        raise SweepInputError(problems)


# What a `sweep` flow run is given: any of SweepConfig's fields (same names and meanings), the rest
# from params.yaml, as `hpsweep run`'s flags. Types are checked here, values (ranges) by SweepConfig;
# a whole SweepConfig is one too (read from its attributes).
SweepOverrides = create_model(
    "SweepOverrides", __config__=ConfigDict(frozen=True, extra="forbid", from_attributes=True),
    **{name: (field.annotation | None, Field(default=None, description=field.description))
       for name, field in SweepConfig.model_fields.items()})


def read_params(path: Path) -> dict[str, Any]:
    """The `sweep:` section of params.yaml (what `dvc repro` passes); {} when there is no file."""
    if not path.is_file():
        return {}
    # DVC's params.yaml also holds other stages' settings, nested deeper than a sweep's own files.
    doc = load_yaml(str(path), read_input_text(path), max_depth=PARAMS_MAX_DEPTH) or {}
    section = doc.get("sweep", {}) if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise SweepInputError([Problem(str(path), "expected a mapping", key="sweep")])
    unknown = sorted(set(section) - set(SweepConfig.model_fields))
    if unknown:
        raise SweepInputError([Problem(str(path), "unknown key", key=f"sweep.{k}") for k in unknown])
    return section


def flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def build_config(flags: dict[str, Any], params_file: Path | None,
                 named: Callable[[str], str] = flag) -> SweepConfig:
    """Flags given on the command line win over params.yaml (None: no file); a missing required one is an
    input error. ``named(field)``: how problems name a given value (``--spec``, or a flow's ``config.spec``)."""
    given = {k: v for k, v in flags.items() if v is not None}
    values = {**(read_params(params_file) if params_file else {}), **given}
    missing = [k for k in ("combinations", "spec", "train", "val") if k not in values]
    if missing:
        what = "flag" if named is flag else "value"
        raise SweepInputError([Problem(named(k), f"required (no {what} given and no sweep.{k} in {params_file})")
                               for k in missing])
    from pydantic import ValidationError

    try:
        return SweepConfig.model_validate(values)
    except ValidationError as e:
        raise SweepInputError([_config_problem(err, given, params_file, named) for err in e.errors()]) from e


def _config_problem(err: Any, given: dict[str, Any], params_file: Path | None, named: Callable[[str], str]
                    ) -> Problem:
    """Name where the bad value came from: the flag if one was given, else params.yaml's key."""
    field = str(err["loc"][0]) if err["loc"] else ""
    message = err["msg"].removeprefix("Value error, ")
    if field in given:
        return Problem(named(field), message)
    return Problem(str(params_file), message, key=".".join(["sweep", *map(str, err["loc"])]))


def early_stop_rule(config: SweepConfig, settings: dict[str, Any]) -> EarlyStopRule:
    """The sweep's early-stopping rule; ASHA's ``max_steps`` defaults to the spec's ``settings.epochs``."""
    max_steps = config.early_stop_max_steps
    if max_steps is None and isinstance(settings.get("epochs"), int) and not isinstance(settings["epochs"], bool):
        max_steps = settings["epochs"]
    return EarlyStopRule(config.early_stop, config.early_stop_metric, config.early_stop_min_steps,
                         config.early_stop_reduction_factor, max_steps)
