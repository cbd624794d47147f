# shellcheck shell=bash
# Sourced by every script that runs node: puts the project's own Node.js (installed by
# scripts/setup.sh from the npm registry, under .runtime/) first on PATH.
#
#   AGENT_GATEWAY_NODE=24 (default) | 22 | system
#
# `system` leaves PATH alone (whatever `node` the machine has). The choice is exported, so child
# scripts (setup.sh, demo-agent.sh, registry-cli/*.sh) and the processes they start agree.
# Defines:
#   AGENT_GATEWAY_ROOT          the repository root
#   AGENT_GATEWAY_NODE_VERSION  the exact version selected (empty for `system`)
#   AGENT_GATEWAY_NODE_HOME     its directory, .runtime/node-VERSION (empty for `system`)
#   agent_gateway_node_home V   prints the directory for exact version V
#   agent_gateway_runtime_check fails (with what to run) unless `node` is the selected runtime

AGENT_GATEWAY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=node-versions.sh
source "$AGENT_GATEWAY_ROOT/scripts/node-versions.sh"

agent_gateway_node_home() { printf '%s/.runtime/node-%s\n' "$AGENT_GATEWAY_ROOT" "$1"; }

export AGENT_GATEWAY_NODE="${AGENT_GATEWAY_NODE:-24}"
case "$AGENT_GATEWAY_NODE" in
  24) AGENT_GATEWAY_NODE_VERSION="$AGENT_GATEWAY_NODE_24" ;;
  22) AGENT_GATEWAY_NODE_VERSION="$AGENT_GATEWAY_NODE_22" ;;
  system) AGENT_GATEWAY_NODE_VERSION="" ;;
  *) echo "AGENT_GATEWAY_NODE must be 24, 22 or system (got '$AGENT_GATEWAY_NODE')" >&2; return 2 2>/dev/null || exit 2 ;;
esac

# Drop any runtime an outer script put on PATH, then put the selected one first.
_agw_path=""
IFS=: read -r -a _agw_parts <<<"$PATH"
for _agw_part in "${_agw_parts[@]}"; do
  case "$_agw_part" in "$AGENT_GATEWAY_ROOT"/.runtime/node-*/bin) ;; *) _agw_path="${_agw_path:+$_agw_path:}$_agw_part" ;; esac
done
PATH="$_agw_path"
unset _agw_path _agw_parts _agw_part

if [ -n "$AGENT_GATEWAY_NODE_VERSION" ]; then
  AGENT_GATEWAY_NODE_HOME="$(agent_gateway_node_home "$AGENT_GATEWAY_NODE_VERSION")"
  PATH="$AGENT_GATEWAY_NODE_HOME/bin:$PATH"
  # node-gyp (native addons such as pkcs11js) builds against the headers of the runtime in use.
  export npm_config_nodedir="$AGENT_GATEWAY_NODE_HOME"
else
  AGENT_GATEWAY_NODE_HOME=""
fi
export PATH
hash -r

agent_gateway_runtime_check() {
  [ -n "$AGENT_GATEWAY_NODE_VERSION" ] || return 0
  local seen
  seen="$(node --version 2>/dev/null || true)"
  if [ "$seen" != "v$AGENT_GATEWAY_NODE_VERSION" ]; then
    echo "node is '${seen:-missing}' ($(command -v node || echo 'not on PATH')), expected v$AGENT_GATEWAY_NODE_VERSION from $AGENT_GATEWAY_NODE_HOME: run scripts/setup.sh" >&2
    return 1
  fi
}
