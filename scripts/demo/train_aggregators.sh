#!/usr/bin/env bash
# Trains the demonstration ensemble's SABW aggregators with `afa train` over the two members in
# assets/demo (frozen), on renders of the demo world, and installs the result as
# assets/demo/aggregators.safetensors. Resumable: rerunning continues the run in $RUN.
#   scripts/demo/train_aggregators.sh            # defaults below; see docs/demo.md
# Needs: cargo build --release. Data: `afa demo render` (made here when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
AFA=${AFA:-target/release/afa}
DATA=${DATA:-/work/demo-data/train}
RUN=${RUN:-/work/demo-aggregators}
STEPS=${STEPS:-600}
if [ ! -f "$DATA/metadata.jsonl" ]; then
    "$AFA" demo render --out "$DATA" --per-combo 100 --seed 1
fi
mkdir -p "$RUN"
# The members alone (no aggregators yet), as a registry of their own.
cat > "$RUN/members.toml" <<TOML
default_ensemble = "shapes"
[[members]]
name = "circles-squares"
path = "$PWD/assets/demo/member-a"
[[members]]
name = "triangles-squares"
path = "$PWD/assets/demo/member-b"
[[ensembles]]
name = "shapes"
members = ["circles-squares", "triangles-squares"]
allowed_sizes = ["64x64"]
defaults = { steps = 20, width = 64, height = 64, scheduler = "ddim", guidance_scale = 7.5 }
TOML
RESUME=()
if [ -f "$RUN/out/log.jsonl" ]; then RESUME=(--resume); fi
"$AFA" train --config "$RUN/members.toml" --ensemble shapes --data "$DATA" --out "$RUN/out" \
    --resolution 64 --batch-size "${BATCH:-8}" --max-steps "$STEPS" --lr 1e-3 --seed 7 \
    --hidden-size 8 --num-layers 1 --heads 2 --norm-groups 4 \
    --val-images 120 --val-every 100 --save-every 100 --cache-latents --quiet "${RESUME[@]}"
cp "$RUN/out/aggregators.safetensors" assets/demo/aggregators.safetensors
chmod 644 assets/demo/aggregators.safetensors
echo "installed assets/demo/aggregators.safetensors ($(stat -c %s assets/demo/aggregators.safetensors) bytes)"
