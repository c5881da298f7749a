#!/usr/bin/env bash
# Nightly fuzzing: thousands of schemathesis cases against a live control plane (every
# operation of /openapi.json, keyed, keyless and with a wrong key, every built-in check),
# plus the property and malformed-gRPC tests with 10x the examples (~5 min on 2 cores). CI
# runs the same tests asking for 200 (~3,000 cases with schemathesis' coverage phase). Leaves
# a JSON summary (cases, statuses, failures per check, tracebacks logged, pytest's exit code)
# and prints it.
#
#   scripts/fuzz_nightly.sh [--examples N] [--report PATH] [--timeout S] [-- PYTEST_ARGS...]
#
#   --examples N   schemathesis cases asked for over all operations (default 40000, or
#                  $SAGE_FUZZ_EXAMPLES); ~19,000 run: operations without inputs run out
#   --report PATH  the JSON summary (default bench/out/fuzz_nightly.json, or $SAGE_FUZZ_REPORT)
#   --timeout S    per-test pytest timeout (default 1800)
#   SAGE_FUZZ_PROFILE=nightly (the default here) gives the property and gRPC tests 10x examples
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '9,15p' "$0" | sed 's/^# \{0,1\}//'; }

examples="${SAGE_FUZZ_EXAMPLES:-40000}"
report="${SAGE_FUZZ_REPORT:-bench/out/fuzz_nightly.json}"
timeout_s=1800
pytest_args=()
while (($#)); do
    case "$1" in
    --examples | --report | --timeout)
        if (($# < 2)); then
            echo "fuzz_nightly: $1 needs a value" >&2
            exit 2
        fi
        case "$1" in
        --examples) examples="$2" ;;
        --report) report="$2" ;;
        --timeout) timeout_s="$2" ;;
        esac
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        pytest_args=("$@")
        break
        ;;
    *)
        echo "fuzz_nightly: unknown argument $1 (pytest arguments go after --)" >&2
        usage >&2
        exit 2
        ;;
    esac
done
for value in "$examples" "$timeout_s"; do
    if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz_nightly: expected a positive integer, got '$value'" >&2
        exit 2
    fi
done

export SAGE_FUZZ_EXAMPLES="$examples"
export SAGE_FUZZ_PROFILE="${SAGE_FUZZ_PROFILE:-nightly}"
export SAGE_FUZZ_REPORT="$report"
python=python # the project's venv (scripts/test.sh makes it) unless there is none
if [[ -x "${SAGE_VENV:-.venv}/bin/python" ]]; then python="${SAGE_VENV:-.venv}/bin/python"; fi
command=("$python" -m pytest tests/fuzz -q -p no:cacheprovider -o "timeout=$timeout_s" "${pytest_args[@]}")
if [[ -n "${SAGE_FUZZ_DRY_RUN:-}" ]]; then # the argument handling's test: say, run nothing
    echo "SAGE_FUZZ_EXAMPLES=$SAGE_FUZZ_EXAMPLES SAGE_FUZZ_PROFILE=$SAGE_FUZZ_PROFILE SAGE_FUZZ_REPORT=$SAGE_FUZZ_REPORT ${command[*]}"
    exit 0
fi
mkdir -p "$(dirname "$report")"
rm -f "$report"

started=$(date +%s)
rc=0
"${command[@]}" || rc=$?
"$python" - "$report" "$rc" "$(($(date +%s) - started))" "$examples" <<'EOF'
import json
import sys
from pathlib import Path

path, rc, wall_s, examples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
summary = json.loads(path.read_text()) if path.exists() else {"cases": None}
summary.update(pytest_exit_code=rc, wall_s=wall_s, examples_asked=int(examples))
path.write_text(json.dumps(summary, indent=2) + "\n")
failed = {k: v for k, v in summary.get("failures_by_check", {}).items() if v}
print(
    f"fuzz_nightly: {summary['cases']} schemathesis cases, "
    f"{summary.get('server_errors')} 5xx, failures by check {failed or 'none'}, "
    f"{summary.get('tracebacks_logged')} tracebacks logged, pytest exit {rc}, {wall_s} s "
    f"-> {path}"
)
EOF
exit "$rc"
