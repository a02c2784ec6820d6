"""The sweep lets its trainer account write its experiment.

On a tracking server with separate accounts (``mlflow_server/``), the sweep identity owns the
experiment it created and the trainer account (``HPSWEEP_TRAINER_USERNAME``, whose
credentials trials get) has no access to it until granted. The owner may grant: this asks the
server for EDIT on the experiment (idempotent). Nothing happens when the variable is unset.
"""

from __future__ import annotations

import logging
import os

from hpsweep.store.retry import refused_by_store, retrying

ENV_TRAINER_USERNAME = "HPSWEEP_TRAINER_USERNAME"
ENV_TRAINER_PASSWORD = "HPSWEEP_TRAINER_PASSWORD"
TRIAL_PERMISSION = "EDIT"

log = logging.getLogger("hpsweep")


def grant_trainer(tracking_uri: str, experiment_id: str) -> bool:
    """EDIT on ``experiment_id`` for the trainer account, if one is configured; True if granted.
    A refusal (this account does not own the experiment) is logged, not raised: an admin may
    have granted it already (``python -m mlflow_server grant``)."""
    trainer = os.environ.get(ENV_TRAINER_USERNAME)
    if not trainer or not tracking_uri.startswith(("http://", "https://")):
        return False
    # Only now: MLflow's auth client needs the `mlflow[auth]` extra, which the embedded default never does.
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    client = AuthServiceClient(tracking_uri)
    try:
        retrying(lambda: client.grant_user_permission(trainer, "experiment", experiment_id, TRIAL_PERMISSION),
                 "granting the trainer account its experiment")
    except MlflowException as e:
        if not refused_by_store(e):
            raise
        log.warning("could not grant %s %s on experiment %s (%s); an admin can: python -m mlflow_server grant "
                    "--experiment NAME --user %s", trainer, TRIAL_PERMISSION, experiment_id, e.message, trainer)
        return False
    return True
