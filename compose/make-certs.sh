#!/usr/bin/env bash
# A private CA and a server certificate for the broker's TLS listener (8883), and
# compose/conf.d/tls.conf that turns the listener on. Clients use mqtts://<host>:8883 with
# OFFRAMP_TLS_CA=compose/certs/ca.crt. Usage: compose/make-certs.sh [hostname ...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(localhost broker)
certs="$here/certs"; mkdir -p "$certs" "$here/conf.d"
san="$(printf 'DNS:%s,' "${names[@]}")IP:127.0.0.1"
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=offramp-ca" \
  -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${names[0]}" \
  -keyout "$certs/server.key" -out "$certs/server.csr" 2>/dev/null
openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
  -CAcreateserial -days 825 -extfile <(printf 'subjectAltName=%s' "$san") \
  -out "$certs/server.crt" 2>/dev/null
chmod 0644 "$certs/server.key"  # read by user mosquitto in the container; keep the folder private
cat > "$here/conf.d/tls.conf" <<CONF
listener 8883 0.0.0.0
use_username_as_clientid true
cafile /mosquitto/config/certs/ca.crt
certfile /mosquitto/config/certs/server.crt
keyfile /mosquitto/config/certs/server.key
CONF
echo "wrote $certs (CA, server cert for ${names[*]}) and $here/conf.d/tls.conf"
