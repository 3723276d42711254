#!/usr/bin/env bash
# SD 1.5 (random weights) with bf16 matrix products on the CPU (`--dtype bf16`,
# ATOMTUNE_CPU_BF16=1) next to our f32 and PyTorch's bf16 autocast, in one run, one process per
# measurement. Prints one JSON line per run.
#
#   scripts/bench-bf16.sh [LATENT] [STEPS]        (defaults: 64 2)
#   PAIRS=3 scripts/bench-bf16.sh                 (instead: ours in bf16 and the peer in bf16
#                                                  autocast in turn, 3 times, CFG step then
#                                                  training step: pairs less apart in time
#                                                  than the rows above, on a noisy machine)
#
# PEER_PY: the peer's python (default ../peer-venv/bin/python), PEER_DIR its folder.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-64}
STEPS=${2:-2}
PEER_PY=${PEER_PY:-../peer-venv/bin/python}
PEER_DIR=${PEER_DIR:-../shared/peer}
grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/{"cpu_flags": "/; s/ $/"}\n/'
cargo bench -q -p atomtune-models --bench sd15 --no-run 2>/dev/null
ours() { cargo bench -q -p atomtune-models --bench sd15 -- "$@" 2>/dev/null | tail -1; }
peer() { "$PEER_PY" "$PEER_DIR/$1" "${@:2}" 2>/dev/null | tail -1 | sed 's/^/{"peer": true, "row": /; s/$/}/'; }

if [ -n "${PAIRS:-}" ]; then
  ROWS=$(mktemp /tmp/atomtune-pairs.XXXXXX)
  for _ in $(seq "$PAIRS"); do
    ATOMTUNE_CPU_BF16=1 ours --mode forward --batch 2 --latent "$L" --steps "$STEPS"
    peer peer_sample.py --model sd15-random --latent "$L" --steps "$STEPS" --threads 2 --json --autocast bf16
  done | tee -a "$ROWS"
  for _ in $(seq "$PAIRS"); do
    ATOMTUNE_CPU_BF16=1 ours --mode train --method atoms --latent "$L" --steps "$STEPS"
    peer peer_train.py --model sd15-random --mode lora-attn --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json --autocast bf16
  done | tee -a "$ROWS"
  # each pair's ratios, ours over the peer's: medians, and fastest steps (noise only adds time)
  python3 scripts/pair-ratios.py <"$ROWS"
  rm -f "$ROWS"
  exit 0
fi

# One classifier-free-guidance step of sampling (UNet at batch 2).
ATOMTUNE_CPU_BF16=0 ours --mode forward --batch 2 --latent "$L" --steps "$STEPS"
ATOMTUNE_CPU_BF16=1 ours --mode forward --batch 2 --latent "$L" --steps "$STEPS"
peer peer_sample.py --model sd15-random --latent "$L" --steps "$STEPS" --threads 2 --json --autocast bf16
# Training steps, batch 1: atoms on every conv; the peer's LoRA (rank 4, attention) and atoms.
ATOMTUNE_CPU_BF16=0 ours --mode train --method atoms --latent "$L" --steps "$STEPS"
ATOMTUNE_CPU_BF16=1 ours --mode train --method atoms --latent "$L" --steps "$STEPS"
peer peer_train.py --model sd15-random --mode lora-attn --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json --autocast bf16
peer peer_train.py --model sd15-random --mode atoms --latent "$L" --steps "$STEPS" --warmup 1 --no-vae --no-text --threads 2 --json --autocast bf16
