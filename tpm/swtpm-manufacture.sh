#!/usr/bin/env bash
# Manufactures a software TPM the way a vendor would: endorsement keys plus EK certificates
# signed by a local CA (swtpm_setup --create-ek-cert through swtpm_localca).
#
#   tpm/swtpm-manufacture.sh CA_DIR STATE_DIR
#
# CA_DIR holds the EK CA: ca.pem (give it to `agent-gateway-registry --ek-ca`), its key and
# serial counter. It is created (P-256, 10 years) when ca.pem is missing, and shared by every
# TPM manufactured with it. STATE_DIR is the swtpm --tpmstate directory; it must hold no TPM yet.
# The RSA 2048 EK certificate lands in NV index 0x01c00002, the ECC P-384 one in 0x01c00016.
set -euo pipefail
ca_dir=${1:?usage: swtpm-manufacture.sh CA_DIR STATE_DIR}
state_dir=${2:?usage: swtpm-manufacture.sh CA_DIR STATE_DIR}
mkdir -p "$ca_dir" "$state_dir"
ca_dir="$(cd "$ca_dir" && pwd)"
state_dir="$(cd "$state_dir" && pwd)"
umask 077
# Several TPMs may be manufactured with one CA at once: one at a time per CA (its key, its serial).
exec 9>"$ca_dir/.lock"
flock 9
if [ ! -s "$ca_dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
    -keyout "$ca_dir/ca-key.pem" -out "$ca_dir/ca.pem.tmp" -subj "/CN=agent-gateway local EK CA $(date -u +%Y%m%dT%H%M%SZ)-$$" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign >/dev/null 2>&1
  echo 1 >"$ca_dir/certserial"
  mv "$ca_dir/ca.pem.tmp" "$ca_dir/ca.pem"
fi
conf_dir="$(mktemp -d)"
trap 'rm -rf "$conf_dir"' EXIT
cat >"$conf_dir/localca.conf" <<CONF
statedir = $ca_dir
signingkey = $ca_dir/ca-key.pem
issuercert = $ca_dir/ca.pem
certserial = $ca_dir/certserial
CONF
cat >"$conf_dir/localca.options" <<CONF
--platform-manufacturer agent-gateway
--platform-version 2.1
--platform-model swtpm
CONF
cat >"$conf_dir/setup.conf" <<CONF
create_certs_tool = $(command -v swtpm_localca || echo /usr/bin/swtpm_localca)
create_certs_tool_config = $conf_dir/localca.conf
create_certs_tool_options = $conf_dir/localca.options
active_pcr_banks = sha256
CONF
if ! swtpm_setup --tpm2 --tpmstate "$state_dir" --create-ek-cert --config "$conf_dir/setup.conf" \
  --logfile "$conf_dir/setup.log" --not-overwrite >/dev/null 2>&1; then
  cat "$conf_dir/setup.log" >&2
  echo "swtpm-manufacture.sh: swtpm_setup failed for $state_dir" >&2
  exit 1
fi
