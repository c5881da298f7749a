#!/usr/bin/env bash
# Real-GPU check of the GPU manager (issue 5), from the repo root of a machine with an NVIDIA
# GPU: the service's readings against nvidia-smi, reserve/release, bad input, a restart that
# keeps the reservation, reconcile of a dead owner, `sage llm gpu` (scripts/device/gpu_check.py).
#
# Without a package index there (the device machines), carry the wheels the service needs in
# .whl/ (cp312, e.g. grpcio protobuf grpcio-health-checking grpcio-reflection
# googleapis-common-protos pydantic pydantic-core pydantic-settings python-dotenv
# typing-inspection annotated-types opentelemetry-api/-sdk/-semantic-conventions orjson
# typing_extensions): they are installed
# into a private folder. The repo itself is imported from the working tree, not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/env.sh
SAGE_HOME=$(mktemp -d)
export SAGE_HOME PYTHONUNBUFFERED=1
echo "python: $("$PY" --version) at $(command -v "$PY")"
nvidia-smi --query-gpu=driver_version,memory.reserved --format=csv || true
exec "$PY" scripts/device/gpu_check.py
