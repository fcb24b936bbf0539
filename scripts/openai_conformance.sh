#!/usr/bin/env bash
# Runs tests/openai_conformance.py (the official `openai` Python client, from a venv) against a
# fresh `afa serve` of the committed tiny ensemble on a free local port. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AFA_CONFORMANCE_VENV:-target/openai-venv}
# (Re)create the venv when missing or broken (a moved venv keeps stale absolute paths).
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openai

cargo build --quiet
LOG=$(mktemp)
STATE=$(mktemp -d)
./target/debug/afa serve --config models.toml --bind 127.0.0.1:0 --device cpu \
    --database-url "sqlite://$STATE/afa.db" --data-dir "$STATE/data" 2>"$LOG" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$LOG" "$STATE"' EXIT

ADDR=""
for _ in $(seq 1 600); do
    ADDR=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$LOG" | head -n1)
    if [ -n "$ADDR" ] && curl -fsS "http://$ADDR/ready" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "afa serve exited early" >&2; exit 1; }
    sleep 0.2
done
curl -fsS "http://$ADDR/ready" >/dev/null || { cat "$LOG"; echo "afa serve never got ready" >&2; exit 1; }

"$VENV/bin/python" tests/openai_conformance.py "http://$ADDR"

kill -TERM "$PID"
wait "$PID"
echo "afa serve exited cleanly after SIGTERM"
