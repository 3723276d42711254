#!/usr/bin/env bash
# The AMX tile path's first run on a CPU that has it (Sapphire Rapids or a later Xeon), in the
# order a session should take: the tests on the CPU's own tiles, the kernels' rates next to
# AVX512-BF16's, then SD 1.5's CFG and training steps on tiles against PyTorch's bf16 autocast
# (scripts/bench-bf16.sh's pairs, with ATOMTUNE_CPU_AMX=1 for ours). Stops at the first failure.
#
#   scripts/amx-check.sh            (PEER_PY, PEER_DIR, PAIRS as scripts/bench-bf16.sh takes them)
#
# Then: BENCHMARKS.md's bf16 section gets the rows (name the CPU: `lscpu`), and, if the tests and
# the pairs hold, ATOMTUNE_CPU_AMX's default can turn on (ops::cpu_bf16::amx's SWITCH).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! grep -q amx_bf16 /proc/cpuinfo; then
  echo "this CPU has no amx_bf16 (grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo): nothing to check" >&2
  exit 1
fi
lscpu | grep -E 'Model name|^CPU\(s\)'
export ATOMTUNE_CPU_AMX=1
# every bf16 test on the CPU's tiles (the *_tiled binaries stay on the emulation)
cargo test --workspace
# the tile kernel on one core, then products on packed operands on both kernels
cargo test --release -p atomtune-ops --lib amx_kernel_peak -- --ignored --nocapture
cargo test --release -p atomtune-ops --lib kernel_peak -- --ignored --nocapture
cargo test --release -p atomtune-ops --lib in_place_product -- --ignored --nocapture
# SD 1.5 at 512x512, ours on tiles against the peer's bf16 autocast, in turn
PAIRS=${PAIRS:-3} scripts/bench-bf16.sh 64 3
