#!/usr/bin/env bash
# GPU embedding benchmark (benchmark issue, item 5), from the repo root of a machine with an
# NVIDIA GPU and python3 with torch + sentence-transformers (the `device` tool's machines).
# Carry: .whl (cp312 wheels of what the services need that the image lacks; see
# scripts/device/gpu_manager_check.sh) and .gpumodel (all-MiniLM-L6-v2 with fp16 weights,
# made by bench/gpu/make_model.py: the fp32 folder is over the transfer limit).
# Results: stdout and $OUT/gpu_results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/env.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "python: $("$PY" --version) at $(command -v "$PY")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec "$PY" bench/gpu/embedding_gpu.py --model "${MODEL:-.gpumodel/all-MiniLM-L6-v2-fp16}" "$@"
