"""The artifact guard: an artifact write through the proxy is a write to its run.

MLflow's auth app judges ``PUT /api/2.0/mlflow-artifacts/artifacts/<path>`` (and the
multipart-upload routes) by the experiment id at the front of the *path*, and knows nothing
of the run's state. hpsweep's rule is stricter: a proxied run artifact lives at
``<experiment_id>/<run_id>/artifacts/...`` (the layout of ``mlflow-artifacts:/`` run URIs),
and writing there is

- refused unless the run exists and belongs to that experiment;
- refused once the run is FINISHED, for everyone but admins (a finished trial's model can
  never be replaced);
- otherwise decided exactly like any other write to the run (``UpdateRun``'s check: READ on
  the run's experiment, ``update`` on the run tier falling back to the experiment).

Installed as the auth app's ``authorization_function`` (``basic_auth.ini``): MLflow's basic
authentication first, then this check. That hook, unlike a Flask ``before_request``, also
runs for the upload route FastAPI serves natively under uvicorn. Other paths (logged models,
traces) stay with MLflow's own path-based check.
"""

from __future__ import annotations

import re

from flask import Response, request

_PREFIXES = ("/api/2.0/mlflow-artifacts/", "/ajax-api/2.0/mlflow-artifacts/")
# Write routes under a prefix, by method. Abort only throws an upload away: not a write.
_WRITE_ROUTES = {"PUT": ("artifacts/",), "POST": ("mpu/create/", "mpu/complete/")}
_RUN_ARTIFACT = re.compile(r"^(\d+)/([0-9a-f]{32})/artifacts(?:/|$)")
# MLflow authenticates several times per request: decide once, on the request's own environ
# (not flask.g, whose app context can outlive a request in MLflow's FastAPI bridge).
_DECIDED = "hpsweep.artifact_guard"


def authenticate():
    """MLflow's basic authentication, then the artifact guard: an Authorization or a 401/403 Response."""
    from mlflow.server.auth import authenticate_request_basic_auth

    result = authenticate_request_basic_auth()
    if isinstance(result, Response):
        return result
    if _DECIDED not in request.environ:
        request.environ[_DECIDED] = refusal(result.username)
    return request.environ[_DECIDED] or result


def written_artifact_path(method: str, path: str) -> str | None:
    """The artifact path a request writes, or None if it writes none."""
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):]
            return next((rest[len(route):] for route in _WRITE_ROUTES.get(method, ()) if rest.startswith(route)),
                        None)
    return None


def run_of(artifact_path: str) -> tuple[str, str] | None:
    """(experiment id, run id) of a run artifact path, None for any other path. Raises
    MlflowException for a path the artifact handlers would reject (``..``, double encoding)."""
    from mlflow.utils.uri import validate_path_is_safe

    match = _RUN_ARTIFACT.match(validate_path_is_safe(artifact_path).lstrip("/"))
    return (match.group(1), match.group(2)) if match else None


def refusal(username: str) -> Response | None:
    """A 403 if this request writes a run's artifact that ``username`` may not write, else None."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import auth

    artifact_path = written_artifact_path(request.method, request.path)
    if artifact_path is None or auth.store.get_user(username).is_admin:
        return None
    try:
        target = run_of(artifact_path)
    except MlflowException:
        return _forbidden("invalid artifact path")
    if target is None:
        return None  # not a run's artifact: MLflow's own check decides
    experiment_id, run_id = target
    resolved = auth._run_requirement(run_id, "update")  # None: no such run
    if resolved is None:
        return _forbidden(f"no run {run_id}")
    anchor, requirements = resolved
    if anchor[1] != experiment_id:
        return _forbidden(f"run {run_id} is not in experiment {experiment_id}")
    run = auth._get_tracking_store().get_run(run_id)
    if run.info.status == "FINISHED":
        return _forbidden(f"run {run_id} is FINISHED: its artifacts can no longer be written")
    if run.info.lifecycle_stage != "active":
        return _forbidden(f"run {run_id} is deleted")
    if not auth.authorize(username, anchor, requirements):
        return _forbidden("Permission denied")
    return None


def _forbidden(why: str) -> Response:
    return Response(why, status=403, mimetype="text/plain")
