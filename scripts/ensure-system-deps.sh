#!/usr/bin/env bash
# Install what offramp needs from the OS (Debian/Ubuntu): Mosquitto and its clients, the venv
# module for Python, and Fashion-MNIST (dataset-fashion-mnist, 30 MB, the benchmarks' data). With the argument `deploy`, also what `make test-deploy` needs: podman
# with runc, debootstrap and openssl; with `test`, what the tests add: an RTSP camera to read
# (GStreamer's RTSP server, driven from the system Python). Does nothing when they are present.
# Uses sudo when not root.
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then need+=(mosquitto); fi
if ! command -v mosquitto_pub >/dev/null 2>&1; then need+=(mosquitto-clients); fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=("${PYTHON}-venv"); fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then need+=(dataset-fashion-mnist); fi
if [ "${1:-}" = deploy ]; then
  for tool in podman runc debootstrap openssl; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then need+=("$tool"); fi
  done
fi
if [ "${1:-}" = test ] && ! /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' >/dev/null 2>&1; then
  need+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "offramp needs: ${need[*]}. Install them with your package manager and run make again." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "offramp needs: ${need[*]} (apt-get install -y ${need[*]}), and this user cannot sudo." >&2
    exit 1
  fi
fi
echo "installing system packages: ${need[*]}" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
