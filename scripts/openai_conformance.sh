#!/usr/bin/env bash
# Runs tests/openai_conformance.py (the official `openai` Python client, from a venv) against a
# fresh `afa serve` of models.toml on a free local port (the client names `tiny-afa`). Used by
# .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AFA_CONFORMANCE_VENV:-target/openai-venv}
# (Re)create the venv when missing or broken (a moved venv keeps stale absolute paths).
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openai

source scripts/lib/serve.sh
resolve_afa_bin
STATE=$(mktemp -d)
trap 'kill "${AFA_PID:-}" 2>/dev/null || true; rm -rf "$STATE"' EXIT
start_afa_serve "$AFA_BIN" "$STATE" --config models.toml


"$VENV/bin/python" tests/openai_conformance.py "http://$AFA_ADDR"

stop_afa_serve
echo "afa serve exited cleanly after SIGTERM"
