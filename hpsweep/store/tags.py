"""hpsweep's MLflow tag names (a public contract: `status`, `report` and users' queries read them), and
how their values are read and bounded."""

import json

TAG_SWEEP_ID = "hpsweep.sweep_id"
TAG_ROLE = "hpsweep.role"  # "sweep" (the parent run) or "trial"
TAG_TRIAL_KEY = "hpsweep.trial_key"
TAG_HPARAMS = "hpsweep.hparams"  # canonical JSON: typed hparams (MLflow params are strings)
TAG_INDEX = "hpsweep.index"  # the combination's row number in the file order
TAG_ATTEMPT = "hpsweep.attempt"
TAG_STATUS = "hpsweep.status"  # RUNNING, FINISHED, FAILED or STOPPED (MLflow's status says KILLED); a parent run
# is STARTING from its first second (before Prefect starts) until its trials are planned
TAG_REASON = "hpsweep.reason"
TAG_DURATION = "hpsweep.duration_s"
TAG_RETRYABLE = "hpsweep.retryable"  # "true" when the machine, not the trainer, failed the attempt
TAG_OWNER = "hpsweep.owner"  # host:pid:start of the process that runs (or ran) this run
TAG_HEARTBEAT = "hpsweep.heartbeat"  # unix time of the owner's last sign of life
TAG_HEARTBEAT_S = "hpsweep.heartbeat_s"  # on the parent run: seconds between its owner's heartbeats
TAG_ATTEMPT_LOG = "hpsweep.attempt_log"  # one line per failed attempt: why it was retried
TAG_SPEC_HASH = "hpsweep.spec_hash"
TAG_DATA_VERSION = "hpsweep.data_version"
TAG_CODE_VERSION = "hpsweep.code_version"
TAG_GIT_COMMIT = "hpsweep.git_commit"
TAG_QUOTA = "hpsweep.quota"
TAG_DISPATCH = "hpsweep.dispatch_order"  # on the parent run: how the sweep ordered its trials
TAG_FLOW_RUN_ID = "hpsweep.flow_run_id"  # the Prefect flow run of the sweep
TAG_GPUS = "hpsweep.gpus"
TAG_INTERPRETER = "hpsweep.trainer_interpreter"  # on the parent run: the program the trials run, as PATH found it
TAG_SETTINGS = "hpsweep.settings"  # on the parent run: the spec's settings, canonical JSON (the report header)
TAG_INTERRUPTED = "hpsweep.interrupted"  # on a trial or parent run stopped by a signal to the sweep: its name
# Early stopping: the sweep's decision on a running trial run (its reason; the trial's host polls it and
# stops the trainer), the step it was taken at, and on the parent run the rule's settings (JSON).
TAG_STOP_REQUEST = "hpsweep.stop_request"
TAG_STOPPED_AT = "hpsweep.stopped_at_step"
TAG_EARLY_STOP = "hpsweep.early_stop"
TAG_GPUS_PER_TRIAL = "hpsweep.gpus_per_trial"  # on the parent run: the spec's GPUs per trial (GPU-hours)
# On a trial run: its reported F1 is not what its own predictions give under the spec's metric (why, in words).
TAG_F1_MISMATCH = "hpsweep.warning.f1_mismatch"
TAG_METRIC = "hpsweep.metric"  # on the parent run: the spec's metric block, canonical JSON (what `report` recomputes)
TAG_TIE_BREAK = "hpsweep.tie_break"  # on the parent run: the tie-break rule the champion was picked by
TAG_ADOPTED_FROM = "hpsweep.adopted_from_sweep"
CHAMPION_ALIAS = "champion"
# The longest free text (a reason, a note) hpsweep writes into a tag or a model version's description,
# well under MLflow's own limits.
MAX_TAG_LEN = 5000
SETTINGS_PARAM_PREFIX = "settings."  # the spec's settings as params of the parent and every trial run
# The kind MLflow's experiment header shows. MLflow 3.17's UI does not read it to choose the view:
# it opens the GenAI pages unless the URL (or the browser's GenAI / Machine learning switch) says
# `workflowType=machine_learning` (hpsweep.store.uri.ui_url).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A runs-table view, stored on the experiment as the UI's "Share" button stores one: opened by
# `?viewStateShareKey=hpsweep`, it shows each trial's f1 and each sweep's best_f1 (metric columns
# are hidden by default, and MLflow has no per-experiment default).
RUNS_VIEW_KEY = "hpsweep"
RUNS_VIEW = {f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps({"selectedColumns": [
    "attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`", "metrics.`f1`", "metrics.`best_f1`"]})}


def int_tag(text: str | None) -> int | None:
    """An integer tag's value; None when the tag is absent or not an integer."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
