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

ARTIFACTS=${ARTIFACTS:-/tmp/afa-browser-artifacts}
rm -rf "$ARTIFACTS" && mkdir -p "$ARTIFACTS"
export ARTIFACTS
source scripts/lib/serve.sh
resolve_afa_bin
STATE=$(mktemp -d)
KEY="afa-browser-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
# The server log is a test artifact too, whatever the outcome.
trap 'kill "${AFA_PID:-}" 2>/dev/null || true; cp "$STATE/serve.log" "$ARTIFACTS/afa-serve.log" 2>/dev/null; rm -rf "$STATE"' EXIT
start_afa_serve "$AFA_BIN" "$STATE" --config models.toml --api-key "$KEY"


AFA_URL="http://$AFA_ADDR" AFA_TEST_KEY="$KEY" node --test --test-reporter=spec tests/browser/playground.test.mjs

stop_afa_serve
echo "afa serve exited cleanly after SIGTERM; screenshots in $ARTIFACTS; $(( $(date +%s) - START )) s in all"
