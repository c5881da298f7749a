#!/usr/bin/env bash
# Static checks CI runs before the tests: lint, format, types, contracts, generated code.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
# mypy maps files to modules by folder; expose services/ as sage.services for it.
mkdir -p .mypy_bases/sage && ln -sfn ../../services .mypy_bases/sage/services
mypy src .mypy_bases tests bench
echo "== generated protobuf code"; scripts/check_protos.sh
echo "== buf lint"
if [ "${SAGE_SKIP_BUF:-0}" = 1 ]; then
  echo "skipped (SAGE_SKIP_BUF=1)"
else
  npx --yes @bufbuild/buf@1.75.0 lint
fi
