#!/usr/bin/env bash
# Regenerates src/sage/rpc from protos/ (messages, grpc stubs and mypy-protobuf .pyi stubs).
# Generated code is committed; CI runs this and fails on drift (scripts/check_protos.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/sage/rpc
find "$out" -name '*_pb2*.py*' -delete 2>/dev/null || true
mapfile -t files < <(cd protos && find sage -name '*.proto' | sort)
(cd protos && python -m grpc_tools.protoc -I . \
  --python_out=../src --grpc_python_out=../src \
  --mypy_out=../src --mypy_grpc_out=../src \
  "${files[@]}")
# Package markers so `sage.rpc.<svc>.v1` imports as regular packages.
for d in $(find "$out" -type d -not -name '__pycache__'); do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
echo "generated ${#files[@]} proto files into $out"
