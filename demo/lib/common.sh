# Shared by demo/demo.sh and demo/demo-agent.sh: paths, defaults, process and TPM helpers.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Node.js 24 from .runtime/ (installed by scripts/setup.sh) first on PATH, for every node this demo
# starts (gateway, sidecars, registry CLI, mock services); AGENT_GATEWAY_NODE=22 selects Node 22.
# shellcheck source=../../scripts/runtime.sh
source "$ROOT/scripts/runtime.sh"
AGENT_STATE="${AGENT_STATE:-$ROOT/.demo-state}"
case "$AGENT_STATE" in /*) ;; *) AGENT_STATE="$PWD/$AGENT_STATE" ;; esac
CERTS="${AGENT_GATEWAY_DEMO_CERTS:-$ROOT/certs}"
CONFIG="${AGENT_GATEWAY_DEMO_CONFIG:-$ROOT/config.toml}"

# Ports (all on loopback) and local demo secrets. The secrets are demo values, not guidance:
# override them (and AGENT_GATEWAY_DATABASE_URL) anywhere that is not an isolated local demo.
GATEWAY_PORT="${AGENT_GATEWAY_DEMO_GATEWAY_PORT:-8443}"
ADMIN_PORT="${AGENT_GATEWAY_DEMO_ADMIN_PORT:-9090}"
PG_PORT="${AGENT_GATEWAY_DEMO_PG_PORT:-55433}"
DOCSTORE_PORT="${AGENT_GATEWAY_DEMO_DOCSTORE_PORT:-9443}"
MESSAGING_PORT="${AGENT_GATEWAY_DEMO_MESSAGING_PORT:-9444}"
ANTHROPIC_PORT="${AGENT_GATEWAY_DEMO_ANTHROPIC_PORT:-9445}"
# 1: Claude Code talks to the real api.anthropic.com (an account is needed); otherwise the gateway
# resolves api.anthropic.com:443 to the scripted Messages API among the mock services.
REAL_CLAUDE="${AGENT_GATEWAY_DEMO_REAL_CLAUDE:-0}"
PRINCIPAL_SWTPM_PORT="${AGENT_GATEWAY_DEMO_PRINCIPAL_SWTPM_PORT:-2331}"
AGENT_SWTPM_PORT="${AGENT_GATEWAY_DEMO_SWTPM_PORT:-2321}"
TPM_HANDLE="${AGENT_GATEWAY_DEMO_TPM_HANDLE:-0x81010004}"
PRINCIPAL="${AGENT_GATEWAY_DEMO_PRINCIPAL:-org-alice}"
DB_PASSWORD="${AGENT_GATEWAY_DEMO_DB_PASSWORD:-agent-gateway-demo}"
DEMO_USER_PIN=demo-user-pin
export AGENT_GATEWAY_TPM_USER_PIN="${AGENT_GATEWAY_TPM_USER_PIN:-$DEMO_USER_PIN}"
export AGENT_GATEWAY_TPM_SO_PIN="${AGENT_GATEWAY_TPM_SO_PIN:-demo-so-pin}"
export TSS2_LOG="${TSS2_LOG:-all+NONE}" TPM2_PKCS11_LOG_LEVEL="${TPM2_PKCS11_LOG_LEVEL:-0}"

PG_DIR="$AGENT_STATE/postgres"
# As root, initdb/postgres run as the postgres user, which must be able to reach the cluster
# directory. A state dir under a private home (/root is 0700) is not reachable: then the cluster
# lives under postgres's home and $AGENT_STATE/postgres links to it.
pg_dir_resolve() {
  [ "$(id -u)" -eq 0 ] || return 0
  [ -L "$PG_DIR" ] && { PG_DIR="$(readlink "$PG_DIR")"; return 0; }
  [ -d "$PG_DIR" ] && return 0
  mkdir -p "$AGENT_STATE"
  if ! runuser -u postgres -- test -x "$AGENT_STATE" 2>/dev/null; then
    local target
    target="/var/lib/postgresql/agent-gateway-demo-$(printf '%s' "$AGENT_STATE" | cksum | cut -d' ' -f1)"
    mkdir -p "$target"
    chown postgres:postgres "$target"
    ln -sfn "$target" "$PG_DIR"
    PG_DIR="$target"
  fi
}
PRINCIPAL_TPM_DIR="$AGENT_STATE/principal-tpm"
# The demo's stand-in for a TPM vendor's CA: every demo TPM gets EK certificates signed by it, and
# the registry CLI trusts exactly this CA when it attests principal and agent keys.
EK_CA_DIR="${AGENT_GATEWAY_DEMO_EK_CA_DIR:-$AGENT_STATE/ek-ca}"
EK_CA="$EK_CA_DIR/ca.pem"
AGENTS_DIR="$AGENT_STATE/agents"
LOG_DIR="$AGENT_STATE/logs"
PID_DIR="$AGENT_STATE/pids"

# The registry admin role migrates and writes; the gateway runs as a role that may only read.
ADMIN_URL_DEFAULT="postgres://agent_gateway_admin:${DB_PASSWORD}@127.0.0.1:${PG_PORT}/agent_gateway"
RUNTIME_URL_DEFAULT="postgres://agent_gateway_runtime:${DB_PASSWORD}@127.0.0.1:${PG_PORT}/agent_gateway"
EXTERNAL_DB="${AGENT_GATEWAY_DATABASE_URL:+1}"
ADMIN_URL="${AGENT_GATEWAY_DATABASE_URL:-$ADMIN_URL_DEFAULT}"
RUNTIME_URL="${AGENT_GATEWAY_RUNTIME_DATABASE_URL:-${AGENT_GATEWAY_DATABASE_URL:-$RUNTIME_URL_DEFAULT}}"

say() { printf '%s\n' "$*" >&2; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

node_bin() { node "$ROOT/bin/$1.js" "${@:2}"; }
registry_cli() { AGENT_GATEWAY_DATABASE_URL="$ADMIN_URL" node "$ROOT/bin/agent-gateway-registry.js" "$@"; }

# A PID is alive when the process exists and is not a zombie (PID 1 here may not reap orphans).
pid_alive() {
  local pid=$1 stat
  [ -n "$pid" ] || return 1
  stat="$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')" || return 1
  [ -n "$stat" ] && [[ "$stat" != Z* ]]
}

pid_of() { cat "$PID_DIR/$1.pid" 2>/dev/null || true; }

# start_bg NAME LOG COMMAND...: runs COMMAND detached, records its PID under $PID_DIR/NAME.pid.
start_bg() {
  local name=$1 log=$2
  shift 2
  mkdir -p "$PID_DIR" "$(dirname "$log")"
  setsid "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$PID_DIR/$name.pid"
}

# stop_pid NAME: TERM, wait up to 10 s, then KILL; removes the PID file.
stop_pid() {
  local name=$1 pid i
  pid="$(pid_of "$name")"
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_DIR/$name.pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.1 s.
wait_for() {
  local what=$1 seconds=$2 i
  shift 2
  for i in $(seq 1 $((seconds * 10))); do "$@" && return 0; sleep 0.1; done
  return 1
}

free_port_pair() { # first port P >= $1 with P and P+1 both free
  local p=$1
  while port_open "$p" || port_open $((p + 1)); do p=$((p + 2)); done
  echo "$p"
}

# --- software TPM: swtpm + private D-Bus + tpm2-abrmd (swtpm alone has 3 transient slots) ---

# tpm_start DIR PORT NAME: starts (or reuses) a TPM whose state lives in DIR; writes DIR/env.
tpm_start() {
  local dir=$1 port=$2 name=$3 ctrl=$(($2 + 1)) bus
  mkdir -p "$dir/state" "$dir/p11store"
  bus="unix:path=$dir/dbus.sock"
  if ! pid_alive "$(pid_of "$name-swtpm")"; then
    port_open "$port" && die "port $port for $name's swtpm is in use (set AGENT_GATEWAY_DEMO_*SWTPM_PORT)"
    # Once per TPM (an existing state is left alone): EKs and EK certificates from the demo CA.
    "$ROOT/tpm/swtpm-manufacture.sh" "$EK_CA_DIR" "$dir/state" || die "could not manufacture $name's TPM (EK certificates)"
    start_bg "$name-swtpm" "$LOG_DIR/$name-swtpm.log" swtpm socket --tpm2 \
      --server "type=tcp,port=$port,bindaddr=127.0.0.1" --ctrl "type=tcp,port=$ctrl,bindaddr=127.0.0.1" \
      --tpmstate "dir=$dir/state" --flags not-need-init,startup-clear
    wait_for "swtpm" 10 port_open "$port" || die "swtpm for $name did not start (see $LOG_DIR/$name-swtpm.log)"
    TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port" tpm2_dictionarylockout --setup-parameters \
      --max-tries=1000 --recovery-time=1 --lockout-recovery-time=1 >/dev/null 2>&1 || true
  fi
  if ! pid_alive "$(pid_of "$name-dbus")"; then
    rm -f "$dir/dbus.sock"
    start_bg "$name-dbus" "$LOG_DIR/$name-dbus.log" dbus-daemon --session --nofork --nopidfile --address="$bus"
    wait_for "dbus" 10 test -S "$dir/dbus.sock" || die "dbus-daemon for $name did not start"
  fi
  if ! pid_alive "$(pid_of "$name-abrmd")"; then
    local root_flag=""
    [ "$(id -u)" -eq 0 ] && root_flag="--allow-root"
    DBUS_SESSION_BUS_ADDRESS="$bus" start_bg "$name-abrmd" "$LOG_DIR/$name-abrmd.log" \
      tpm2-abrmd --session --flush-all $root_flag --tcti="swtpm:host=127.0.0.1,port=$port"
    wait_for "tpm2-abrmd" 15 env DBUS_SESSION_BUS_ADDRESS="$bus" TPM2TOOLS_TCTI=tabrmd:bus_type=session \
      tpm2_getrandom 4 --hex >/dev/null 2>&1 || die "tpm2-abrmd for $name did not start (see $LOG_DIR/$name-abrmd.log)"
  fi
  cat >"$dir/env" <<ENV
export DBUS_SESSION_BUS_ADDRESS="$bus"
export TPM2TOOLS_TCTI="tabrmd:bus_type=session"
export TPM2_PKCS11_TCTI="tabrmd:bus_type=session"
export TPM2_PKCS11_STORE="${4:-$dir/p11store}"
export AGENT_GATEWAY_DEMO_SWTPM_DATA_PORT="$port"
ENV
}

tpm_stop() { # NAME
  local name=$1
  stop_pid "$name-abrmd"
  stop_pid "$name-dbus"
  stop_pid "$name-swtpm"
}

# What setup delegates to the principal and grants agent-alpha (api.anthropic.com for Claude Code,
# whether it reaches the scripted Messages API or, with AGENT_GATEWAY_DEMO_REAL_CLAUDE=1, the real one).
DEMO_DESTINATIONS=(docstore:443 messaging:443 api.anthropic.com:443)

# registry_list KIND [OPTIONS...]: one "DESTINATION STATE" line per row of `agent-gateway-registry list KIND`.
registry_list() {
  registry_cli --json list "$@" | node -e '
    let text = "";
    process.stdin.on("data", (chunk) => (text += chunk)).on("end", () => {
      for (const row of JSON.parse(text)[process.argv[1]] ?? []) console.log(`${row.destination} ${row.state}`);
    });' "$1"
}

# state_of DESTINATION < registry_list output: "active" when any of its rows is, else the state of
# one of them, else nothing (no row at all).
state_of() { awk -v d="$1" '$1 == d { s = $2; if (s == "active") exit } END { if (s != "") print s }'; }
