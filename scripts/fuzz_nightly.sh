#!/usr/bin/env bash
# Nightly fuzzing: thousands of schemathesis cases against a live edge, plus the property
# and malformed-gRPC tests with more examples. CI runs the same tests with ~200 cases.
#   SAGE_FUZZ_EXAMPLES   total schemathesis cases (default here 5000)
#   SAGE_FUZZ_PROFILE    "nightly" gives the property and gRPC tests 10x the examples
set -euo pipefail
cd "$(dirname "$0")/.."
export SAGE_FUZZ_EXAMPLES="${SAGE_FUZZ_EXAMPLES:-5000}"
export SAGE_FUZZ_PROFILE="${SAGE_FUZZ_PROFILE:-nightly}"
exec python -m pytest tests/fuzz -q -p no:cacheprovider -o timeout=1800 "$@"
