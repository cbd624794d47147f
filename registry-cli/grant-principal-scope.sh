#!/usr/bin/env bash
# Admin shell: allows principal KEY_ID to delegate these destinations. Destinations are stored
# normalised (docstore -> docstore:443); granting one again leaves an active delegation as it is
# and reactivates a revoked or expired one. Needs no TPM.
#
#   registry-cli/grant-principal-scope.sh KEY_ID DEST... [--not-before T] [--not-after T]
#
# Environment: AGENT_GATEWAY_DATABASE_URL (or DATABASE_URL), an admin role. --help lists every
# option; registry-cli/README.md has the exit codes.
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
# Node.js 24 from .runtime/ when scripts/setup.sh installed it there (else the node on PATH).
# shellcheck source=../scripts/runtime.sh
source "$repo/scripts/runtime.sh"
exec node "$repo/bin/agent-gateway-registry.js" grant-scope "$@"
