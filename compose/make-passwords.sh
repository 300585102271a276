#!/usr/bin/env bash
# Create compose/passwd (Mosquitto password file) with one user per service role, an operator
# and one user per camera, and compose/.env with the passwords. docker compose reads .env beside
# docker-compose.yml, so a link .env -> compose/.env is made there unless a .env exists.
# Usage: compose/make-passwords.sh [camera ...]      (default camera: cam-1)
# Needs mosquitto_passwd (Debian: apt-get install mosquitto). Re-running makes new passwords.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found: apt-get install mosquitto" >&2; exit 1; }
cameras=("$@"); [ ${#cameras[@]} -gt 0 ] || cameras=(cam-1)
passwd="$here/passwd"; env="$here/.env"
umask 077
: > "$passwd"; : > "$env"
secret() { head -c 18 /dev/urandom | base64 | tr -d '/+='; }
for user in admission worker arbiter scheduler operator "${cameras[@]}"; do
  case "$user" in *[!A-Za-z0-9._-]*) echo "bad user name: $user" >&2; exit 2;; esac
  pw="$(secret)"
  mosquitto_passwd -b "$passwd" "$user" "$pw"
  echo "OFFRAMP_PASSWORD_$(echo "$user" | tr 'a-z.-' 'A-Z__')=$pw" >> "$env"
done
chmod 0644 "$passwd"  # the broker runs as user mosquitto inside its container
top="$(dirname "$here")"
if [ ! -e "$top/.env" ] && [ ! -L "$top/.env" ]; then ln -s compose/.env "$top/.env"; fi
echo "wrote $passwd and $env (users: admission worker arbiter scheduler operator ${cameras[*]})"
