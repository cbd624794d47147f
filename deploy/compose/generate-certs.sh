#!/usr/bin/env bash
# A self-signed P-256 server certificate for deploy/compose.yaml (localhost and 127.0.0.1).
# For real use put your own server.pem (chain) and server-key.pem in deploy/compose/certs/.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/certs"
mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$dir/server-key.pem" -out "$dir/server.pem"
# The container runs as uid 10001: make the key readable to it, and to nobody else.
chmod 0644 "$dir/server.pem"
chmod 0640 "$dir/server-key.pem"
if [ "$(id -u)" = 0 ]; then chgrp 10001 "$dir/server-key.pem"; else chmod 0644 "$dir/server-key.pem"; fi
echo "wrote $dir/server.pem and $dir/server-key.pem"
