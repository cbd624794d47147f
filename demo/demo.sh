#!/usr/bin/env bash
# agent-gateway demo on one machine, no container engine needed.
#
#   demo/demo.sh setup      install what is missing and bring everything up (idempotent; never
#                           re-grants what an operator revoked)
#   demo/demo.sh status     each component with its PID and port
#   demo/demo.sh env        exports for an operator's shell: registry database, principal TPM
#   demo/demo.sh logs [gateway|mocks|HANDLE]   follow a component's log, readable (pino-pretty)
#   demo/demo.sh teardown   stop everything this demo started; remove certs, config.toml and state
#
# State lives under $AGENT_STATE (default ./.demo-state). demo/README.md lists the variables.
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

start_postgres() {
  if [ -n "$EXTERNAL_DB" ]; then
    say "postgres: using AGENT_GATEWAY_DATABASE_URL (not starting a local cluster)"
    return
  fi
  [ -n "$PG_BIN" ] || die "PostgreSQL server binaries not found; run scripts/setup.sh"
  pg_dir_resolve
  if [ ! -s "$PG_DIR/data/PG_VERSION" ]; then
    mkdir -p "$PG_DIR"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$PG_DIR"
    local pwfile="$PG_DIR/.pw"
    printf '%s\n' "$DB_PASSWORD" >"$pwfile"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$pwfile"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A scram-sha-256 --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    port_open "$PG_PORT" && die "port $PG_PORT is in use (set AGENT_GATEWAY_DEMO_PG_PORT)"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null
  fi
  local su="postgres://postgres:${DB_PASSWORD}@127.0.0.1:${PG_PORT}/postgres"
  psql -X -q -v ON_ERROR_STOP=1 -d "$su" -v pw="$DB_PASSWORD" >/dev/null <<'SQL'
SELECT format('CREATE ROLE agent_gateway_admin LOGIN CREATEROLE PASSWORD %L', :'pw')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_admin') \gexec
SELECT format('CREATE ROLE agent_gateway_runtime LOGIN PASSWORD %L', :'pw')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_runtime') \gexec
SELECT 'CREATE DATABASE agent_gateway OWNER agent_gateway_admin'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'agent_gateway') \gexec
SQL
}

migrate_and_grant_roles() {
  registry_cli migrate >/dev/null
  if [ -z "$EXTERNAL_DB" ]; then
    # The migration creates the read-only group role(s); the gateway's login role joins them.
    PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" >/dev/null <<'SQL'
SELECT format('GRANT %I TO agent_gateway_runtime', rolname) FROM pg_roles
 WHERE rolname IN ('agent_gateway_reader', 'agent_gateway_auditor') \gexec
SQL
  fi
}

# The comment block at the top is the usage text.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

CONFIG_CHANGED=0
ALPHA_HELD="" # agent-alpha's permission rows from $PRINCIPAL, as registry_list prints them
write_config() {
  if [ -f "$CONFIG" ]; then
    # Someone else's config lacks the demo's [resolve] entries and TLS paths: refuse rather than
    # start a gateway that cannot reach the mock services.
    grep -q '^# Written by demo/demo.sh setup' "$CONFIG" \
      || die "$CONFIG exists and was not written by the demo: move it away, or set AGENT_GATEWAY_DEMO_CONFIG to another path"
  fi
  local wanted
  wanted="$(demo_config)"
  [ -f "$CONFIG" ] && [ "$(cat "$CONFIG")" = "$wanted" ] && return
  # A demo config from an older setup, or for the other Claude Code mode: the gateway restarts with it.
  [ -f "$CONFIG" ] && CONFIG_CHANGED=1
  printf '%s\n' "$wanted" >"$CONFIG"
  say "config: wrote $CONFIG"
}

