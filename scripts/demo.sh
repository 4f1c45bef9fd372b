#!/usr/bin/env bash
# The demo on one machine: installs what is missing, then runs broker, cameras and daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m devstack.demo "$@"
