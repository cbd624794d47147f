#!/usr/bin/env bash
# Principal shell: signed permissions for an agent identity and its exact public key.
#
#   registry-cli/agent-permissions.sh grant --identity ID (--cert PEM | --public-key PEM | --spki HEX)
#       [--principal KEY_ID] [--grant DEST]... [DEST...] [--not-before T] [--not-after T]
#     signs one permission row per destination inside the principal's TPM (default validity 30 days)
#     and prints the permission ids; refuses (exit 3, nothing written) what the gateway would deny.
#   registry-cli/agent-permissions.sh delete --identity ID [--cert PEM | --public-key PEM | --spki HEX] [DEST...]
#     revokes the identity's active permissions (for that key and those destinations when given).
#
# Environment: AGENT_GATEWAY_DATABASE_URL (or DATABASE_URL); for grant also
# AGENT_GATEWAY_PRINCIPAL_KEY_ID (default --principal), AGENT_GATEWAY_TPM_USER_PIN (or
# --user-pin-file), TPM2_PKCS11_TCTI and TPM2_PKCS11_STORE. `grant --help` and `delete --help`
# list every option; registry-cli/README.md has the exit codes.
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
# Node.js 24 from .runtime/ when scripts/setup.sh installed it there (else the node on PATH).
# shellcheck source=../scripts/runtime.sh
source "$repo/scripts/runtime.sh"
cli="$repo/bin/agent-gateway-registry.js"

# The comment block above is the usage text.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$(readlink -f "${BASH_SOURCE[0]}")"; }

case "${1:-}" in
  grant) shift; exec node "$cli" grant-permission "$@" ;;
  delete) shift; exec node "$cli" delete-permission "$@" ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    echo "agent-permissions.sh: expected 'grant' or 'delete'${1:+, not '$1'}" >&2
    exit 2
    ;;
esac
