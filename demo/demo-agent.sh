#!/usr/bin/env bash
# Demo agents: each has its own software TPM holding its key, a sidecar, and signed grants.
#
#   demo/demo-agent.sh create [--identity ID] [--grant DEST]...   prints the new agent's handle
#   demo/demo-agent.sh run HANDLE [--no-isolation] -- CMD [ARGS...]  CMD whose only way out is the sidecar
#   demo/demo-agent.sh prompt HANDLE --prompt TEXT                 Claude Code through the sidecar
#   demo/demo-agent.sh env HANDLE                                  exports for an agent's shell (proxy, CA)
#   demo/demo-agent.sh list                                        every agent: state, port, certificate
#   demo/demo-agent.sh start HANDLE                                restart its swtpm and sidecar
#   demo/demo-agent.sh rotate HANDLE                               new TPM key, rows re-signed, no tunnel dropped
#   demo/demo-agent.sh delete HANDLE                               stop it, revoke its rows, remove its state
#
# Needs `demo/demo.sh setup` first (gateway, registry, principal). The handle is the identity.
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# The comment block at the top is the usage text.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
usage_error() { usage >&2; exit 2; }

agent_dir() { echo "$AGENTS_DIR/$1"; }

require_agent() {
  [ -n "${1:-}" ] || usage_error
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
  # A directory of its own: run hides the socket's directory from the agent, not the agent's dir.
  mkdir -p "$dir/socket"
  sidecar_port="$(cat "$dir/sidecar-port-request" 2>/dev/null || echo 0)"
  # shellcheck disable=SC1091
  (
    source "$dir/tpm/env"
    start_bg "$handle-sidecar" "$LOG_DIR/$handle-sidecar.log" node "$ROOT/bin/agent-gateway-sidecar.js" \
      --gateway "https://localhost:$GATEWAY_PORT" --gateway-ca "$CERTS/server-ca.pem" \
      --identity "$(cat "$dir/identity")" --tcti "$TPM2_PKCS11_TCTI" \
      --config "$dir/sidecar.toml" --cert-out "$dir/machine-client.pem" --listen-port "$sidecar_port" --port-file "$dir/port" \
      --listen-socket "$dir/socket/proxy.sock"
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
      -h|--help) usage; exit 0 ;;
      *) die "create: unknown argument '$1'" ;;
    esac
  done
  [[ "$identity" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "identity '$identity' must be 1-64 of A-Z a-z 0-9 . _ - (the handle is the identity)"
  dir="$(agent_dir "$identity")"
  [ -d "$dir" ] && die "agent '$identity' exists already (delete it first)"
  mkdir -p "$dir"
  # A create that fails half-way (a grant outside the principal's scope, a TPM that did not start)
  # leaves nothing behind: no swtpm, no sidecar, no state, so the same create can be retried.
  # shellcheck disable=SC2064
  trap "rollback_create '$identity'" EXIT
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
  trap - EXIT
  say "agent $identity: sidecar on 127.0.0.1:$(cat "$dir/port"), key TPM-attested, grants: ${grants[*]:-none}"
  echo "$identity"
}

rollback_create() {
  local status=$? handle=$1
  [ "$status" -ne 0 ] || return 0
  stop_pid "$handle-sidecar"
  tpm_stop "$handle"
  rm -rf "$(agent_dir "$handle")"
  say "agent $handle: create failed; stopped what it started and removed its state"
  exit "$status"
}

# The CA bundle agents verify destinations with: the mock CA and the system's roots (so a granted
# real destination verifies too), rebuilt whenever the mock CA is newer.
ca_bundle() {
  local bundle="$AGENT_STATE/ca-bundle.pem" system=/etc/ssl/certs/ca-certificates.crt tmp
  if [ ! -s "$bundle" ] || [ ! -s "$AGENT_STATE/wgetrc" ] || [ "$CERTS/mock-ca.pem" -nt "$bundle" ]; then
    # Written aside and renamed: a command starting meanwhile never reads half a bundle.
    tmp="$(mktemp "$bundle.XXXXXX")"
    cat "$CERTS/mock-ca.pem" "$([ -r "$system" ] && echo "$system" || echo /dev/null)" >"$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$bundle"
    tmp="$(mktemp "$AGENT_STATE/wgetrc.XXXXXX")"
    printf 'ca_certificate = %s\n' "$bundle" >"$tmp"
    mv "$tmp" "$AGENT_STATE/wgetrc"
  fi
  echo "$bundle"
}

proxy_env() { # HANDLE → prints env assignments for the agent's command only
  local dir port bundle
  dir="$(agent_dir "$1")"
  port="$(cat "$dir/port")"
  bundle="$(ca_bundle)"
  # Each client's own CA variable, set (not inherited) so that none of them verifies against
  # another CA than the demo's: curl, OpenSSL-based tools and httpx, Python requests, git, Node,
  # GnuTLS wget (through its rc file). Node 24's fetch uses the proxy only with NODE_USE_ENV_PROXY.
  printf '%s\n' "HTTPS_PROXY=http://127.0.0.1:$port" "https_proxy=http://127.0.0.1:$port" \
    "HTTP_PROXY=http://127.0.0.1:$port" "http_proxy=http://127.0.0.1:$port" "NO_PROXY=" "no_proxy=" \
    "CURL_CA_BUNDLE=$bundle" "SSL_CERT_FILE=$bundle" "SSL_CERT_DIR=" "REQUESTS_CA_BUNDLE=$bundle" \
    "GIT_SSL_CAINFO=$bundle" "NODE_EXTRA_CA_CERTS=$bundle" "NODE_USE_ENV_PROXY=1" "WGETRC=$AGENT_STATE/wgetrc"
}

cmd_env() {
  local handle=${1:-} line
  require_agent "$handle"
  pid_alive "$(pid_of "$handle-sidecar")" || start_agent "$handle"
  printf '# agent %s: its sidecar as proxy and the demo CA, for this shell only\n' "$handle"
  while IFS= read -r line; do printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"; done < <(proxy_env "$handle")
}

cmd_list() {
  local dir handle state
  printf '%-20s %-8s %-16s %s\n' HANDLE STATE PROXY CERTIFICATE
  for dir in "$AGENTS_DIR"/*/; do
    [ -d "$dir" ] || continue
    handle="$(basename "$dir")"
    if pid_alive "$(pid_of "$handle-sidecar")"; then state=running; else state=stopped; fi
    printf '%-20s %-8s %-16s %s\n' "$handle" "$state" "127.0.0.1:$(cat "$dir/port" 2>/dev/null || echo '?')" "${dir}machine-client.pem"
  done
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
  if pid_alive "$(pid_of "$handle-sidecar")" && [ ! -S "$dir/socket/proxy.sock" ]; then stop_pid "$handle-sidecar"; fi
  pid_alive "$(pid_of "$handle-sidecar")" || start_agent "$handle"
  local envs=()
  mapfile -t envs < <(proxy_env "$handle")
  if [ "$isolation" = 1 ]; then
    # Everyone runs as the same user here: hide the other agents (their sidecar sockets would lend
    # their identities), every TPM's state, the EK CA and the database from this one.
    local hide=() other
    for other in "$AGENTS_DIR"/*/; do [ "${other%/}" = "$dir" ] || hide+=(--hide "${other%/}"); done
    for other in "$dir/tpm" "$PRINCIPAL_TPM_DIR" "$EK_CA_DIR" "$PG_DIR"; do [ -d "$other" ] && hide+=(--hide "$other"); done
    exec env "${envs[@]}" node "$ROOT/bin/agent-gateway-sidecar.js" run --socket "$dir/socket/proxy.sock" "${hide[@]}" -- "$@"
  fi
  exec env "${envs[@]}" "$@"
}

# Claude Code comes from the npm registry on first use, pinned, outside the clone: ~385 MB that a
# teardown or a fresh clone (CI) must not download again. Its postinstall (which only links the
# platform binary) is not run (allowScripts would block it anyway), so the platform package's
# binary is run directly.
CLAUDE_CODE_VERSION=2.1.332
# Read by prompt only, so that the other commands run without HOME (CI, service accounts).
claude_code_dir() {
  local cache="${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}"
  [ -n "${AGENT_GATEWAY_DEMO_CLAUDE_CODE_DIR:-}$cache" ] || die "prompt: HOME is not set: set AGENT_GATEWAY_DEMO_CLAUDE_CODE_DIR to where Claude Code may be installed"
  echo "${AGENT_GATEWAY_DEMO_CLAUDE_CODE_DIR:-$cache/agent-gateway/claude-code}/$CLAUDE_CODE_VERSION"
}

claude_code_platform() {
  local arch libc=""
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64|arm64) arch=arm64 ;; *) die "Claude Code has no package for $(uname -m)" ;; esac
  ldd --version 2>&1 | grep -qi musl && libc=-musl
  echo "linux-$arch$libc"
}

