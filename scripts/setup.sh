#!/usr/bin/env bash
# Installs everything agent-gateway needs on a fresh Debian machine of this kind (run as root,
# or with sudo available): PostgreSQL, swtpm + tpm2-abrmd + tpm2-pkcs11, the libp11 OpenSSL
# engine, curl and nghttp2 for tests and benchmarks, then the npm dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  postgresql postgresql-contrib
  swtpm swtpm-tools tpm2-tools tpm2-abrmd dbus
  libtss2-dev libtss2-tcti-swtpm0 libtss2-tcti-tabrmd0
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools
  libengine-pkcs11-openssl opensc openssl
  curl nghttp2-client nghttp2-server
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's postgresql package creates a default cluster and may start it; we never use it.
if [ "${AGENT_GATEWAY_KEEP_DEFAULT_PG:-}" != "1" ] && command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1, $2}' | while read -r ver name; do
    pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund 2>&1 | grep -v 'Unknown user config' >&2 || true
  test -d node_modules/pkcs11js || { echo "setup: npm ci failed" >&2; exit 1; }
fi
# Install scripts may be skipped by npm's allow-list: make sure the native PKCS#11 binding exists.
if ! node -e "require('pkcs11js')" >/dev/null 2>&1; then
  npm rebuild pkcs11js 2>&1 | grep -v 'Unknown user config' >&2 || true
  node -e "require('pkcs11js')"
fi
