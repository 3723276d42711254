#!/usr/bin/env bash
# What the atoms adapter costs in an SD 1.5 training step (random weights): the step with atoms on
# all 98 convs against the same step without adapters whose backward still runs through every
# layer (the loss differentiated with respect to the noisy latent), interleaved, one process per
# run. Prints one JSON line per run.
#
#   scripts/bench-adapter-cost.sh [LATENT] [STEPS] [ROUNDS]     (defaults: 64 3 2)
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-64}
STEPS=${2:-3}
ROUNDS=${3:-2}
cargo bench -q -p atomtune-models --bench sd15 --no-run 2>/dev/null
ours() { cargo bench -q -p atomtune-models --bench sd15 -- "$@" 2>/dev/null | tail -1; }
for _ in $(seq "$ROUNDS"); do
  ours --mode train --method atoms --latent "$L" --steps "$STEPS"
  ours --mode input-grad --latent "$L" --steps "$STEPS"
done
