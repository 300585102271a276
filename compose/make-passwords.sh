#!/usr/bin/env bash
# Broker credentials: one user per service instance, one per camera, an operator and a
# healthcheck user, and the ACL that confines each to its own topics.
#
# Writes into the output folder (default: this folder, compose/):
#   passwd          Mosquitto password file (hashed)
#   acl             the topic ACL, one section per user (no patterns: a camera named like a
#                   node gets nothing of the node's)
#   .env            OFFRAMP_PASSWORD_<USER>=... for docker compose (cam-1 -> CAM_1), and
#                   OFFRAMP_GRAFANA_ADMIN_PASSWORD for its observability profile
#   credentials/    one file per user holding its password (Kubernetes Secrets, k3s/README.md)
# and, for compose/, a link .env -> compose/.env beside docker-compose.yml unless one exists.
#
# The broker configs set use_username_as_clientid, so a client's id is its user name: nobody
# can connect as another client (and take over its session) without that client's password.
# Each connection therefore needs its own user; the admission-controllers of one group share
# the ingest session's user (ingest-<group>), which is how a standby takes that session over.
#
# Usage: compose/make-passwords.sh [options] [camera ...]        (default camera: cam-1)
#   --out DIR          where to write (default: compose/)
#   --prefix P         topic prefix the ACL grants (default: offramp/v1)
#   --admission NAME   an admission-controller instance (repeat; default admission-1 admission-2)
#   --group NAME       their ingest group (default: admission; user ingest-<group>)
#   --worker NAME      a segment-worker instance (repeat; default worker-1 worker-2 worker-gpu-1)
#   --arbiter NAME     the exit-arbiter instance (default arbiter-1)
#   --scheduler NAME   the priority-scheduler instance (default scheduler-1)
# Instance names are the services' OFFRAMP_NODE: the ACL grants a node its own state/ topic.
# Needs mosquitto_passwd (Debian: apt-get install mosquitto). Re-running makes new passwords.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here"; prefix="offramp/v1"; group="admission"
admissions=(); workers=(); arbiter="arbiter-1"; scheduler="scheduler-1"; cameras=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2;;
    --prefix) prefix="$2"; shift 2;;
    --admission) admissions+=("$2"); shift 2;;
    --group) group="$2"; shift 2;;
    --worker) workers+=("$2"); shift 2;;
    --arbiter) arbiter="$2"; shift 2;;
    --scheduler) scheduler="$2"; shift 2;;
    -h|--help) usage;;
    -*) echo "unknown option $1 (--help lists them)" >&2; exit 2;;
    *) cameras+=("$1"); shift;;
  esac
done
[ ${#admissions[@]} -gt 0 ] || admissions=(admission-1 admission-2)
[ ${#workers[@]} -gt 0 ] || workers=(worker-1 worker-2 worker-gpu-1)
[ ${#cameras[@]} -gt 0 ] || cameras=(cam-1)
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found: apt-get install mosquitto" >&2; exit 1; }

ingest="ingest-$group"
users=(operator healthcheck "$ingest" "${admissions[@]}" "${workers[@]}" "$arbiter" "$scheduler" "${cameras[@]}")
declare -A seen=()
for user in "${users[@]}"; do
  case "$user" in
    ""|*[!A-Za-z0-9._-]*|[._-]*) echo "bad name: '$user' (letters, digits, '.', '_', '-')" >&2; exit 2;;
  esac
  [ -z "${seen[$user]:-}" ] || { echo "name used twice: $user (each user is one client id)" >&2; exit 2; }
  seen[$user]=1
done

p=$prefix
section() { printf '\nuser %s\n' "$1"; shift; printf 'topic %s\n' "$@"; }
{
  echo "# offramp topic ACL for prefix $p, written by compose/make-passwords.sh: one section per"
  echo "# user. Everything not granted here is denied. Client ids are the user names"
  echo "# (use_username_as_clientid in mosquitto.conf)."
  section operator "read $p/#" "read \$SYS/#" "readwrite $p/control/source/+"
  section healthcheck "read \$SYS/broker/uptime"
  # the ingest session of the admission group: frames in, and nothing else
  section "$ingest" "read $p/ingest/+"
  for a in "${admissions[@]}"; do
    section "$a" "write $p/results/+" "write $p/replies/#" "read $p/done/+" "write $p/act/#" \
      "write $p/state/admission/$a" "read $p/state/#" "read $p/control/#" "write $p/control/pace/+" "read \$SYS/broker/#"
  done
  for w in "${workers[@]}"; do
    # reads activations addressed to it; sends to any next hop and reports to any owner
    section "$w" "read $p/act/+/+/$w" "write $p/act/#" "write $p/done/+" \
      "write $p/state/worker/$w" "read $p/state/#" "read $p/control/#"
  done
  section "$arbiter" "read $p/done/+" "write $p/state/arbiter/$arbiter" "read $p/state/#" \
    "readwrite $p/control/exit-policy/+"
  section "$scheduler" "write $p/state/scheduler/$scheduler" "read $p/state/#" \
    "readwrite $p/control/plan" "read $p/control/#"
  for c in "${cameras[@]}"; do
    # its own frames in, its own results out (and replies to frames with a Response Topic),
    # and the rate its frames are taken at
    section "$c" "write $p/ingest/$c" "read $p/results/$c" "read $p/replies/$c/#" \
      "read $p/control/pace/$c"
  done
} > "$out/acl.new"

umask 077
mkdir -p "$out/credentials"
: > "$out/passwd.new"; : > "$out/.env.new"
secret() { head -c 18 /dev/urandom | base64 | tr -d '/+='; }
for user in "${users[@]}"; do
  pw="$(secret)"
  mosquitto_passwd -b "$out/passwd.new" "$user" "$pw"
  echo "OFFRAMP_PASSWORD_$(echo "$user" | tr 'a-z.-' 'A-Z__')=$pw" >> "$out/.env.new"
  printf '%s' "$pw" > "$out/credentials/$user"
done
echo "OFFRAMP_GRAFANA_ADMIN_PASSWORD=$(secret)" >> "$out/.env.new"  # the observability profile
chmod 0644 "$out/passwd.new" "$out/acl.new"  # the broker runs as user mosquitto in its container
mv "$out/passwd.new" "$out/passwd"; mv "$out/acl.new" "$out/acl"; mv "$out/.env.new" "$out/.env"
if [ "$out" = "$here" ]; then
  top="$(dirname "$here")"
  if [ ! -e "$top/.env" ] && [ ! -L "$top/.env" ]; then ln -s compose/.env "$top/.env"; fi
fi
echo "wrote $out/{passwd,acl,.env,credentials/} for: ${users[*]}"
