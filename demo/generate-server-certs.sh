#!/usr/bin/env bash
# Generates the demo's TLS material (all git-ignored):
#   gateway:       server-ca.pem (+ server-ca-key.pem), server.pem, server-key.pem
#   mock services: mock-ca.pem (+ mock-ca-key.pem), mock-services.pem, mock-services-key.pem
#                  (names docstore, messaging, api.anthropic.com for the scripted Messages API)
# Usage: demo/generate-server-certs.sh [OUT_DIR]   (default: certs/ in the repository)
# Existing files are kept; pass --force to regenerate everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FORCE=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-$ROOT/certs}"
mkdir -p "$OUT"
umask 077

# Extra names for the gateway certificate, e.g. AGENT_GATEWAY_DEMO_GATEWAY_NAMES="gw.internal 10.0.0.5".
GATEWAY_NAMES="localhost ${AGENT_GATEWAY_DEMO_GATEWAY_NAMES:-}"
MOCK_NAMES="docstore messaging api.anthropic.com ${AGENT_GATEWAY_DEMO_MOCK_NAMES:-}"

san_for() {
  local san="" name
  for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
  done
  echo "${san%,}"
}

new_ca() { # NAME CN
  local name=$1 cn=$2
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=$cn" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$OUT/$name-key.pem" -out "$OUT/$name.pem" 2>/dev/null
}

new_leaf() { # NAME CA CN SAN
  local name=$1 ca=$2 cn=$3 san=$4 ext
  ext="$(mktemp)"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
    -keyout "$OUT/$name-key.pem" -out "$OUT/$name.csr" 2>/dev/null
  openssl x509 -req -in "$OUT/$name.csr" -CA "$OUT/$ca.pem" -CAkey "$OUT/$ca-key.pem" -CAcreateserial \
    -days 90 -extfile "$ext" -out "$OUT/$name.pem" 2>/dev/null
  rm -f "$OUT/$name.csr" "$ext" "$OUT/$ca.srl"
}

if [ "$FORCE" = 1 ] || [ ! -s "$OUT/server.pem" ] || [ ! -s "$OUT/server-ca.pem" ]; then
  new_ca server-ca "agent-gateway demo server CA"
  # shellcheck disable=SC2086
  new_leaf server server-ca localhost "$(san_for $GATEWAY_NAMES 127.0.0.1 ::1)"
  echo "generate-server-certs: gateway TLS material in $OUT (server-ca.pem, server.pem, server-key.pem)" >&2
fi
# A leaf from an older demo may lack a name added since (api.anthropic.com): re-issue it under the same CA.
mock_names_covered() {
  local name
  # shellcheck disable=SC2086
  for name in $MOCK_NAMES; do
    openssl x509 -in "$OUT/mock-services.pem" -noout -checkhost "$name" 2>/dev/null | grep -q 'does match' || return 1
  done
}
if [ "$FORCE" = 1 ] || [ ! -s "$OUT/mock-services.pem" ] || [ ! -s "$OUT/mock-ca.pem" ] || [ ! -s "$OUT/mock-ca-key.pem" ]; then
  new_ca mock-ca "agent-gateway demo mock services CA"
  # shellcheck disable=SC2086
  new_leaf mock-services mock-ca docstore "$(san_for $MOCK_NAMES)"
  echo "generate-server-certs: mock service TLS material in $OUT (mock-ca.pem, mock-services.pem, mock-services-key.pem)" >&2
elif ! mock_names_covered; then
  # shellcheck disable=SC2086
  new_leaf mock-services mock-ca docstore "$(san_for $MOCK_NAMES)"
  echo "generate-server-certs: mock service TLS material in $OUT (mock-ca.pem, mock-services.pem, mock-services-key.pem)" >&2
fi
chmod 644 "$OUT"/*.pem
chmod 600 "$OUT"/*-key.pem
