#!/usr/bin/env bash
# Training steps on the tiny-sd15-shape fixture, ours next to the PyTorch peer, interleaved, one
# process per run. Ours caches latents and text embeddings (that is the design), so the peer runs
# with --no-vae --no-text too (the same work per step); its README figures include a VAE encode
# and a text-encoder pass per step.
#
#   scripts/bench-train.sh [ROUNDS]      (default 2)
#
# PEER_PY / PEER_DIR as in bench-sd15.sh; FIXTURES (default ../shared/fixtures), IMAGES (default
# ../shared/datasets/dreambooth/dog).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
PEER_PY=${PEER_PY:-../peer-venv/bin/python}
PEER_DIR=${PEER_DIR:-../shared/peer}
FIX=${FIXTURES:-../shared/fixtures}
IMAGES=${IMAGES:-../shared/datasets/dreambooth/dog}
cargo build -q --release -p atomtune-train --example step_bench 2>/dev/null
ours() { ./target/release/examples/step_bench "$FIX/tiny-sd15-shape" "$IMAGES" "$@"; }
peer() { "$PEER_PY" "$PEER_DIR/peer_train.py" --model "$FIX/tiny-sd15-shape" --threads 2 --json --no-vae --no-text "$@" 2>/dev/null | tail -1 | sed 's/^/{"peer": true, "row": /; s/$/}/'; }
for _ in $(seq "$ROUNDS"); do
  for L in 16 64; do
    S=20; [ "$L" = 64 ] && S=8
    ours atoms "$L" "$S"
    peer --mode atoms --latent "$L" --steps "$S"
    ours lora "$L" "$S"
    peer --mode lora-attn --latent "$L" --steps "$S"
  done
done
