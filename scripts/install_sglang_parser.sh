#!/usr/bin/env bash
# Install SGLang's argument parser (not a servable SGLang) into a venv of its own, for the
# tests that check the sglang backend against SGLang itself:
# tests/unit/lifecycle_backends/test_sglang_plan.py (the launch argv parsed by
# ServerArgs.add_cli_args) and tests/unit/engines/test_sim_sglang.py (the sim's metric
# names read from SGLang's metrics_collector.py). They find it by SAGE_TEST_SGLANG_PYTHON.
#
#   scripts/install_sglang_parser.sh VENV
#
# SGLang serves only with CUDA kernels (sgl-kernel, flashinfer, a CUDA torch: GBs), none of
# which the parser needs, so sglang goes in with --no-deps and then only what importing
# sglang.srt.server_args needs (found by importing it until nothing was missing):
# - torch: sglang/__init__ -> srt/utils/common.py imports it at module level, so it cannot
#   be left out; the pinned CPU wheel, as the project venv's (a bare requirement pulls CUDA);
# - ipython: sglang/utils.py imports IPython.display at module level;
# - the rest are small pure-Python or single-wheel packages.
# Measured here (2 cores, wheels from the local mirror): 66 s and 2.3 GiB from nothing (torch
# CPU 0.75 GiB, triton 1 GiB), 2 s when already installed.
# Idempotent: does nothing when VENV's python already imports the parser; an interrupted
# install is finished on the next run.
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: $0 VENV" >&2
  exit 2
fi
VENV=$1
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SAGE_TORCH_VERSION:-2.13.0}
SGLANG_VERSION=${SAGE_SGLANG_VERSION:-0.5.23}
# Import names in comments where they differ from the distribution.
PARSER_DEPS=(
  aiohttp
  ipython # IPython
  msgspec
  numpy
  orjson
  packaging
  pillow # PIL
  psutil
  pybase64
  pydantic
  pyzmq # zmq
  requests
  starlette
  tqdm
  triton # imported by srt/utils/common.py at module level (no GPU needed to import)
)

ready="import sglang.srt.server_args, importlib.metadata as m
assert m.version('sglang') == '$SGLANG_VERSION'"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$ready" >/dev/null 2>&1; then
  echo "== sglang parser: $VENV is ready (imports sglang.srt.server_args), nothing to do"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== sglang parser: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
echo "== sglang parser: pip install torch==$TORCH_VERSION (CPU wheel first)"
"${pip[@]}" install -q "torch==$TORCH_VERSION"
echo "== sglang parser: pip install ${PARSER_DEPS[*]}"
"${pip[@]}" install -q "${PARSER_DEPS[@]}"
# Last and --no-deps, so pip neither pulls its CUDA stack nor lists it as missing.
echo "== sglang parser: pip install --no-deps sglang==$SGLANG_VERSION"
"${pip[@]}" install -q --no-deps "sglang==$SGLANG_VERSION"
"$VENV/bin/python" -c "$ready
import argparse
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
print('== sglang parser: ready, sglang', m.version('sglang'), 'parses', len(parser._actions), 'options')"
