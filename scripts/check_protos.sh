#!/usr/bin/env bash
# Fails when src/sage/rpc differs from what scripts/gen_protos.sh makes from protos/.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/repo/scripts" "$tmp/repo/src/sage/rpc"
cp -r protos "$tmp/repo/"
cp scripts/gen_protos.sh "$tmp/repo/scripts/"
if ! out=$("$tmp/repo/scripts/gen_protos.sh" 2>&1); then echo "$out" >&2; exit 1; fi
if ! diff -r -x __pycache__ "$tmp/repo/src/sage/rpc" src/sage/rpc; then
  echo "generated code in src/sage/rpc is stale: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
echo "generated code matches protos/"
