#!/usr/bin/env bash
# Installs moto's S3-compatible server (PyPI `moto[server]`) into target/moto-venv for the tests
# that need a bucket (tests/s3_support finds target/moto-venv/bin/moto_server, or
# $AFA_MOTO_SERVER). Idempotent; used by .ci/run before `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AFA_MOTO_VENV:-target/moto-venv}
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$VENV"
fi
if [ ! -x "$VENV/bin/moto_server" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi
"$VENV/bin/moto_server" --help >/dev/null
echo "moto_server ready: $VENV/bin/moto_server"