demo_config() {
  local anthropic='"api.anthropic.com:443" = "127.0.0.1:'"$ANTHROPIC_PORT"'"'
  [ "$REAL_CLAUDE" = 1 ] && anthropic='# api.anthropic.com:443 is the real one (AGENT_GATEWAY_DEMO_REAL_CLAUDE=1)'
  cat <<TOML
# Written by demo/demo.sh setup. See config.example.toml for every field.
[server]
listen_addr = "127.0.0.1:$GATEWAY_PORT"
tls_cert_path = "$CERTS/server.pem"
tls_key_path = "$CERTS/server-key.pem"

[policy]
client_ext_oid = "1.3.6.1.4.1.57264.1.1"
database_url_env = "AGENT_GATEWAY_RUNTIME_DATABASE_URL"

[observability]
log_level = "info"

[admin]
listen_addr = "127.0.0.1:$ADMIN_PORT"

[resolve]
"docstore:443" = "127.0.0.1:$DOCSTORE_PORT"
"messaging:443" = "127.0.0.1:$MESSAGING_PORT"
$anthropic
TOML
}

start_mocks() {
  if pid_alive "$(pid_of mocks)"; then
    # Mocks from an older setup do not serve the Messages API: restart them.
    port_open "$ANTHROPIC_PORT" && return
    stop_pid mocks
  fi
  port_open "$DOCSTORE_PORT" && die "port $DOCSTORE_PORT is in use (set AGENT_GATEWAY_DEMO_DOCSTORE_PORT)"
  port_open "$ANTHROPIC_PORT" && die "port $ANTHROPIC_PORT is in use (set AGENT_GATEWAY_DEMO_ANTHROPIC_PORT)"
  start_bg mocks "$LOG_DIR/mock-services.log" node "$ROOT/dist/demo/mock-services.js" \
    --cert "$CERTS/mock-services.pem" --key "$CERTS/mock-services-key.pem" \
    --docstore-port "$DOCSTORE_PORT" --messaging-port "$MESSAGING_PORT" --anthropic-port "$ANTHROPIC_PORT"
  wait_for "mock services" 30 port_open "$ANTHROPIC_PORT" || die "mock services did not start (see $LOG_DIR/mock-services.log)"
}

start_gateway() {
  if pid_alive "$(pid_of gateway)"; then
    [ "$CONFIG_CHANGED" = 1 ] || return 0
    say "gateway: restarting with the new $CONFIG"
    stop_pid gateway
  fi
  port_open "$GATEWAY_PORT" && die "port $GATEWAY_PORT is in use (set AGENT_GATEWAY_DEMO_GATEWAY_PORT)"
  port_open "$ADMIN_PORT" && die "port $ADMIN_PORT is in use (set AGENT_GATEWAY_DEMO_ADMIN_PORT)"
  local seen
  seen="$(wc -l <"$LOG_DIR/gateway.log" 2>/dev/null || echo 0)"
  # Both names: the demo's config reads the first, config.example.toml the second.
  AGENT_GATEWAY_RUNTIME_DATABASE_URL="$RUNTIME_URL" AGENT_GATEWAY_DATABASE_URL="$RUNTIME_URL" start_bg gateway "$LOG_DIR/gateway.log" \
    node "$ROOT/bin/agent-gateway.js" --config "$CONFIG"
  # Its own "listening" line, not a TCP probe: a probe that sends no ClientHello is a failed handshake.
  if ! wait_for "gateway" 30 gateway_listening_since "$seen"; then
    tail -n 20 "$LOG_DIR/gateway.log" >&2 || true
    die "gateway did not start (see $LOG_DIR/gateway.log)"
  fi
}

gateway_listening_since() { tail -n "+$(($1 + 1))" "$LOG_DIR/gateway.log" 2>/dev/null | grep -q '"event":"listening"'; }

