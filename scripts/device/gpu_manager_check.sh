#!/usr/bin/env bash
# Real-GPU check of the GPU manager (issue 5), from the repo root of a machine with an NVIDIA
# GPU: the service's readings against nvidia-smi, reserve/release, bad input, a restart that
# keeps the reservation, reconcile of a dead owner, `sage llm gpu` (scripts/device/gpu_check.py).
#
# Without a package index there (the device machines), carry the wheels the service needs in
# .whl/ (cp312, e.g. grpcio protobuf grpcio-health-checking grpcio-reflection pydantic
# pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
# opentelemetry-api/-sdk/-semantic-conventions orjson typing_extensions): they are installed
# into a private folder. The repo itself is imported from the working tree, not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# `sage` is a namespace package; `sage.services` is services/ (setuptools package-dir).
shim=$(mktemp -d)
mkdir -p "$shim/sage"
ln -s "$PWD/services" "$shim/sage/services"
export PYTHONPATH="$PWD/src:$shim:$PYTHONPATH"
SAGE_HOME=$(mktemp -d)
export SAGE_HOME PYTHONUNBUFFERED=1
echo "python: $("$PY" --version) at $(command -v "$PY")"
nvidia-smi --query-gpu=driver_version,memory.reserved --format=csv || true
exec "$PY" scripts/device/gpu_check.py
