#!/usr/bin/env bash
# Runs the playground's browser test (tests/browser/playground.test.mjs: Debian's chromium driven
# by playwright-core, never a downloaded browser) against a fresh `afa serve` of the committed
# models.toml on a free local port, behind a random API key, with a temporary database and data
# dir. Installs what is missing: chromium (apt), node/npm (apt), playwright-core (npm ci).
# Screenshots go to $ARTIFACTS (default /tmp/afa-browser-artifacts). Used by .ci/run.
# AFA_BIN=path uses that binary instead of building the debug one.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x /usr/bin/chromium ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ ! -d tests/browser/node_modules/playwright-core ] \
    || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

if [ -z "${AFA_BIN:-}" ]; then
    cargo build --quiet
    AFA_BIN="${CARGO_TARGET_DIR:-target}/debug/afa"
fi

ARTIFACTS=${ARTIFACTS:-/tmp/afa-browser-artifacts}
rm -rf "$ARTIFACTS" && mkdir -p "$ARTIFACTS"
export ARTIFACTS
LOG="$ARTIFACTS/afa-serve.log"
STATE=$(mktemp -d)
KEY="afa-browser-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
"$AFA_BIN" serve --config models.toml --bind 127.0.0.1:0 --device cpu --api-key "$KEY" \
    --database-url "sqlite://$STATE/afa.db" --data-dir "$STATE/data" 2>"$LOG" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$STATE"' EXIT

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

AFA_URL="http://$ADDR" AFA_TEST_KEY="$KEY" node --test --test-reporter=spec tests/browser/playground.test.mjs

kill -TERM "$PID"
wait "$PID"
echo "afa serve exited cleanly after SIGTERM; screenshots in $ARTIFACTS; $(( $(date +%s) - START )) s in all"
