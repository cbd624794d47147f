#!/usr/bin/env bash
# Demo agents: each has its own software TPM holding its key, a sidecar, and signed grants.
#
#   demo/demo-agent.sh create [--identity ID] [--grant DEST]...   prints the new agent's handle
#   demo/demo-agent.sh run HANDLE [--no-isolation] -- CMD [ARGS...]  CMD whose only way out is the sidecar
#   demo/demo-agent.sh prompt HANDLE --prompt TEXT                 Claude Code through the sidecar
#   demo/demo-agent.sh start HANDLE                                restart its swtpm and sidecar
#   demo/demo-agent.sh rotate HANDLE                               new TPM key, rows re-signed, no tunnel dropped
#   demo/demo-agent.sh delete HANDLE                               stop it, revoke its rows, remove its state
#
# Needs `demo/demo.sh setup` first (gateway, registry, principal). The handle is the identity.
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

agent_dir() { echo "$AGENTS_DIR/$1"; }

require_agent() {
  [ -n "${1:-}" ] || usage
  [[ "$1" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "invalid handle '$1'"
  [ -d "$(agent_dir "$1")" ] || die "no agent '$1' (create it with: demo/demo-agent.sh create --identity $1)"
}

# Starts the agent's TPM and sidecar when they are not running. The sidecar rewrites
# machine-client.pem for the TPM key and identity every time it starts.
start_agent() {
  local handle=$1 dir port sidecar_port
  dir="$(agent_dir "$handle")"
  port="$(cat "$dir/swtpm-port")"
  if ! pid_alive "$(pid_of "$handle-swtpm")" && port_open "$port"; then
    port="$(free_port_pair $((port + 2)))"
    echo "$port" >"$dir/swtpm-port"
  fi
  tpm_start "$dir/tpm" "$port" "$handle"
  if pid_alive "$(pid_of "$handle-sidecar")"; then return; fi
  # The settings SIGHUP re-reads (key rotation); the flags below stay as they are.
  [ -s "$dir/sidecar.toml" ] || printf 'key_label = "agent-tls"\n' >"$dir/sidecar.toml"
  rm -f "$dir/port"
  sidecar_port="$(cat "$dir/sidecar-port-request" 2>/dev/null || echo 0)"
  # shellcheck disable=SC1091
  (
    source "$dir/tpm/env"
    start_bg "$handle-sidecar" "$LOG_DIR/$handle-sidecar.log" node "$ROOT/bin/agent-gateway-sidecar.js" \
      --gateway "https://localhost:$GATEWAY_PORT" --gateway-ca "$CERTS/server-ca.pem" \
      --identity "$(cat "$dir/identity")" --tcti "$TPM2_PKCS11_TCTI" \
      --config "$dir/sidecar.toml" --cert-out "$dir/machine-client.pem" --listen-port "$sidecar_port" --port-file "$dir/port" \
      --listen-socket "$dir/proxy.sock"
  )
  if ! wait_for "sidecar" 60 test -s "$dir/port"; then
    tail -n 20 "$LOG_DIR/$handle-sidecar.log" >&2 || true
    die "sidecar for $handle did not start (see $LOG_DIR/$handle-sidecar.log)"
  fi
  # The port is written once the proxy listens; the certificate is written before that.
  [ -s "$dir/machine-client.pem" ] || die "sidecar for $handle wrote no machine-client.pem"
}

principal_cli() {
  [ -f "$PRINCIPAL_TPM_DIR/env" ] || die "the principal TPM is not set up: run demo/demo.sh setup"
  # shellcheck disable=SC1091
  (source "$PRINCIPAL_TPM_DIR/env" && AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$@")
}

cmd_create() {
  local identity="agent-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')" grants=() dir
  while [ $# -gt 0 ]; do
    case "$1" in
      --identity) identity="${2:?--identity needs a value}"; shift 2 ;;
      --grant) grants+=("${2:?--grant needs a destination}"); shift 2 ;;
      -h|--help) usage ;;
      *) die "create: unknown argument '$1'" ;;
    esac
  done
  [[ "$identity" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "identity '$identity' must be 1-64 of A-Z a-z 0-9 . _ - (the handle is the identity)"
  dir="$(agent_dir "$identity")"
  [ -d "$dir" ] && die "agent '$identity' exists already (delete it first)"
  mkdir -p "$dir"
  echo "$identity" >"$dir/identity"
  # The first agent takes the spec's port (2321, control 2322); later ones the next free pair.
  free_port_pair "$AGENT_SWTPM_PORT" >"$dir/swtpm-port"
  [ -n "${AGENT_GATEWAY_DEMO_SIDECAR_PORT:-}" ] && echo "$AGENT_GATEWAY_DEMO_SIDECAR_PORT" >"$dir/sidecar-port-request"
  if ! start_agent "$identity"; then
    die "could not start agent $identity"
  fi
  # Prove that the key the sidecar presents lives in this agent's TPM, before anything is granted.
  # shellcheck disable=SC1091
  (source "$dir/tpm/env" && registry_cli enrol-agent-key --cert "$dir/machine-client.pem" --ek-ca "$EK_CA" >/dev/null) \
    || die "could not enrol $identity's key with TPM attestation"
  if [ "${#grants[@]}" -gt 0 ]; then
    local args=()
    for dest in "${grants[@]}"; do args+=(--grant "$dest"); done
    principal_cli "$ROOT/registry-cli/agent-permissions.sh" grant --principal "$PRINCIPAL" \
      --identity "$identity" --cert "$dir/machine-client.pem" "${args[@]}" >/dev/null
  fi
  say "agent $identity: sidecar on 127.0.0.1:$(cat "$dir/port"), key TPM-attested, grants: ${grants[*]:-none}"
  echo "$identity"
}

proxy_env() { # HANDLE → prints env assignments for the agent's command only
  local dir port
  dir="$(agent_dir "$1")"
  port="$(cat "$dir/port")"
  printf '%s\n' "HTTPS_PROXY=http://127.0.0.1:$port" "https_proxy=http://127.0.0.1:$port" \
    "HTTP_PROXY=http://127.0.0.1:$port" "http_proxy=http://127.0.0.1:$port" "NO_PROXY=" "no_proxy=" \
    "CURL_CA_BUNDLE=$CERTS/mock-ca.pem" "SSL_CERT_FILE=$CERTS/mock-ca.pem" "NODE_EXTRA_CA_CERTS=$CERTS/mock-ca.pem"
}

# CMD runs in its own network namespace (agent-gateway-sidecar run) whose only way out is the
# sidecar's Unix socket; --no-isolation gives it HTTPS_PROXY on the host's loopback instead.
cmd_run() {
  local handle=${1:-} isolation=1 dir
  require_agent "$handle"
  shift
  [ "${1:-}" = "--no-isolation" ] && { isolation=0; shift; }
  [ "${1:-}" = "--" ] && shift
  [ $# -gt 0 ] || die "run: give a command after --, e.g. run $handle -- curl https://docstore/health"
  dir="$(agent_dir "$handle")"
  # A sidecar started before it had a socket is restarted once; it keeps its port.
  if pid_alive "$(pid_of "$handle-sidecar")" && [ ! -S "$dir/proxy.sock" ]; then stop_pid "$handle-sidecar"; fi
  pid_alive "$(pid_of "$handle-sidecar")" || start_agent "$handle"
  local envs=()
  mapfile -t envs < <(proxy_env "$handle")
  if [ "$isolation" = 1 ]; then
    exec env "${envs[@]}" node "$ROOT/bin/agent-gateway-sidecar.js" run --socket "$dir/proxy.sock" -- "$@"
  fi
  exec env "${envs[@]}" "$@"
}

cmd_prompt() {
  local handle=${1:-} prompt=""
  require_agent "$handle"
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --prompt) prompt="${2:?--prompt needs text}"; shift 2 ;;
      *) die "prompt: unknown argument '$1'" ;;
    esac
  done
  [ -n "$prompt" ] || die "prompt: --prompt TEXT is required"
  command -v claude >/dev/null 2>&1 || die "Claude Code ('claude') is not installed or not in PATH; install and authenticate it, or use: demo/demo-agent.sh run $handle -- curl https://docstore/documents"
  cmd_run "$handle" -- claude -p "$prompt" --allowedTools "Bash(curl:*)"
}

# reload_sidecar HANDLE EVENT: SIGHUP, then wait for the sidecar to log EVENT once more (or a refusal).
reload_sidecar() {
  local handle=$1 event=$2 log="$LOG_DIR/$1-sidecar.log" seen failed
  seen="$(grep -c "\"event\":\"$event\"" "$log" || true)"
  failed="$(grep -c '"event":"sidecar_reload_failed"' "$log" || true)"
  kill -HUP "$(pid_of "$handle-sidecar")"
  wait_for "$event" 60 sh -c '[ "$(grep -c "\"event\":\"$1\"" "$2")" -gt "$3" ] || [ "$(grep -c "\"event\":\"sidecar_reload_failed\"" "$2")" -gt "$4" ]' \
    _ "$event" "$log" "$seen" "$failed" || die "rotate: the sidecar did not log $event (see $log)"
  if [ "$(grep -c '"event":"sidecar_reload_failed"' "$log" || true)" -gt "$failed" ]; then
    grep '"event":"sidecar_reload_failed"' "$log" | tail -n 1 >&2
    die "rotate: the sidecar refused the reload"
  fi
}

