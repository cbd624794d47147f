#!/usr/bin/env bash
# The one test command: installs what is missing, type-checks, then runs every test file.
# Each test file starts the real servers it needs (PostgreSQL, swtpm) in temp dirs and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== typecheck"
npx --no-install tsc --noEmit
echo "== tests"
mapfile -t files < <(find test -name '*.test.ts' -not -path '*/node_modules/*' | sort)
start=$(date +%s)
node --import tsx --test --test-concurrency=2 --test-timeout=180000 "${files[@]}"
echo "test suite wall time: $(( $(date +%s) - start ))s"
