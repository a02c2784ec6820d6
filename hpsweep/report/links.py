"""Addresses in the MLflow UI of a sweep's experiment and runs (for Prefect's leaderboard artifact).

A tracking server (``http(s)://``) serves its own UI; any other store (SQLite, PostgreSQL, a folder)
is seen through `mlflow ui` started on it, which listens on 127.0.0.1:5000 by default.
"""

from __future__ import annotations

from urllib.parse import quote

from hpsweep.store.uri import is_tracking_server, ui_base


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{quote(str(experiment_id), safe='')}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{experiment_url(tracking_uri, experiment_id)}/runs/{quote(run_id, safe='')}"


def mlflow_ui_note(tracking_uri: str, experiment_id: str) -> str:
    """One markdown line: where the experiment is, and for a store without a server how to open its UI."""
    line = f"MLflow: [experiment {experiment_id}]({experiment_url(tracking_uri, experiment_id)})"
    if is_tracking_server(tracking_uri):
        return line
    return (f"{line}; the links work once the MLflow UI runs on this store: "
            f"`mlflow ui --backend-store-uri {tracking_uri}` (in the sweep's folder)")
