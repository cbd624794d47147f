#!/usr/bin/env bash
# Gateway quick start on one machine: installs what is missing (Node.js 24 and dist/ included),
# starts a throwaway PostgreSQL cluster under .quickstart/, applies the migrations, generates a
# local server certificate, writes config.toml when absent, and runs the compiled gateway in the
# foreground on Node.js 24 (Ctrl-C stops both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=runtime.sh
source scripts/runtime.sh   # Node.js 24 from .runtime/ first on PATH (AGENT_GATEWAY_NODE=22 for 22)
agent_gateway_runtime_check

STATE="${AGENT_GATEWAY_QUICKSTART_DIR:-$PWD/.quickstart}"
PG_PORT="${AGENT_GATEWAY_QUICKSTART_PG_PORT:-55432}"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
mkdir -p "$STATE" certs
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ ! -d "$STATE/pg/data" ]; then
  mkdir -p "$STATE/pg"
  [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$STATE/pg"
  as_pg "$PG_BIN/initdb" -D "$STATE/pg/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
fi
if ! as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" status >/dev/null 2>&1; then
  as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $STATE/pg" start >/dev/null
fi
trap 'as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -m fast stop >/dev/null 2>&1 || true' EXIT

export AGENT_GATEWAY_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
# Apply the migrations newer than the database's schema_version, in order.
version=$(psql -X -q -d "$AGENT_GATEWAY_DATABASE_URL" -tAc 'SELECT version FROM schema_version' 2>/dev/null || echo 0)
for file in migrations/[0-9][0-9][0-9][0-9]_*.sql; do
  n=$((10#$(basename "$file" | cut -c1-4)))
  if [ "$n" -gt "${version:-0}" ]; then psql -X -q -v ON_ERROR_STOP=1 -d "$AGENT_GATEWAY_DATABASE_URL" -f "$file"; fi
done

if [ ! -f certs/server.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -keyout certs/server-key.pem -out certs/server.pem 2>/dev/null
  cp certs/server.pem certs/server-ca.pem
fi
[ -f config.toml ] || cp config.example.toml config.toml

echo "quickstart: registry at $AGENT_GATEWAY_DATABASE_URL; gateway on 127.0.0.1:8443 (Ctrl-C to stop)" >&2
node bin/agent-gateway.js --config config.toml
