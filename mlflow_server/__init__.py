"""The production-shaped MLflow tracking server for hpsweep: PostgreSQL backend store,
artifacts proxied to S3, basic authentication with an admin, a sweep and a trainer account, several
workers, ``/health``. Settings from the environment only (``settings.load``).

Entry point: ``python -m mlflow_server`` (or ``mlflow_server/start.sh``).
"""

__all__ = ["accounts", "artifact_guard", "database", "server", "settings"]
