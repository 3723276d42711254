#!/usr/bin/env bash
# One classifier-free-guidance denoising step (the UNet at batch 2) of SD 1.5 at real size with
# random weights, ours next to the PyTorch peer, interleaved, one process per run.
#
#   scripts/bench-sample.sh [LATENT] [STEPS] [ROUNDS]     (defaults: 64 2 2; 64 = 512x512 images)
#
# PEER_PY / PEER_DIR as in bench-sd15.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-64}
STEPS=${2:-2}
ROUNDS=${3:-2}
PEER_PY=${PEER_PY:-../peer-venv/bin/python}
PEER_DIR=${PEER_DIR:-../shared/peer}
cargo bench -q -p atomtune-models --bench sd15 --no-run 2>/dev/null
for _ in $(seq "$ROUNDS"); do
  cargo bench -q -p atomtune-models --bench sd15 -- --mode forward --batch 2 --latent "$L" --steps "$STEPS" 2>/dev/null | tail -1
  "$PEER_PY" "$PEER_DIR/peer_sample.py" --model sd15-random --latent "$L" --steps "$STEPS" --threads 2 --json 2>/dev/null \
    | tail -1 | sed 's/^/{"peer": true, "row": /; s/$/}/'
done
