#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine, and nothing twice:
# Debian packages when missing (through sudo when not root), then a venv in .venv with isocam
# and its Python dependencies from PyPI (again only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  mosquitto                       # the MQTT broker the demo and the tests start privately
  python3-gi gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly       # camera-sim's RTSP server (used from /usr/bin/python3)
  iproute2                        # network namespaces for the WS-Discovery tests
  ffmpeg                          # the baseline recorder in bench/
  postgresql                      # the hub's PostgreSQL tests start their own cluster (initdb)
  chromium chromium-driver        # headless browser tests of the hub's pages
)

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then missing+=(python3-venv); fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 - <<'PY' || { say "isocam needs Python 3.11 or newer as python3"; exit 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PY

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment in .venv"
  python3 -m venv .venv
fi
stamp=.venv/.isocam-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing isocam and its Python dependencies into .venv (from PyPI)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