# Key rotation, composed of the operator steps (sidecar/README.md, "Key rotation"):
# next key in the TPM -> rows signed for it -> switch -> old session drained -> old rows
# revoked -> old key destroyed. Tunnels open on the old key run to their end meanwhile.
cmd_rotate() {
  local handle=${1:-} dir old new drained fingerprint
  require_agent "$handle"
  dir="$(agent_dir "$handle")"
  pid_alive "$(pid_of "$handle-sidecar")" || start_agent "$handle"
  [ -s "$dir/sidecar.toml" ] || die "rotate: the sidecar of $handle was started without a settings file; restart it (demo/demo-agent.sh start $handle)"
  old="$(sed -n 's/^key_label = "\(.*\)"$/\1/p' "$dir/sidecar.toml")"
  old="${old:-agent-tls}"
  new="agent-tls-$(date +%s)"
  [ "$new" != "$old" ] || die "rotate: rotated within this second already; try again"

  printf 'key_label = "%s"\nnext_key_label = "%s"\n' "$old" "$new" >"$dir/sidecar.toml"
  reload_sidecar "$handle" next_key_ready
  fingerprint="$(grep '"event":"next_key_ready"' "$LOG_DIR/$handle-sidecar.log" | tail -n 1 | sed -n 's/.*"spki_fingerprint":"\([^"]*\)".*/\1/p')"
  # Like any agent key, the new one is granted only once its TPM attestation is recorded.
  # shellcheck disable=SC1091
  (source "$dir/tpm/env" && registry_cli enrol-agent-key --cert "$dir/machine-client.next.pem" --key-label "$new" --ek-ca "$EK_CA" >/dev/null) \
    || die "rotate: could not enrol $handle's new key with TPM attestation"
  say "rotate $handle: 1/6 new key $new ($fingerprint) generated in its TPM and TPM-attested, certificate $dir/machine-client.next.pem"

  principal_cli node "$ROOT/bin/agent-gateway-registry.js" rotate-key --principal "$PRINCIPAL" --identity "$(cat "$dir/identity")" \
    --from-cert "$dir/machine-client.pem" --to-cert "$dir/machine-client.next.pem" >&2
  say "rotate $handle: 2/6 $PRINCIPAL signed the same permissions for the new key"

  cp "$dir/machine-client.pem" "$dir/machine-client.old.pem"
  drained="$(grep -c '"event":"gateway_session_drained"' "$LOG_DIR/$handle-sidecar.log" || true)"
  printf 'key_label = "%s"\n' "$new" >"$dir/sidecar.toml"
  reload_sidecar "$handle" gateway_session_draining
  say "rotate $handle: 3/6 sidecar reloaded (SIGHUP): new CONNECTs use the new key's session"

  # The drain timeout (5 minutes by default) bounds this wait; the sidecar logs why it ended.
  wait_for "old session" 330 sh -c '[ "$(grep -c "\"event\":\"gateway_session_drained\"" "$1")" -gt "$2" ]' _ "$LOG_DIR/$handle-sidecar.log" "$drained" \
    || die "rotate: the old session did not drain (see $LOG_DIR/$handle-sidecar.log)"
  say "rotate $handle: 4/6 old session drained: $(grep '"event":"gateway_session_drained"' "$LOG_DIR/$handle-sidecar.log" | tail -n 1 | sed -n 's/.*"reason":"\([a-z_]*\)".*/\1/p')"

  AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/agent-permissions.sh" delete \
    --identity "$(cat "$dir/identity")" --cert "$dir/machine-client.old.pem" >&2
  say "rotate $handle: 5/6 old key's permissions revoked"

  # shellcheck disable=SC1091
  (source "$dir/tpm/env" && node "$ROOT/bin/agent-gateway-sidecar.js" key destroy --key-label "$old" --config "$dir/sidecar.toml" --tcti "$TPM2_PKCS11_TCTI" >/dev/null)
  rm -f "$dir/machine-client.old.pem" "$dir/machine-client.next.pem"
  say "rotate $handle: 6/6 old key $old destroyed in the TPM; $handle now presents $new ($fingerprint)"
}

cmd_delete() {
  local handle=${1:-} dir
  require_agent "$handle"
  dir="$(agent_dir "$handle")"
  stop_pid "$handle-sidecar"
  if [ -s "$dir/machine-client.pem" ]; then
    AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/agent-permissions.sh" delete \
      --identity "$(cat "$dir/identity")" --cert "$dir/machine-client.pem" >/dev/null \
      || say "delete: could not revoke the rows of $handle (is the registry up?)"
  fi
  tpm_stop "$handle"
  rm -rf "$dir"
  say "agent $handle: stopped, permissions revoked, state removed"
}

case "${1:-}" in
  create) shift; cmd_create "$@" ;;
  run) shift; cmd_run "$@" ;;
  prompt) shift; cmd_prompt "$@" ;;
  start) shift; require_agent "${1:-}"; start_agent "$1"; say "agent $1: sidecar on 127.0.0.1:$(cat "$(agent_dir "$1")/port")"; cat "$(agent_dir "$1")/port" ;;
  rotate) shift; cmd_rotate "$@" ;;
  delete) shift; cmd_delete "$@" ;;
  *) usage ;;
esac
