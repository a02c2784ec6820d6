#!/usr/bin/env bash
# Lint the infrastructure: cfn-lint on the CloudFormation templates, checkov on infra/ and the
# MLflow server's Dockerfile. Exits non-zero on any finding.
#
# The linters live in their own virtualenv (.venv-infra, git-ignored): their pins clash with
# the project's (cfn-lint and checkov pull their own boto3/pydantic/networkx versions).
# checkov runs offline (--skip-download): no call to Prisma Cloud.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${INFRA_VENV:-.venv-infra}
CFN_LINT_VERSION=${CFN_LINT_VERSION:-1.58.0}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}

if ! "$VENV/bin/cfn-lint" --version 2>/dev/null | grep -q "$CFN_LINT_VERSION" \
   || ! "$VENV/bin/checkov" --version 2>/dev/null | grep -q "$CHECKOV_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "cfn-lint==$CFN_LINT_VERSION" "checkov==$CHECKOV_VERSION" >"$VENV/install.log" 2>&1 \
    || { cat "$VENV/install.log"; exit 1; }
fi

status=0
echo "== cfn-lint infra/cloudformation"
"$VENV/bin/cfn-lint" infra/cloudformation/*.yaml || status=1

echo "== checkov infra/ mlflow_server/Dockerfile"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework cloudformation dockerfile \
  -d infra -f mlflow_server/Dockerfile || status=1

exit $status