# Setup is also how a stopped demo is restarted, so it adds only what never existed: a principal key,
# delegation or permission that an operator revoked (or that expired) stays so.
enrol_principal() {
  tpm_start "$PRINCIPAL_TPM_DIR" "$PRINCIPAL_SWTPM_PORT" principal "${AGENT_GATEWAY_DEMO_TPM2_PKCS11_STORE:-}"
  local rc=0 dest scope missing=()
  # shellcheck disable=SC1091
  (source "$PRINCIPAL_TPM_DIR/env" && AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/register-principal-key.sh" "$PRINCIPAL" --ek-ca "$EK_CA" >/dev/null) || rc=$?
  if [ "$rc" -eq 3 ]; then
    die "principal $PRINCIPAL cannot sign (see above), and setup never undoes an operator's revocation. Go on with a new principal key: AGENT_GATEWAY_DEMO_PRINCIPAL=org-carol ./demo/demo.sh setup (set it for demo-agent.sh too); or start afresh: ./demo/demo.sh teardown && ./demo/demo.sh setup"
  fi
  [ "$rc" -eq 0 ] || die "could not register principal $PRINCIPAL (see above)"
  scope="$(registry_list scopes --principal "$PRINCIPAL")"
  for dest in "${DEMO_DESTINATIONS[@]}"; do [ -n "$(state_of "$dest" <<<"$scope")" ] || missing+=("$dest"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/grant-principal-scope.sh" "$PRINCIPAL" "${missing[@]}" >/dev/null
    scope="$(registry_list scopes --principal "$PRINCIPAL")"
  fi
  ACTIVE_SCOPE=()
  for dest in "${DEMO_DESTINATIONS[@]}"; do
    if [ "$(state_of "$dest" <<<"$scope")" = active ]; then ACTIVE_SCOPE+=("$dest")
    else say "principal: the delegation of $dest to $PRINCIPAL is $(state_of "$dest" <<<"$scope"); setup leaves it so"; fi
  done
}

# agent-alpha gets the demo destinations it never had from this principal (a new principal, or a
# destination added to the demo since it was created); a revoked or expired row stays so.
grant_agent_alpha() {
  local dir="$AGENTS_DIR/agent-alpha" held dest missing=()
  held="$(registry_list permissions --identity agent-alpha --principal "$PRINCIPAL")"
  for dest in "${ACTIVE_SCOPE[@]}"; do [ -n "$(state_of "$dest" <<<"$held")" ] || missing+=("$dest"); done
  ALPHA_HELD="$held"
  [ "${#missing[@]}" -gt 0 ] || return 0
  say "agent: granting agent-alpha ${missing[*]}"
  # shellcheck disable=SC1091
  (source "$PRINCIPAL_TPM_DIR/env" && AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/agent-permissions.sh" grant \
    --principal "$PRINCIPAL" --identity agent-alpha --cert "$dir/machine-client.pem" "${missing[@]}" >/dev/null)
  ALPHA_HELD=""
}

cmd_setup() {
  local started=$SECONDS
  if [ -f "$CONFIG" ] && ! grep -q '^# Written by demo/demo.sh setup' "$CONFIG"; then
    die "$CONFIG exists and was not written by the demo: move it away, or set AGENT_GATEWAY_DEMO_CONFIG to another path"
  fi
  bash "$ROOT/scripts/setup.sh"
  hash -r
  agent_gateway_runtime_check || die "Node.js $AGENT_GATEWAY_NODE_VERSION is not in place after scripts/setup.sh"
  mkdir -p "$AGENT_STATE" "$LOG_DIR" "$PID_DIR"
  "$ROOT/demo/generate-server-certs.sh" "$CERTS"
  write_config
  say "postgres: starting"; start_postgres
  say "registry: migrating"; migrate_and_grant_roles
  say "mock services: starting docstore and messaging"; start_mocks
  say "gateway: starting"; start_gateway
  say "principal: enrolling TPM-backed key $PRINCIPAL with attestation (EK CA $EK_CA), scope ${DEMO_DESTINATIONS[*]}"; enrol_principal
  if [ ! -d "$AGENTS_DIR/agent-alpha" ]; then
    say "agent: creating agent-alpha with grants ${ACTIVE_SCOPE[*]:-none}"
    local grants=() dest
    for dest in "${ACTIVE_SCOPE[@]}"; do grants+=(--grant "$dest"); done
    "$ROOT/demo/demo-agent.sh" create --identity agent-alpha "${grants[@]}" >/dev/null
  else
    "$ROOT/demo/demo-agent.sh" start agent-alpha >/dev/null
    grant_agent_alpha
  fi
  [ -n "$ALPHA_HELD" ] || ALPHA_HELD="$(registry_list permissions --identity agent-alpha --principal "$PRINCIPAL")"
  if [ "$(state_of docstore:443 <<<"$ALPHA_HELD")" = active ]; then
    say "check: https://docstore/health through agent-alpha's sidecar"
    local out
    out="$("$ROOT/demo/demo-agent.sh" run agent-alpha -- curl -sS --fail --max-time 15 https://docstore/health)" \
      || die "the end-to-end check failed (logs under $LOG_DIR)"
    say "  -> $out"
  else
    say "check: skipped, agent-alpha holds no active docstore permission from $PRINCIPAL (revoked or expired)"
  fi
  cmd_status
  cat >&2 <<EOF

The demo is up ($((SECONDS - started)) s). Logs: $LOG_DIR
Try:
  ./demo/demo-agent.sh run agent-alpha -- curl -sS https://docstore/documents
  ./demo/demo-agent.sh run agent-alpha -- curl -sS https://messaging/messages
  H=\$(./demo/demo-agent.sh create --identity agent-beta --grant messaging)
  ./demo/demo-agent.sh run "\$H" -- curl -sS https://docstore/documents   # refused: 403 at CONNECT
  ./demo/demo-agent.sh prompt agent-alpha --prompt "Access https://docstore/documents using curl"
  ./demo/demo.sh status | teardown
EOF
}

row() { printf '%-22s %-9s %-8s %s\n' "$@"; }

cmd_status() {
  local pid state
  [ -L "$PG_DIR" ] && PG_DIR="$(readlink "$PG_DIR")"
  row COMPONENT STATE PID WHERE
  status_row() { # NAME WHERE
    pid="$(pid_of "$1")"
    if pid_alive "$pid"; then state=running; else state=stopped; pid=-; fi
    row "$1" "$state" "$pid" "$2"
  }
  if [ -n "$EXTERNAL_DB" ]; then
    row postgres external - "AGENT_GATEWAY_DATABASE_URL"
  elif [ -s "$PG_DIR/data/postmaster.pid" ] && pid_alive "$(head -n 1 "$PG_DIR/data/postmaster.pid")"; then
    row postgres running "$(head -n 1 "$PG_DIR/data/postmaster.pid")" "127.0.0.1:$PG_PORT"
  else
    row postgres stopped - "127.0.0.1:$PG_PORT"
  fi
  status_row gateway "127.0.0.1:$GATEWAY_PORT (admin http://127.0.0.1:$ADMIN_PORT/metrics)"
  status_row mocks "docstore 127.0.0.1:$DOCSTORE_PORT, messaging 127.0.0.1:$MESSAGING_PORT, api.anthropic.com 127.0.0.1:$ANTHROPIC_PORT"
  status_row principal-swtpm "127.0.0.1:$PRINCIPAL_SWTPM_PORT (key $PRINCIPAL)"
  status_row principal-abrmd "$PRINCIPAL_TPM_DIR/dbus.sock"
  local dir handle
  for dir in "$AGENTS_DIR"/*/; do
    [ -d "$dir" ] || continue
    handle="$(basename "$dir")"
    status_row "$handle-sidecar" "127.0.0.1:$(cat "$dir/port" 2>/dev/null || echo '?') (identity $(cat "$dir/identity" 2>/dev/null))"
    status_row "$handle-swtpm" "127.0.0.1:$(cat "$dir/swtpm-port" 2>/dev/null || echo '?')"
  done
  attestation_rows
}

# One line per principal and per agent with active permissions: whether its key is TPM-attested,
# by which EK (certificate SHA-256) and when. Silent when the registry cannot be asked.
attestation_rows() {
  local listed
  listed="$(registry_cli --json list 2>/dev/null)" || return 0
  printf '%s' "$listed" | node -e '
    const listed = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
    const row = (who, a) => console.log(`${who.padEnd(22)} ${(a.verified ? "attested" : "NOT-attested").padEnd(12)} ${a.verified ? `ek ${a.ek_fingerprint.slice(0, 16)}… at ${a.verified_at}` : "-"}`);
    for (const p of listed.principals ?? []) if (p.state === "active") row(`key ${p.key_id}`, p.attestation);
    const seen = new Set();
    for (const p of listed.permissions ?? []) {
      if (p.state !== "active" || seen.has(p.identity)) continue;
      seen.add(p.identity);
      row(`key ${p.identity}`, p.subject_attestation);
    }
  '
}

cmd_teardown() {
  local dir
  [ -L "$PG_DIR" ] && PG_DIR="$(readlink "$PG_DIR")"
  for dir in "$AGENTS_DIR"/*/; do
    [ -d "$dir" ] || continue
    "$ROOT/demo/demo-agent.sh" delete "$(basename "$dir")" || say "teardown: could not delete $(basename "$dir") cleanly"
  done
  stop_pid gateway
  stop_pid mocks
  tpm_stop principal
  if [ -z "$EXTERNAL_DB" ] && [ -n "$PG_BIN" ] && [ -d "$PG_DIR/data" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  [[ "$PG_DIR" == /var/lib/postgresql/agent-gateway-demo-* ]] && rm -rf "$PG_DIR"
  rm -rf "$AGENT_STATE"
  if grep -qs '^# Written by demo/demo.sh setup' "$CONFIG"; then rm -f "$CONFIG"; fi
  find "$CERTS" -maxdepth 1 -type f \( -name '*.pem' -o -name '*.srl' \) -delete 2>/dev/null || true
  say "teardown: stopped the demo and removed $AGENT_STATE, $CONFIG and generated certificates"
}

# The operator's shell: the registry CLI (agent-gateway-registry, registry-cli/*.sh) finds the demo's
# database and principal TPM. Meant for eval: eval "$(./demo/demo.sh env)".
cmd_env() {
  [ -f "$PRINCIPAL_TPM_DIR/env" ] || die "the principal TPM is not set up: run demo/demo.sh setup"
  printf '# the demo registry (admin role) and principal %s; demo values, not guidance\n' "$PRINCIPAL"
  printf 'export %s=%q\n' AGENT_GATEWAY_DATABASE_URL "$ADMIN_URL" AGENT_GATEWAY_PRINCIPAL_KEY_ID "$PRINCIPAL" \
    TSS2_LOG "$TSS2_LOG" TPM2_PKCS11_LOG_LEVEL "$TPM2_PKCS11_LOG_LEVEL"
  # Only the demo's own PIN is printed; one the operator chose stays in the operator's environment.
  if [ "$AGENT_GATEWAY_TPM_USER_PIN" = "$DEMO_USER_PIN" ]; then
    printf 'export AGENT_GATEWAY_TPM_USER_PIN=%q\n' "$AGENT_GATEWAY_TPM_USER_PIN"
  else
    printf '# AGENT_GATEWAY_TPM_USER_PIN: yours, not printed; export it yourself\n'
  fi
  grep '^export ' "$PRINCIPAL_TPM_DIR/env"
  # The Node.js the demo runs on, for `node bin/agent-gateway-registry.js ...`.
  [ -z "$AGENT_GATEWAY_NODE_HOME" ] || printf 'export PATH=%q:"$PATH"\n' "$AGENT_GATEWAY_NODE_HOME/bin"
}

# Follows a component's log in readable form; pino-pretty passes lines that are not JSON through.
cmd_logs() {
  local name=${1:-gateway} file
  case "$name" in
    gateway) file="$LOG_DIR/gateway.log" ;;
    mocks) file="$LOG_DIR/mock-services.log" ;;
    *)
      [ -d "$AGENTS_DIR/$name" ] || die "logs: no component '$name': gateway, mocks, or an agent handle (demo/demo-agent.sh list)"
      file="$LOG_DIR/$name-sidecar.log" ;;
  esac
  [ -f "$file" ] || die "logs: $file does not exist yet"
  tail -n 100 -F "$file" 2>/dev/null | "$ROOT/node_modules/.bin/pino-pretty" --translateTime 'UTC:HH:MM:ss.l' --ignore pid,hostname
}

case "${1:-}" in
  setup) cmd_setup ;;
  status) cmd_status ;;
  env) cmd_env ;;
  logs) shift; cmd_logs "$@" ;;
  teardown) cmd_teardown ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
