#!/usr/bin/env sh
# Start the production-shaped MLflow tracking server (see mlflow_server/README.md for the
# environment variables it reads). Runs from any directory; extra arguments go to
# `python -m mlflow_server` (e.g. `migrate`, `check`).
set -eu
here="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m mlflow_server "$@"
