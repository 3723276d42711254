#!/bin/bash
# SDXL base's UNet (sdxl-random: the real config, random weights) at 512x512 (latent 64): ours
# and the PyTorch peer (../shared/peer) in one run, one after the other, one JSON line each.
#   scripts/bench-sdxl.sh [OUT.jsonl]
# PY names the peer's Python (default ../shared/peer/venv/bin/python); LATENT the latent side
# (default 64); STEPS the timed steps (default 2, after one warm-up); DTYPE=bf16 runs ours with
# bf16 products (what `--dtype auto` runs on a CPU with AVX512-BF16) and the peer under
# `torch.autocast("cpu", torch.bfloat16)` (default f32: both in f32).
# PAIRS=N: instead, our `atoms` training step and the peer's LoRA step in turn, N times (pairs
# less apart in time on a noisy machine), then each pair's ratios (scripts/pair-ratios.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-sdxl-bench.jsonl}
PY=${PY:-../shared/peer/venv/bin/python}
PEER=../shared/peer
L=${LATENT:-64}
S=${STEPS:-2}
case "${DTYPE:-f32}" in
  f32) export ATOMTUNE_CPU_BF16=0; AUTOCAST=() ;;
  bf16) export ATOMTUNE_CPU_BF16=1; AUTOCAST=(--autocast bf16) ;;
  *) echo "DTYPE must be f32 or bf16, not $DTYPE" >&2; exit 2 ;;
esac
: > "$OUT"
cargo build --release -p atomtune-models --bench sd15 >&2
ours() { cargo bench -q -p atomtune-models --bench sd15 -- --model sdxl-random --latent "$L" --steps "$S" "$@" 2>/dev/null | tail -1 | tee -a "$OUT"; }
peer_row() { "$PY" "$PEER/peer_train.py" --model sdxl-random --latent "$L" --steps "$S" --warmup 1 --threads 2 --no-vae --no-text --json "${AUTOCAST[@]}" "$@" 2>/dev/null | tail -1; }
peer_train() { peer_row "$@" | tee -a "$OUT"; }
if [ -n "${PAIRS:-}" ]; then
  for _ in $(seq "$PAIRS"); do
    ours --mode train --method atoms
    peer_row --mode lora-attn | sed 's/^/{"peer": true, "row": /; s/$/}/' | tee -a "$OUT"
  done
  python3 scripts/pair-ratios.py <"$OUT"
  exit 0
fi
# one classifier-free-guidance step: the UNet at batch 2
"$PY" "$PEER/peer_sample.py" --model sdxl-random --latent "$L" --steps "$S" --threads 2 --json "${AUTOCAST[@]}" 2>/dev/null | tail -1 | tee -a "$OUT"
ours --mode forward --batch 2
peer_train --mode lora-attn
peer_train --mode atoms
ours --mode train --method atoms
