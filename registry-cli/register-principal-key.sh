#!/usr/bin/env bash
# Principal shell: creates (or reuses) a non-exportable P-256 key labelled KEY_ID inside the TPM
# (tpm2-pkcs11 token) and registers only its public key in principal_signing_keys.
# Run it on the machine that owns the TPM.
#
#   registry-cli/register-principal-key.sh KEY_ID [--token LABEL] [--not-before T] [--not-after T]
#
# Environment: AGENT_GATEWAY_DATABASE_URL (or DATABASE_URL); AGENT_GATEWAY_TPM_USER_PIN, and
# AGENT_GATEWAY_TPM_SO_PIN when the token must be created (or --user-pin-file/--so-pin-file);
# TPM2_PKCS11_TCTI and TPM2_PKCS11_STORE for tpm2-pkcs11. --help lists every option;
# registry-cli/README.md has the exit codes.
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
# Node.js 24 from .runtime/ when scripts/setup.sh installed it there (else the node on PATH).
# shellcheck source=../scripts/runtime.sh
source "$repo/scripts/runtime.sh"
exec node "$repo/bin/agent-gateway-registry.js" register-principal "$@"
