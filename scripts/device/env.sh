# Sourced by the device scripts (scripts/device/*.sh, bench/gpu/run.sh) from the repo root:
# puts this working tree's `sage` on PYTHONPATH without installing it, after the wheels
# carried in .whl/ (cp312: the device machines have no package index), unless SKIP_WHL=1.
# Sets PY (python3 unless $PYTHON).
PY=${PYTHON:-python3}
if [ "${SKIP_WHL:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
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
export PYTHONUNBUFFERED=1
