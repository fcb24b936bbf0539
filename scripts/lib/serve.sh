# Sourced by the scripts that test a real server (openai_conformance.sh, api_fuzz.sh,
# browser_test.sh): start `afa serve` on a free local port with its database and data in a
# scratch folder, wait until /ready, and stop it with SIGTERM (a clean exit is part of the test).
#
#   resolve_afa_bin                                   # sets AFA_BIN (absolute path)
#   start_afa_serve BIN STATE_DIR [serve flags...]   # sets AFA_PID, AFA_ADDR, AFA_LOG
#   stop_afa_serve                                    # SIGTERM, then the exit status of serve

# The binary to test: $AFA_BIN when set (.ci/run sets it to the one `cargo test` just built, so
# nothing is compiled twice), else a fresh `cargo build` of the debug binary.
resolve_afa_bin() {
    if [ -z "${AFA_BIN:-}" ]; then
        cargo build --quiet
        AFA_BIN="${CARGO_TARGET_DIR:-target}/debug/afa"
    fi
    AFA_BIN=$(cd "$(dirname "$AFA_BIN")" && pwd)/$(basename "$AFA_BIN")
}

start_afa_serve() {
    local bin=$1 state=$2
    shift 2
    AFA_LOG="$state/serve.log"
    "$bin" serve --bind 127.0.0.1:0 --device cpu \
        --database-url "sqlite://$state/afa.db" --data-dir "$state/data" "$@" \
        </dev/null 2>"$AFA_LOG" &
    AFA_PID=$!
    AFA_ADDR=""
    for _ in $(seq 1 600); do
        AFA_ADDR=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$AFA_LOG" | head -n1)
        if [ -n "$AFA_ADDR" ] && curl -fsS "http://$AFA_ADDR/ready" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$AFA_PID" 2>/dev/null; then
            cat "$AFA_LOG"
            echo "afa serve exited early" >&2
            return 1
        fi
        sleep 0.2
    done
    cat "$AFA_LOG"
    echo "afa serve never got ready" >&2
    return 1
}

stop_afa_serve() {
    kill -TERM "$AFA_PID"
    wait "$AFA_PID"
}