# Prints the path of the Claude Code binary, installing it first when needed (progress on stderr).
claude_code_bin() {
  # Called as $(claude_code_bin), where bash drops errexit: any failed step must stop the install.
  set -e
  local bin started CLAUDE_CODE_DIR
  CLAUDE_CODE_DIR="$(claude_code_dir)" || exit 1
  bin="$CLAUDE_CODE_DIR/node_modules/@anthropic-ai/claude-code-$(claude_code_platform)/claude"
  if [ ! -x "$bin" ]; then
    mkdir -p "$(dirname "$CLAUDE_CODE_DIR")"
    # One installer at a time; a second prompt waits for it, then finds the binary.
    exec 9>"$CLAUDE_CODE_DIR.lock"
    flock 9
    if [ ! -x "$bin" ]; then
      say "Claude Code $CLAUDE_CODE_VERSION: installing from the npm registry into $CLAUDE_CODE_DIR (~385 MB, once)..."
      started=$SECONDS
      rm -rf "$CLAUDE_CODE_DIR.partial"
      mkdir -p "$CLAUDE_CODE_DIR.partial"
      echo '{"private":true}' >"$CLAUDE_CODE_DIR.partial/package.json"
      # stdout to stderr: npm's progress and summary stay visible, the answer alone goes to stdout.
      (cd "$CLAUDE_CODE_DIR.partial" && npm install --no-save --no-package-lock --no-audit --no-fund --ignore-scripts --loglevel=http \
        "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2) || die "installing Claude Code failed (see above)"
      rm -rf "$CLAUDE_CODE_DIR"
      mv "$CLAUDE_CODE_DIR.partial" "$CLAUDE_CODE_DIR"
      [ -x "$bin" ] || die "the Claude Code package has no binary at $bin"
      say "Claude Code $CLAUDE_CODE_VERSION: installed in $((SECONDS - started)) s ($(du -sh "$CLAUDE_CODE_DIR" | cut -f1))"
    fi
    exec 9>&-
  fi
  echo "$bin"
}

cmd_prompt() {
  local handle=${1:-} prompt="" dir bin
  require_agent "$handle"
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --prompt) prompt="${2:?--prompt needs text}"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) die "prompt: unknown argument '$1'" ;;
    esac
  done
  [ -n "$prompt" ] || die "prompt: --prompt TEXT is required"
  dir="$(agent_dir "$handle")"
  # The gateway decides where api.anthropic.com goes; the mode of this prompt must match it, or
  # real credentials would reach the mock, or the dummy key the real API.
  local scripted=0
  [ -f "$CONFIG" ] || die "prompt: no $CONFIG: run ./demo/demo.sh setup first"
  grep -q '^"api.anthropic.com:443" = ' "$CONFIG" && scripted=1
  if [ "$REAL_CLAUDE" = 1 ] && [ "$scripted" = 1 ]; then
    die "the gateway sends api.anthropic.com to the scripted Messages API: run AGENT_GATEWAY_DEMO_REAL_CLAUDE=1 ./demo/demo.sh setup first"
  elif [ "$REAL_CLAUDE" != 1 ] && [ "$scripted" = 0 ]; then
    die "the gateway sends api.anthropic.com to the real API (set up with AGENT_GATEWAY_DEMO_REAL_CLAUDE=1): keep AGENT_GATEWAY_DEMO_REAL_CLAUDE=1, or run ./demo/demo.sh setup without it"
  fi
  local claude_env=(CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1) unset_env=()
  if [ "$REAL_CLAUDE" = 1 ]; then
    # The user's own Claude Code and login (or ANTHROPIC_API_KEY); api.anthropic.com:443 must be granted.
    bin="$(command -v claude || claude_code_bin)"
  else
    bin="$(claude_code_bin)"
    # The scripted Messages API takes any key; Claude Code's own state stays with the agent, never
    # in the user's ~/.claude.
    mkdir -p "$dir/claude-config"
    claude_env+=(ANTHROPIC_API_KEY=demo-key-for-the-scripted-messages-api "CLAUDE_CONFIG_DIR=$dir/claude-config")
    # Nothing the user set for their own account may send this run elsewhere.
    unset_env=(-u ANTHROPIC_BASE_URL -u ANTHROPIC_AUTH_TOKEN -u CLAUDE_CODE_USE_BEDROCK -u CLAUDE_CODE_USE_VERTEX)
  fi
  mkdir -p "$dir/workspace"
  cd "$dir/workspace"
  # Through `run`, so Claude Code gets exactly what any agent command gets (and whatever confinement
  # `run` provides).
  cmd_run "$handle" -- env "${unset_env[@]}" "${claude_env[@]}" "$bin" -p "$prompt" --allowedTools "Bash(curl:*)"
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
  (source "$dir/tpm/env" && node "$ROOT/bin/agent-gateway-sidecar.js" key destroy --key-label "$old" --config "$dir/sidecar.toml" --cert-out "$dir/machine-client.pem" --tcti "$TPM2_PKCS11_TCTI" >/dev/null)
  rm -f "$dir/machine-client.old.pem" "$dir/machine-client.next.pem"
  say "rotate $handle: 6/6 old key $old destroyed in the TPM; $handle now presents $new ($fingerprint)"
}

