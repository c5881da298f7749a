#!/usr/bin/env bash
# Debian packages that the browser, Prometheus and cluster tests drive: chromium +
# chromium-driver (tests/dashboard), prometheus with promtool (tests/observability) and
# etcd-server (etcd mode: tests/unit/etcd, the netns fault suite). Installs only what is
# missing, and only where it can (root with apt-get); elsewhere those tests skip with a reason.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || { [[ " ${need[*]} " == *" prometheus "* ]] || need+=(prometheus); }
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ "${#need[@]}" -eq 0 ]; then
  echo "== system tools: chromium, chromedriver, prometheus, promtool, etcd present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "== system tools: missing ${need[*]} and no root apt-get here; browser/Prometheus/etcd tests will skip"
  exit 0
fi
echo "== system tools: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || echo "apt-get update failed; trying the install anyway"
if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/sage-apt.log 2>&1; then
  echo "apt-get install failed (log: /tmp/sage-apt.log); browser/Prometheus/etcd tests will skip" >&2
fi
