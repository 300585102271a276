#!/usr/bin/env bash
# `make test-deploy`: the compose stack for real. Builds the images with podman, runs
# docker-compose.yml with podman-compose (plus compose/podman/override.yml for this kind of
# host), publishes frames with mosquitto_pub as a camera, reads the results with mosquitto_sub,
# checks every frame got exactly one right answer, stops the stack (every service must exit 0 on
# SIGTERM) and takes it down. Then `offramp testbed` drives the same images through podman's
# Docker-compatible API (tests/deploy). Fails, saying why, wherever a step cannot run; it never
# passes without having run the stack.
#
# Needs (installed by scripts/ensure-deploy-deps.sh): podman with runc, debootstrap (only when
# the base image is missing and no registry can be reached), mosquitto clients, openssl, and
# podman-compose in the venv. Runs as root (podman here has no rootless setup).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
VENV="$(cd "${VENV:-.venv}" 2>/dev/null && pwd)" || { echo "test-deploy: no venv (make setup)" >&2; exit 1; }
PY="$VENV/bin/python"
COMPOSE="$VENV/bin/podman-compose"
BASE_IMAGE=${OFFRAMP_BASE_IMAGE:-localhost/offramp/python:3.11-bookworm}
BROKER_IMAGE=localhost/offramp/mosquitto:2
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROJECT=offramp-deploy-test
export CONTAINERS_CONF="$repo/compose/podman/containers.conf"

fail() { echo "test-deploy: FAILED: $*" >&2; exit 1; }
step() { echo "== test-deploy: $*" >&2; }

for tool in podman mosquitto_pub mosquitto_sub mosquitto_passwd openssl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (scripts/ensure-deploy-deps.sh)"
done
[ -x "$COMPOSE" ] || fail "$COMPOSE is missing (make setup installs the dev extra)"
[ "$(id -u)" -eq 0 ] || fail "run as root: podman here has no rootless setup"
podman info >/dev/null 2>&1 || fail "podman cannot run here: $(podman info 2>&1 | tail -1)"
for port in 1883 9090; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    fail "port $port is taken on this host; the stack uses host networking"
  fi
done

work="$(mktemp -d /tmp/offramp-deploy.XXXXXX)"
proj="$work/project"
# the observability profile runs Prometheus; Grafana needs a registry (the override leaves it out)
compose() { "$COMPOSE" -p "$PROJECT" -f "$proj/docker-compose.yml" \
                       -f "$proj/compose/podman/override.yml" --profile observability "$@"; }
cleanup() {
  local rc=$?
  if [ -f "$proj/docker-compose.yml" ]; then
    if [ $rc -ne 0 ]; then
      echo "---- container logs (last 40 lines each) ----" >&2
      for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
                   --format '{{.Names}}'); do
        echo "---- $c" >&2; podman logs --tail 40 "$c" >&2 || true
      done
    fi
    compose down -v -t 30 >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

# -- images -------------------------------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  step "base image $BASE_IMAGE: debootstrap bookworm (about a minute)"
  command -v debootstrap >/dev/null || fail "no $BASE_IMAGE and no debootstrap to make it"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap from $MIRROR"; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$work/rootfs"
fi
build() {  # tag, file, extra args...
  local tag=$1 file=$2; shift 2
  step "build $tag"
  podman build -q --network host --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" "$@" -t "$tag" -f "$file" . >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; fail "podman build $file"; }
}
build "$BROKER_IMAGE" compose/podman/mosquitto.Containerfile
build localhost/offramp/prometheus:2.42 compose/podman/prometheus.Containerfile

step "wheelhouse: the runtime wheels, so the service images build offline (PIP_NO_INDEX=1)"
mkdir -p wheelhouse
"$PY" - >"$work/requirements.txt" <<'PYEOF'
import tomllib
lib = tomllib.load(open("shared/pyproject.toml", "rb"))
extras = lib["project"]["optional-dependencies"]
need = lib["project"]["dependencies"] + extras["serve"] + extras["images"] + extras["tracing"]
print("\n".join(need + lib["build-system"]["requires"] + ["wheel"]))
PYEOF
# the host's Python is 3.11 on glibc like the Debian base, so its wheels fit the images
"$PY" -m pip download -q --only-binary=:all: -d wheelhouse -r "$work/requirements.txt" \
  || fail "pip download into wheelhouse/"
for svc in admission-controller segment-worker exit-arbiter priority-scheduler; do
  build "offramp/$svc:latest" services/Dockerfile --build-arg SERVICE="$svc" --build-arg PIP_NO_INDEX=1
done

# -- the stack ----------------------------------------------------------------------------------
step "bundle, users and certificates in a scratch copy of the compose files"
"$PY" -c "from offramp.ml.build import build, preset; build(preset('demo'), __import__('pathlib').Path('bundles/demo'))" \
  >/dev/null || fail "building the demo bundle"
mkdir -p "$proj"
cp docker-compose.yml "$proj/"
cp -r compose "$proj/compose"
rm -rf "$proj/compose/passwd" "$proj/compose/acl" "$proj/compose/credentials" "$proj/compose/.env" \
  "$proj/compose/certs" "$proj/compose/conf.d/tls.conf"
