#!/usr/bin/env bash
# The one test command: installs what is missing (scripts/setup.sh: apt packages, Node.js 24 and 22
# from the npm registry, npm dependencies), then on the selected runtime (AGENT_GATEWAY_NODE=24,
# the default, or 22; see scripts/runtime.sh) type-checks, compiles dist/ afresh (tests that spawn
# bin/*.js run the compiled output, so it is never stale) and runs every test file.
# Each test file starts the real servers it needs (PostgreSQL, swtpm) in temp dirs and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=runtime.sh
source scripts/runtime.sh
agent_gateway_runtime_check
# Tests compare this with the process.version they run on (test/unit/runtime.test.ts).
export AGENT_GATEWAY_NODE_VERSION
echo "== runtime: node $(node --version) at $(command -v node)"
echo "== typecheck"
npx --no-install tsc --noEmit
echo "== build (dist/)"
npm run --silent build
echo "== tests"
mapfile -t files < <(find test -name '*.test.ts' -not -path '*/node_modules/*' | sort)
start=$(date +%s)
status=0
# No --test-force-exit: it ends a file before all of its results are reported (tried: 183 of 222
# tests counted), so a file must let go of everything it spawned by itself.
node --import tsx --test --test-concurrency=2 --test-timeout=180000 "${files[@]}" || status=$?
echo "test suite wall time on node $(node --version): $(( $(date +%s) - start ))s"
exit "$status"
