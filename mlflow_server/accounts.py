"""hpsweep's two accounts: the **sweep** identity and the **trainer** identity.

MLflow's permission model (basic-auth app, MLflow 3.17) decides per resource *tier*, and
every account without a grant gets ``default_permission`` (``NO_PERMISSIONS``): it sees and
changes nothing it was not given.

The **sweep** identity (role ``hpsweep-sweep``) creates a sweep's experiment and parent run,
registers the champion and moves its alias. It owns what it creates (MLflow's
creator-as-owner rule: MANAGE) and grants the trainer EDIT on its experiments. Its role holds
only child-tier grants, which keep it from deleting even what it owns (MLflow judges a delete
of an experiment on every tier it cascades to, and a grant on a child tier overrides the
parent's; likewise the model-version tier for a registered model):

| tier | permission | lets the sweep | withholds |
| --- | --- | --- | --- |
| run | EDIT | write runs of experiments it can read | deleting runs, so its experiments |
| logged_model | EDIT | log models there | deleting them |
| registered_model_version | EDIT | create versions of models it owns | deleting versions, so its models |

None of these reaches another account's experiment or model: every run and version check
also requires READ on the experiment or model itself, which it does not hold.

The **trainer** identity (role ``hpsweep-trainer``) writes the trial runs of the sweeps it
was granted (per-experiment EDIT, ``grant``): create runs, log, upload artifacts; no delete
(EDIT has none). Its role only *denies*, so no grant elsewhere can widen it:

| tier | permission | |
| --- | --- | --- |
| registered_model, registered_model_version, prompt, prompt_version | DENY | no model registry at all |

Idempotent: provisioning again (every start, every replica) converges each account to its
table and resets its password to the configured one, so a rotated secret takes effect on the
next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from mlflow.exceptions import MlflowException, RestException

log = logging.getLogger("mlflow_server")

TRAINER_ROLE = "hpsweep-trainer"
SWEEP_ROLE = "hpsweep-sweep"
WORKSPACE = "default"  # workspaces are off: every grant lives in MLflow's default workspace
TRAINER_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("registered_model", "*", "DENY"),
    ("registered_model_version", "*", "DENY"),
    ("prompt", "*", "DENY"),
    ("prompt_version", "*", "DENY"),
)
SWEEP_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("run", "*", "EDIT"),
    ("logged_model", "*", "EDIT"),
    ("registered_model_version", "*", "EDIT"),
)
# What the trainer gets on a sweep's experiment: write runs, never delete.
TRIAL_PERMISSION = "EDIT"


@contextlib.contextmanager
def _credentials(username: str, password: str) -> Iterator[None]:
    """MLflow's REST clients take credentials from the environment only: set them for the call."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(dict(zip(names, (username, password), strict=True)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _exists(e: MlflowException) -> bool:
    return e.error_code == "RESOURCE_ALREADY_EXISTS"


def provision_trainer(url: str, admin: tuple[str, str], trainer: tuple[str, str]) -> None:
    """Create or update the trainer account and its role on the server at ``url``, as admin."""
    provision(url, admin, trainer, TRAINER_ROLE, TRAINER_GRANTS,
              "hpsweep trainers: write the trial runs of granted sweeps; no registry, no deletes")


def provision_sweep(url: str, admin: tuple[str, str], sweep: tuple[str, str]) -> None:
    """Create or update the sweep account and its role on the server at ``url``, as admin."""
    provision(url, admin, sweep, SWEEP_ROLE, SWEEP_GRANTS,
              "hpsweep sweeps: create experiments and runs, register champions; no deletes")


def provision(url: str, admin: tuple[str, str], account: tuple[str, str], role_name: str,
              grants: tuple[tuple[str, str, str], ...], description: str) -> None:
    """Create or update ``account``, with exactly ``grants`` in its role ``role_name``, as admin."""
    from mlflow.server.auth.client import AuthServiceClient

    username, password = account
    client = AuthServiceClient(url)
    with _credentials(*admin):
        try:
            client.create_user(username, password)
            log.info("created user %s", username)
        except RestException as e:
            if not _exists(e):
                raise
            client.update_user_password(username, password)
        if client.get_user(username).is_admin:
            client.update_user_admin(username, False)
            log.warning("user %s was an admin: demoted (hpsweep's accounts must not be admins)", username)

        role = next((r for r in client.list_roles(WORKSPACE) if r.name == role_name), None)
        if role is None:
            try:
                role = client.create_role(WORKSPACE, role_name, description)
            except RestException as e:
                if not _exists(e):
                    raise
                role = next(r for r in client.list_roles(WORKSPACE) if r.name == role_name)
        have = {(p.resource_type, p.resource_pattern): p for p in client.list_role_permissions(role.id)}
        wanted = {(t, pattern): perm for t, pattern, perm in grants}
        for key, perm in wanted.items():
            current = have.get(key)
            if current is None:
                try:
                    client.add_role_permission(role.id, key[0], key[1], perm)
                except RestException as e:
                    if not _exists(e):
                        raise
            elif current.permission != perm:
                client.update_role_permission(current.id, perm)
        for key, extra in have.items():  # a grant someone added by hand widens the role: remove it
            if key not in wanted:
                log.warning("removing grant %s=%s from role %s", key, extra.permission, role_name)
                client.remove_role_permission(extra.id)
        if not any(r.id == role.id for r in client.list_user_roles(username)):
            try:
                client.assign_role(username, role.id)
            except RestException as e:
                if not _exists(e):
                    raise
    log.info("account %s: role %s with %s", username, role_name,
             ", ".join(f"{t}={p}" for t, _, p in grants))


def grant_experiment(url: str, admin: tuple[str, str], experiment: str, username: str,
                     permission: str = TRIAL_PERMISSION) -> str:
    """Give ``username`` ``permission`` on the experiment named ``experiment``, as admin; returns its id."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    with _credentials(*admin):
        found = MlflowClient(url).get_experiment_by_name(experiment)
        if found is None:
            raise LookupError(f"no experiment named {experiment!r} on {url}")
        AuthServiceClient(url).grant_user_permission(username, "experiment", found.experiment_id, permission)
    log.info("granted %s %s on experiment %s (%s)", username, permission, experiment, found.experiment_id)
    return found.experiment_id
