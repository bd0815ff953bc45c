#!/usr/bin/env bash
# Create the client framework virtualenvs that tests/integration/test_realtime_clients.py
# runs its drivers with: .venvs/openai, .venvs/livekit, .venvs/pipecat, each from the pinned
# tests/clients/requirements-<name>.txt. Kept apart from .venv: these are the real client
# packages, with their own (conflicting) pins, and the project never imports them.
#   bash scripts/client_venvs.sh [name ...]     (default: all three)
# Idempotent: a venv whose stamp matches its requirements file (and the python) is kept;
# any other is rebuilt from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(openai livekit pipecat)

for name in "${names[@]}"; do
  req="tests/clients/requirements-${name}.txt"
  dir=".venvs/${name}"
  stamp="${dir}/.requirements.sha256"
  [ -f "$req" ] || { echo "client_venvs: no $req" >&2; exit 1; }
  want="$(sha256sum "$req" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  if [ -x "${dir}/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    continue
  fi
  echo "client_venvs: building ${dir} from ${req}"
  start=$SECONDS
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "${dir}/bin/python" -m pip install -q --upgrade pip
  "${dir}/bin/python" -m pip install -q -r "$req"
  # The drivers must not see torch: a dependency that pulled it in is a pin to fix.
  if "${dir}/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    echo "client_venvs: ${dir} has torch installed; fix ${req}" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
  echo "client_venvs: ${dir} ready in $((SECONDS - start)) s"
done