bash "$proj/compose/make-passwords.sh" cam-1 >/dev/null
bash "$proj/compose/make-certs.sh" localhost >/dev/null
set -a; . "$proj/compose/.env"; set +a

# what the model-builder service would do: put the bundle into the "bundles" volume
podman volume rm -f "${PROJECT}_bundles" >/dev/null 2>&1 || true
podman volume create "${PROJECT}_bundles" >/dev/null
podman run --rm --network none -v "${PROJECT}_bundles:/bundles" -v "$repo/bundles/demo:/src:ro" \
  "$BASE_IMAGE" cp -r /src /bundles/demo || fail "copying the bundle into the volume"

step "podman-compose up"
(cd "$proj" && compose up -d --no-build) >"$work/up.log" 2>&1 \
  || { tail -30 "$work/up.log" >&2; fail "podman-compose up"; }

step "waiting for every service to be ready (/readyz) and every healthcheck to pass"
declare -A ports=([admission-controller]=18081 [segment-worker]=18082 [exit-arbiter]=18083
                  [priority-scheduler]=18084 [admission-controller-standby]=18085
                  [segment-worker-2]=18086)
deadline=$((SECONDS + 180))
for svc in "${!ports[@]}"; do
  until OFFRAMP_HTTP_PORT=${ports[$svc]} "$PY" -m offramp.node.health /readyz >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$svc not ready: $(OFFRAMP_HTTP_PORT=${ports[$svc]} \
      "$PY" -m offramp.node.health /readyz 2>&1)"
    sleep 1
  done
done
# podman 4.3 runs healthchecks from systemd timers, which this host lacks: run each one now
for c in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
  podman healthcheck run "$c" >/dev/null 2>&1 || fail "the compose healthcheck of $c fails"
done

# each user is one client id (use_username_as_clientid): the camera publishes, the operator reads
step "publishing frames as camera cam-1 with mosquitto_pub, reading results as operator"
"$PY" tests/deploy/frames.py make "$work/frames" || fail "making the frames"
total=$(( $(ls "$work/frames" | wc -l) - 1 ))
mosquitto_sub -h 127.0.0.1 -p 1883 -u operator -P "$OFFRAMP_PASSWORD_OPERATOR" -q 1 \
  -t offramp/v1/results/cam-1 -C "$total" -W 120 >"$work/results.jsonl" &
sub=$!
sleep 1
for f in "$work/frames"/*; do
  [ "$(basename "$f")" = expected.json ] && continue
  mosquitto_pub -h 127.0.0.1 -p 1883 -u cam-1 -P "$OFFRAMP_PASSWORD_CAM_1" -q 1 \
    -t offramp/v1/ingest/cam-1 -f "$f" || fail "mosquitto_pub $f"
done
wait "$sub" || echo "test-deploy: mosquitto_sub ended before $total results" >&2
"$PY" tests/deploy/frames.py check "$work/frames" "$work/results.jsonl" || fail "results"

step "Prometheus: every target up, the results counted, every dashboard query answered"
"$PY" tests/deploy/prometheus_check.py http://127.0.0.1:9090 \
  compose/observability/grafana/dashboards/offramp.json cam-1 "$total" || fail "prometheus"

step "TLS listener on 8883 with the generated CA: a frame in, its result out"
tls=(-h localhost -p 8883 --cafile "$proj/compose/certs/ca.crt" -q 1)
"$PY" tests/deploy/frames.py one "$work/tls.msgpack" tls-0
mosquitto_sub "${tls[@]}" -u operator -P "$OFFRAMP_PASSWORD_OPERATOR" -t offramp/v1/results/cam-1 \
  -C 1 -W 30 >"$work/tls.json" &
sub=$!
sleep 1
mosquitto_pub "${tls[@]}" -u cam-1 -P "$OFFRAMP_PASSWORD_CAM_1" -t offramp/v1/ingest/cam-1 \
  -f "$work/tls.msgpack" \
  || fail "publishing over TLS"
wait "$sub" || fail "no result over TLS"
grep -q '"frame_id":"tls-0","status":"ok"' "$work/tls.json" \
  || fail "TLS result: $(cat "$work/tls.json")"

step "stop: every service must drain and exit 0 on SIGTERM"
(cd "$proj" && compose stop -t 30) >"$work/stop.log" 2>&1 || fail "podman-compose stop"
bad=""
for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
  code=$(podman inspect --format '{{.State.ExitCode}}' "$c")
  case "$c" in *broker*) ;; *) [ "$code" = 0 ] || bad="$bad $c=$code";; esac
done
[ -z "$bad" ] || fail "services did not exit 0:$bad"
(cd "$proj" && compose down -v -t 30) >"$work/down.log" 2>&1 || fail "podman-compose down"
left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
[ -z "$left" ] || fail "containers left after down: $left"

step "offramp testbed through podman's Docker-compatible API (tests/deploy/test_testbed.py)"
OFFRAMP_TEST_DEPLOY=1 "$PY" -m pytest -q -p no:cacheprovider tests/deploy \
  || fail "the testbed tests"
step "passed"
