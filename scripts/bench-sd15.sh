#!/usr/bin/env bash
# SD 1.5 at real size (random weights), ours next to the PyTorch peer, interleaved, one process
# per measurement (so peak RSS is per run). Prints one JSON line per run.
#
#   scripts/bench-sd15.sh [LATENT] [STEPS]        (defaults: 32 2)
#
# The peer needs a Python environment with torch and diffusers (see ../shared/peer/README.md);
# set PEER_PY to its python (default: ../peer-venv/bin/python) and PEER_DIR to the peer's folder
# (default: ../shared/peer).
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-32}
STEPS=${2:-2}
PEER_PY=${PEER_PY:-../peer-venv/bin/python}
PEER_DIR=${PEER_DIR:-../shared/peer}
cargo bench -q -p atomtune-models --bench sd15 --no-run 2>/dev/null
ours() { cargo bench -q -p atomtune-models --bench sd15 -- "$@" 2>/dev/null | tail -1; }
peer() { "$PEER_PY" "$PEER_DIR/$1" "${@:2}" 2>/dev/null | tail -1 | sed 's/^/{"peer": true, "row": /; s/$/}/'; }

# Forward, batch 1 (the peer side is our scripts/peer-forward.py on the peer's UNet config).
ours --mode forward --batch 1 --latent "$L" --steps "$STEPS"
PEER_DIR="$PEER_DIR" "$PEER_PY" scripts/peer-forward.py --latent "$L" --steps "$STEPS" 2>/dev/null | tail -1
# Forward, batch 2 (one classifier-free-guidance step of sampling).
ours --mode forward --batch 2 --latent "$L" --steps "$STEPS"
peer peer_sample.py --model sd15-random --latent "$L" --steps "$STEPS" --threads 2 --json
# Training steps, batch 1: atoms on every conv, LoRA rank 4 on the attention projections.
ours --mode train --method atoms --latent "$L" --steps "$STEPS"
peer peer_train.py --model sd15-random --mode atoms --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json
ours --mode train --method lora --latent "$L" --steps "$STEPS"
peer peer_train.py --model sd15-random --mode lora-attn --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json
# The memory lever: atoms with the selected blocks checkpointed (`--gradient-checkpointing`),
# then every resnet and transformer block (`--gradient-checkpointing=all`).
ours --mode train --method atoms --latent "$L" --steps "$STEPS" --checkpointing-selective
ours --mode train --method atoms --latent "$L" --steps "$STEPS" --checkpointing
peer peer_train.py --model sd15-random --mode atoms --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json --grad-ckpt
