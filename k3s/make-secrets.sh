#!/usr/bin/env bash
# The Secrets the k3s manifests read, with one broker user per pod:
#   offramp-broker-users            passwd and acl, for the broker
#   offramp-<role>-credentials      one file per pod of that role, named after the pod
#                                   (offramp-segment-worker-0, ...), holding its password;
#                                   admission's also holds ingest-admission (the shared session)
# Pods read /credentials/<their pod name> (OFFRAMP_PASSWORD_FILE). Every pod of a role mounts
# that role's Secret, so a worker can read its sibling workers' passwords, never another
# role's; the broker's ACL confines each user to its own topics all the same.
#
# Usage: k3s/make-secrets.sh [--workers N] [--admissions N] [--out DIR] [camera ...]
#   --workers N      segment-worker pods (default 2; the jetson overlay runs 3)
#   --admissions N   admission-controller pods (default 2: active and standby)
#   --out DIR        where to write (default k3s/secrets): secrets.yaml to apply, and the
#                    operator's and cameras' passwords in .env and credentials/
# Then: kubectl apply -f k3s/secrets/secrets.yaml. Scaling workers to more pods than have
# credentials leaves the new pods unable to log in: re-run with the new count and apply.
# Needs mosquitto_passwd and kubectl (rendering only: no cluster is contacted).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workers=2; admissions=2; out="$here/secrets"; cameras=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
count() { case "$2" in ''|*[!0-9]*|0) echo "$1 needs a number of pods (1 or more), got '$2'" >&2; exit 2;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) count "$1" "${2:-}"; workers="$2"; shift 2;;
    --admissions) count "$1" "${2:-}"; admissions="$2"; shift 2;;
    --out) out="$2"; shift 2;;
    -h|--help) usage;;
    -*) echo "unknown option $1 (--help lists them)" >&2; exit 2;;
    *) cameras+=("$1"); shift;;
  esac
done
command -v kubectl >/dev/null || { echo "kubectl not found (it only renders here)" >&2; exit 1; }

args=(--out "$out" --arbiter offramp-exit-arbiter-0 --scheduler offramp-priority-scheduler-0)
adm=(); wrk=()
for ((i = 0; i < admissions; i++)); do adm+=("offramp-admission-controller-$i"); args+=(--admission "${adm[-1]}"); done
for ((i = 0; i < workers; i++)); do wrk+=("offramp-segment-worker-$i"); args+=(--worker "${wrk[-1]}"); done
mkdir -p "$out"
rm -rf "$out/credentials"
bash "$here/../compose/make-passwords.sh" "${args[@]}" "${cameras[@]}" >/dev/null

secret() {  # name, files...
  local name=$1; shift
  local from=()
  for f in "$@"; do from+=("--from-file=$f"); done
  echo "---"
  kubectl create secret generic "$name" -n offramp "${from[@]}" --dry-run=client -o yaml
}
c="$out/credentials"
umask 077
{
  secret offramp-broker-users "$out/passwd" "$out/acl"
  secret offramp-admission-credentials "$c/ingest-admission" "${adm[@]/#/$c/}"
  secret offramp-worker-credentials "${wrk[@]/#/$c/}"
  secret offramp-arbiter-credentials "$c/offramp-exit-arbiter-0"
  secret offramp-scheduler-credentials "$c/offramp-priority-scheduler-0"
} > "$out/secrets.yaml"
# what stays with the operator: its own password and the cameras'
for f in "${adm[@]}" "${wrk[@]}" ingest-admission offramp-exit-arbiter-0 \
         offramp-priority-scheduler-0; do rm -f "$c/$f"; done
for f in "$c"/*; do
  echo "OFFRAMP_PASSWORD_$(basename "$f" | tr 'a-z.-' 'A-Z__')=$(cat "$f")"
done > "$out/.env"
echo "wrote $out/secrets.yaml ($admissions admission, $workers worker pods); apply it with" \
     "kubectl apply -f $out/secrets.yaml"
