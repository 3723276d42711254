#!/usr/bin/env bash
# Where the time of an SD 1.5 step goes, by kind of work, from a perf profile of the sd15 bench.
# Needs `perf` (Debian: apt-get install linux-perf). perf attaches after the model build and the
# warm-up step (whose first-touch page faults would drown the rest), samples STEPS steps, and
# stops when they end.
#
#   scripts/profile.sh [MODE] [LATENT] [STEPS]   (defaults: train 64 2; MODE forward runs batch 2)
#   MODEL=sdxl-random scripts/profile.sh ...      (another preset's UNet; default sd15-random)
#   TOP=25 scripts/profile.sh ...                  (also the 25 symbols with the most samples)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-train}
L=${2:-64}
STEPS=${3:-2}
cargo bench -q -p atomtune-models --bench sd15 --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/sd15-* | grep -v '\.d$' | head -1)
ARGS=(--model "${MODEL:-sd15-random}" --mode "$MODE" --latent "$L" --steps "$STEPS")
[ "$MODE" = forward ] && ARGS+=(--batch 2)
[ "$MODE" = train ] && ARGS+=(--method atoms)
DATA=$(mktemp /tmp/atomtune-perf.XXXXXX)
LOG=$(mktemp /tmp/atomtune-bench.XXXXXX)
"$BIN" "${ARGS[@]}" >"$LOG.out" 2>"$LOG" &
PID=$!
until grep -q "warmed up" "$LOG" 2>/dev/null; do
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.2
done
# the window ends with the timed steps (the bench then writes a delta: not a step's work)
perf record -q -F 99 -p "$PID" -o "$DATA" >/dev/null 2>&1 &
PERF=$!
until grep -q "steps done" "$LOG" 2>/dev/null || ! kill -0 "$PID" 2>/dev/null; do
  sleep 0.2
done
kill -INT "$PERF" 2>/dev/null || true
wait "$PERF" || true
wait "$PID" || true
echo "run: $(cat "$LOG.out")"
# TOP=N: the N symbols with the most samples, before the buckets
if [ -n "${TOP:-}" ]; then
  perf report -i "$DATA" --no-children --sort symbol --stdio 2>/dev/null | grep -E "^\s+[0-9.]+%" | head -"$TOP" | cut -c1-120
fi
perf report -i "$DATA" --no-children --sort symbol --stdio 2>/dev/null | python3 -c '
import re, sys
buckets = [
    ("bf16 products: the micro-kernel (ours)", r"ops::cpu::bf16::kernel"),
    ("bf16 products: packing operands (ours)", r"ops::cpu::bf16::(pack|pairs16|tile_out|deal|pair_run)|ops::conv::packed::panel_pairs"),
    ("gemm crate (f32 convs, linears, attention products)", r"gemm"),
    ("attention softmax (ours)", r"ops::attention|ops::cpu::bf16::exp_(panels|cols)"),
    ("Winograd transforms of filters, patches and products (ours)", r"ops::conv::winograd"),
    ("conv columns (im2col, transform, col2im) and gemm packing (ours)", r"ops::(conv|cpu::matmul)"),
    ("group norm, layer norm, GEGLU (ours)", r"ops::(group_norm|layer_norm|geglu)"),
    ("gradient checkpointing copies (ours)", r"models::checkpoint|ops::handoff"),
    ("filter transform W\x27 (ours)", r"atoms::"),
    ("linear layers (ours, besides their gemm)", r"ops::linear"),
    ("memory copies and fills", r"__mem(move|set|cpy)|copy_strided|copy2d"),
    ("kernel: page faults, scheduling", r"^\[k\]"),
    ("candle elementwise and reductions (norms, activations, adds)", r"candle_core"),
    ("random weights (model build)", r"rand_chacha|rand::"),
]
tot = {}
for line in sys.stdin:
    m = re.match(r"\s+([0-9.]+)%\s+(\[[.k]\])\s+(.*)", line)
    if not m:
        continue
    pct, kind, sym = float(m.group(1)), m.group(2), m.group(3)
    key = "other (threads, libm, ...)"
    for name, pat in buckets:
        if re.search(pat, kind + " " + sym if pat.startswith("^") else sym):
            key = name
            break
    tot[key] = tot.get(key, 0) + pct
    if key.startswith("other") and pct >= 0.3:
        print(f"  other: {pct:5.1f}% {sym[:110]}", file=sys.stderr)
if "--top" in sys.argv:
    print("top symbols of other:", file=sys.stderr)
print("| kind of work | share of samples |")
print("|---|---|")
for k, v in sorted(tot.items(), key=lambda x: -x[1]):
    print(f"| {k} | {v:.1f}% |")
'
rm -f "$DATA" "$LOG" "$LOG.out"
