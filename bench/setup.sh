#!/usr/bin/env bash
# Installs what `npm run bench` needs beyond scripts/setup.sh (which it runs first): the baseline
# proxies nghttpx (Debian nghttp2-proxy) and squid, and procps. Kept out of scripts/setup.sh so
# the test suite does not pay for them. Idempotent; run as root or with sudo available.
#
# Debian's packages come with a service each (squid on :3128, nghttpx on :3000). The bench never
# uses them: it starts its own instances on loopback with their own config, pid and log files. If
# installing started a service (a machine without a policy-rc.d that forbids it), it is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# shellcheck source=../scripts/apt.sh
source scripts/apt.sh
if apt_install_missing bench/setup nghttp2-proxy squid procps openssl; then
  for service in squid nghttpx; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
      $APT_SUDO systemctl stop "$service" || true
      $APT_SUDO systemctl disable --quiet "$service" 2>/dev/null || true
    elif [ -x "/etc/init.d/$service" ] && "/etc/init.d/$service" status >/dev/null 2>&1; then
      $APT_SUDO "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
  done
fi
for tool in nghttpx squid; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "bench/setup: $tool is missing after install" >&2; exit 1; }
done
