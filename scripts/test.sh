#!/usr/bin/env bash
# Install everything the tests need on a bare machine, then run lint, types and all tests.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# System packages: Debian chromium (browser test) and espeak-ng (generated speech).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch pinned first: 2.13.0 is a CPU wheel here; an unpinned torch would pull CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,voxtral]"
# The real client packages (openai, LiveKit, Pipecat), one venv each under .venvs/, for
# tests/integration/test_realtime_clients.py.
bash scripts/client_venvs.sh
# onnxruntime (Silero, here and in the Pipecat venv) sends telemetry unless told not to; the
# agent package sets this too, the export covers the client venvs' own processes.
export ORT_DISABLE_TELEMETRY=1

.venv/bin/ruff check agent signaling tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
