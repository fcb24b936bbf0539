#!/usr/bin/env bash
# Property-based fuzzing of the HTTP API from its own OpenAPI document: schemathesis (pinned in
# scripts/fuzz/requirements.txt, in a venv) against a fresh debug `afa serve` of models.toml's
# default ensemble on a free local port, with a temporary job store. Used by .ci/run.
#
# Every operation of /openapi.json is exercised (examples, coverage, fuzzing and stateful
# phases; the stateful phase follows the links schemathesis infers, e.g. POST /v1/jobs ->
# GET/DELETE /v1/jobs/{id}), at most $AFA_FUZZ_EXAMPLES cases per operation and phase, with
# these checks on every response: no 5xx (not_a_server_error), a documented status
# (status_code_conformance), a documented content type (content_type_conformance), the body
# (each event, for event streams) valid against the schema (response_schema_conformance), and
# the documented headers (response_headers_conformance); each request must answer within
# --request-timeout (no hang). Afterwards /ready must still be 200 and a normal generation must
# still succeed. Nothing is excluded. Valid but expensive values are shrunk to cheap valid ones
# just before sending (scripts/fuzz/hooks.py), so most of the time goes to validation paths.
#
# Measured on the 2-core machine (shared with other work), with the debug binary built (as after
# `cargo test`) and the venv in place: 1833 cases, schemathesis 71 s, the whole script 76 s
# (a first run adds the pip install, about a minute). The hard limit on the schemathesis run is
# $AFA_FUZZ_TIME_LIMIT_S (default 420 s). schemathesis lists 18 of the document's 19
# operations: it does not fuzz GET /openapi.json, the document it was loaded from (which this
# run fetched, and `cargo test --lib apidoc` checks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TARGET=${CARGO_TARGET_DIR:-target}
VENV=${AFA_FUZZ_VENV:-$TARGET/fuzz-venv}
mkdir -p "$(dirname "$VENV")"
VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
# (Re)create the venv when missing or broken (a moved venv keeps stale absolute paths).
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$VENV"
fi
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r scripts/fuzz/requirements.txt; then
    python3 -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r scripts/fuzz/requirements.txt
fi

EXAMPLES=${AFA_FUZZ_EXAMPLES:-30}
LIMIT=${AFA_FUZZ_TIME_LIMIT_S:-420}
START=$(date +%s)

source scripts/lib/serve.sh
resolve_afa_bin
STATE=$(mktemp -d)
trap 'kill "${AFA_PID:-}" 2>/dev/null || true; rm -rf "$STATE"' EXIT
start_afa_serve "$AFA_BIN" "$STATE" --config models.toml
ADDR=$AFA_ADDR
LOG=$AFA_LOG


# Run from the temporary dir so schemathesis' caches and reports stay out of the tree.
STATUS=0
(
    cd "$STATE"
    PYTHONPATH="$ROOT/scripts/fuzz" SCHEMATHESIS_HOOKS=hooks timeout "$LIMIT" \
        "$VENV/bin/schemathesis" run "http://$ADDR/openapi.json" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
        --max-examples "$EXAMPLES" --request-timeout 60 --workers 2 --no-color \
        --seed "${AFA_FUZZ_SEED:-20260901}" </dev/null
) || STATUS=$?
if [ "$STATUS" -ne 0 ]; then
    [ "$STATUS" -eq 124 ] && echo "schemathesis ran past ${LIMIT}s" >&2
    tail -n 50 "$LOG"
    echo "API fuzzing failed (exit $STATUS)" >&2
    exit 1
fi

# The server survived: still ready, still generates.
curl -fsS "http://$ADDR/ready" >/dev/null || { tail -n 50 "$LOG"; echo "not ready after fuzzing" >&2; exit 1; }
SEED=$(curl -fsS "http://$ADDR/generate" -H 'content-type: application/json' \
    -d '{"prompt": "a lighthouse at dusk", "steps": 2, "seed": 7}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["seeds"][0])')
[ "$SEED" = 7 ] || { echo "generation after fuzzing answered seed '$SEED'" >&2; exit 1; }

stop_afa_serve
echo "API fuzzing passed; afa serve still ready and generating, exited cleanly ($(( $(date +%s) - START ))s)"
