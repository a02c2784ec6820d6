"""The trainer account: what hpsweep's sweeps and trainers log in as.

MLflow's permission model (basic-auth app, MLflow 3.17) decides per resource *tier*. The
trainer role holds, on every resource (``*``):

| tier | permission | lets the trainer | withholds |
| --- | --- | --- | --- |
| experiment | EDIT | log into any experiment, tag it | deleting it |
| run | EDIT | create runs, log params/metrics/tags/artifacts | deleting runs |
| logged_model | EDIT | log models | deleting them |
| registered_model | EDIT | register versions, move the ``champion`` alias | deleting the model |
| registered_model_version | EDIT | create versions | deleting versions |

Creating an experiment or a registered model makes the creator its MANAGE owner (MLflow's
creator-as-owner rule), and MANAGE includes delete. The child-tier grants above are what
keep the trainer from deleting even what it created: MLflow judges a delete of an
experiment on every tier it cascades to (runs, logged models, ...) and a delete of a
registered model on its versions tier, and a grant on a child tier overrides the parent's
(``validate_can_delete_experiment`` / ``validate_can_delete_registered_model_or_prompt_cascade``).
Everyone else authenticated gets ``default_permission`` (READ): they see everything and
change nothing.

Idempotent: provisioning again (every start, every replica) converges the account to this
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
WORKSPACE = "default"  # workspaces are off: every grant lives in MLflow's default workspace
TRAINER_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("experiment", "*", "EDIT"),
    ("run", "*", "EDIT"),
    ("logged_model", "*", "EDIT"),
    ("registered_model", "*", "EDIT"),
    ("registered_model_version", "*", "EDIT"),
)


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
    from mlflow.server.auth.client import AuthServiceClient

    username, password = trainer
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
            log.warning("user %s was an admin: demoted (trainers must not be admins)", username)

        role = next((r for r in client.list_roles(WORKSPACE) if r.name == TRAINER_ROLE), None)
        if role is None:
            try:
                role = client.create_role(WORKSPACE, TRAINER_ROLE,
                                          "hpsweep trainers: create and log runs, register models; no deletes")
            except RestException as e:
                if not _exists(e):
                    raise
                role = next(r for r in client.list_roles(WORKSPACE) if r.name == TRAINER_ROLE)
        have = {(p.resource_type, p.resource_pattern): p for p in client.list_role_permissions(role.id)}
        wanted = {(t, pattern): perm for t, pattern, perm in TRAINER_GRANTS}
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
                log.warning("removing grant %s=%s from role %s", key, extra.permission, TRAINER_ROLE)
                client.remove_role_permission(extra.id)
        if not any(r.id == role.id for r in client.list_user_roles(username)):
            try:
                client.assign_role(username, role.id)
            except RestException as e:
                if not _exists(e):
                    raise
    log.info("trainer account %s: role %s with %s", username, TRAINER_ROLE,
             ", ".join(f"{t}={p}" for t, _, p in TRAINER_GRANTS))