cmd_delete() {
  local handle=${1:-} dir
  require_agent "$handle"
  dir="$(agent_dir "$handle")"
  stop_pid "$handle-sidecar"
  if [ -s "$dir/machine-client.pem" ]; then
    local rc=0
    AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" "$ROOT/registry-cli/agent-permissions.sh" delete \
      --identity "$(cat "$dir/identity")" --cert "$dir/machine-client.pem" >/dev/null 2>"$dir/delete.err" || rc=$?
    # Exit 3: the agent never held a row (created without grants); nothing to revoke.
    [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || { cat "$dir/delete.err" >&2; say "delete: could not revoke the rows of $handle (is the registry up?)"; }
  fi
  tpm_stop "$handle"
  rm -rf "$dir"
  say "agent $handle: stopped, permissions revoked, state removed"
}

case "${1:-}" in
  create) shift; cmd_create "$@" ;;
  run) shift; cmd_run "$@" ;;
  prompt) shift; cmd_prompt "$@" ;;
  env) shift; cmd_env "$@" ;;
  list) cmd_list ;;
  start) shift; require_agent "${1:-}"; start_agent "$1"; say "agent $1: sidecar on 127.0.0.1:$(cat "$(agent_dir "$1")/port")"; cat "$(agent_dir "$1")/port" ;;
  rotate) shift; cmd_rotate "$@" ;;
  delete) shift; cmd_delete "$@" ;;
  -h|--help|help) usage ;;
  *) usage_error ;;
esac
