#!/usr/bin/env bash
# Install voxtral-rtc (CPU, embedded engine: no torch, no download) and serve it.
#   bash scripts/serve.sh [PORT]      -> http://127.0.0.1:PORT (default 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-8080}"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/voxtral-rtc serve --config config.yaml --host 127.0.0.1 --port "$PORT"
