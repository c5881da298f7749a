#!/usr/bin/env bash
# Install the SAGE LLM control plane as systemd services on this host.
#
#   sudo deploy/systemd/install.sh                   # all five services (sage-llm.target)
#   sudo deploy/systemd/install.sh --node-agent      # GPU host: gpu_manager + lifecycle only
#   sudo deploy/systemd/install.sh --control-plane   # edge + scheduler + embedding only
#   options: --etcd (etcd mode: env/*-etcd.env templates), --join (a further control-plane
#   host: use the first one's admin.key and internal.token), --engines (also install torch
#   engines), --no-start, --python PATH
#
# Creates the `sage` system user, a venv in /opt/sage/venv with this checkout installed,
# /etc/sage/sage.env (kept if it exists), /var/lib/sage, the units, then daemon-reload and
# (unless --no-start) enables and starts the target.
set -euo pipefail

PREFIX=/opt/sage
ETC_DIR=/etc/sage
STATE_DIR=/var/lib/sage
UNIT_DIR=/etc/systemd/system
SAGE_USER=sage
PYTHON=python3
ROLE=all
ETCD=0
JOIN=0
EXTRAS="[server]"  # the services; --engines adds the torch engines (and includes server)
START=1

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --node-agent) ROLE=node-agent ;;
    --control-plane) ROLE=control-plane ;;
    --etcd) ETCD=1 ;;
    --join) JOIN=1 ;;
    --engines) EXTRAS="[engines]" ;;
    --no-start) START=0 ;;
    --python)
      shift
      PYTHON="${1:?--python needs a path}"
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "install.sh: unknown option: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done

# One machine needs no etcd: etcd mode is for hosts that each run part of the stack.
if [ "${ETCD}" = 1 ] && [ "${ROLE}" = all ]; then
  echo "install.sh: --etcd needs --control-plane or --node-agent (one machine runs without etcd)" >&2
  exit 2
fi
if [ "${JOIN}" = 1 ] && [ "${ROLE}" != control-plane ]; then
  echo "install.sh: --join is for a further --control-plane host" >&2
  exit 2
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it creates a user and installs units)" >&2
  exit 1
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"

if [ "${ROLE}" = node-agent ]; then
  TARGET=sage-node-agent.target
  UNITS=(sage-gpu-manager.service sage-lifecycle.service)
  ENV_TEMPLATE="${HERE}/env/node-agent.env"
  [ "${ETCD}" = 1 ] && ENV_TEMPLATE="${HERE}/env/node-agent-etcd.env"
elif [ "${ROLE}" = control-plane ]; then
  TARGET=sage-control-plane.target
  UNITS=(sage-embedding.service sage-scheduler.service sage-edge.service)
  # Without etcd a control-plane host is the one central host of SAGE_NODE_* agents.
  ENV_TEMPLATE="${HERE}/env/sage.env"
  [ "${ETCD}" = 1 ] && ENV_TEMPLATE="${HERE}/env/control-plane-etcd.env"
else
  TARGET=sage-llm.target
  UNITS=(sage-embedding.service sage-scheduler.service sage-edge.service
    sage-gpu-manager.service sage-lifecycle.service)
  ENV_TEMPLATE="${HERE}/env/sage.env"
fi

echo "== user ${SAGE_USER}"
if ! id -u "${SAGE_USER}" >/dev/null 2>&1; then
  useradd --system --home-dir "${STATE_DIR}" --shell /usr/sbin/nologin "${SAGE_USER}"
fi

echo "== directories"
install -d -m 0755 "${PREFIX}"
install -d -m 0750 -o root -g "${SAGE_USER}" "${ETC_DIR}"
install -d -m 0750 -o "${SAGE_USER}" -g "${SAGE_USER}" "${STATE_DIR}"

echo "== venv ${PREFIX}/venv (${REPO}${EXTRAS})"
if [ ! -x "${PREFIX}/venv/bin/python" ]; then
  "${PYTHON}" -m venv "${PREFIX}/venv"
fi
"${PREFIX}/venv/bin/python" -m pip install --upgrade pip
"${PREFIX}/venv/bin/python" -m pip install "${REPO}${EXTRAS}"

echo "== settings ${ETC_DIR}/sage.env"
if [ -e "${ETC_DIR}/sage.env" ]; then
  echo "   kept the existing file; the template is ${ENV_TEMPLATE}"
else
  install -m 0640 -o root -g "${SAGE_USER}" "${ENV_TEMPLATE}" "${ETC_DIR}/sage.env"
fi

# The admin key (/v1/management/*) and the internal gRPC token: 0600 files owned by sage in
# $SAGE_HOME/llm, where the services look for them (they refuse files others can read).
echo "== secrets ${STATE_DIR}/llm (mode 0600, owner ${SAGE_USER})"
install -d -m 0700 -o "${SAGE_USER}" -g "${SAGE_USER}" "${STATE_DIR}/llm"
make_secret() {
  local path="$1" prefix="$2"
  if [ -e "${path}" ]; then
    echo "   kept ${path}"
    return
  fi
  "${PREFIX}/venv/bin/python" -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(32))' "${prefix}" |
    install -m 0600 -o "${SAGE_USER}" -g "${SAGE_USER}" /dev/stdin "${path}"
  echo "   created ${path}"
}
# Every host of a stack shares one token (and the control plane one admin key): node agents
# and further control-plane hosts (--join) get copies of the first control-plane host's.
if [ "${ROLE}" = node-agent ] || [ "${JOIN}" = 1 ]; then
  shared=(internal.token)
  [ "${JOIN}" = 1 ] && shared+=(admin.key)
  for name in "${shared[@]}"; do
    if [ ! -e "${STATE_DIR}/llm/${name}" ]; then
      echo "   copy the first control-plane host's ${STATE_DIR}/llm/${name} here (0600, owner ${SAGE_USER}) before starting" >&2
    fi
  done
else
  make_secret "${STATE_DIR}/llm/admin.key" "sk-admin-"
  make_secret "${STATE_DIR}/llm/internal.token" ""
fi

echo "== units -> ${UNIT_DIR}"
for unit in "${UNITS[@]}" "${TARGET}"; do
  install -m 0644 "${HERE}/${unit}" "${UNIT_DIR}/${unit}"
done
systemctl daemon-reload

if [ "${START}" = 1 ]; then
  systemctl enable --now "${TARGET}"
  systemctl --no-pager status "${TARGET}" || true
else
  echo "installed; start with: systemctl enable --now ${TARGET}"
fi
