#!/usr/bin/env bash
# `npm run bench`: installs what is missing (bench/setup.sh: scripts/setup.sh, then nghttpx and
# squid), then compares our gateway with nghttpx in front of squid on this machine
# (bench/compare.ts). Arguments are passed on, e.g. `npm run bench -- --revocation-tunnels 10000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
# shellcheck source=../scripts/runtime.sh
source scripts/runtime.sh
agent_gateway_runtime_check
# compare.ts runs bin/agent-gateway.js, i.e. dist/: setup.sh rebuilt it if any source is newer.
# --floor strips bench/floor-proxy.ts's types with node:module's stripTypeScriptTypes, still marked experimental.
exec node --disable-warning=ExperimentalWarning --import tsx bench/compare.ts "$@"
