#!/usr/bin/env bash
# Install everything the tests need on a bare machine, then run lint, types and all tests.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# System packages: Debian chromium (browser test), espeak-ng (generated speech), and for the
# NAT test (tests/integration/test_nat.py, as root) coturn, nftables and iproute2 (ip, ss).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
  if [[ " ${need[*]} " == *" coturn "* ]] && command -v systemctl >/dev/null 2>&1; then
    # The tests start their own coturn inside a network namespace; the package's service
    # (where systemd started it) would be a TURN server on this machine's real interfaces.
    $SUDO systemctl disable --now coturn >/dev/null 2>&1 || true
  fi
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

.venv/bin/ruff check agent signaling voxtral_rtc_client tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
