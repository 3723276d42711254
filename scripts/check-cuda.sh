#!/usr/bin/env bash
# Builds atomtune with `--features cuda` on a machine without a GPU, with the CUDA 13.0 toolkit
# from PyPI (the recipe of ../shared/cuda/README.md), and the GPU check program beside it.
# A failing build fails the script.
#
#   scripts/check-cuda.sh            # build into target/cuda (cold: ~20 min on 2 cores, mostly nvcc)
#   scripts/check-cuda.sh --bundle   # and gather what scripts/gpu-check.sh reads in target/cuda/bundle
#                                    # (the gpu_check binary xz-compressed, the tiny-sd-2block fixture)
#
# Environment: CUDA_KIT (default /tmp/cuda-kit) holds the toolkit; SHARED (default ../shared)
# holds cuda/setup_cuda.sh and cuda/env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
kit=${CUDA_KIT:-/tmp/cuda-kit}
if [ ! -f "$shared/cuda/env.sh" ]; then
  echo "check-cuda: $shared/cuda/env.sh not found (set SHARED to the folder holding cuda/)" >&2
  exit 1
fi

cargo fetch --quiet   # cudarc's sources, which setup_cuda.sh reads its driver symbols from
if [ ! -x "$kit/cuda/nvidia/cu13/bin/nvcc" ]; then
  CUDA_KIT=$kit bash "$shared/cuda/setup_cuda.sh"
fi
# shellcheck disable=SC1091
CUDA_KIT=$kit . "$shared/cuda/env.sh"
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

target=target/cuda
# one invocation: two would resolve features differently and build candle's kernels twice
cargo build --release --features cuda --target-dir "$target" \
  -p atomtune-cli -p atomtune-train --bin atomtune --example gpu_check
echo "check-cuda: built $target/release/atomtune and $target/release/examples/gpu_check"

if [ "${1:-}" = "--bundle" ]; then
  bundle=$target/bundle
  rm -rf "$bundle" && mkdir -p "$bundle/fixtures/tiny-sd-2block"
  strip -o "$bundle/gpu_check.stripped" "$target/release/examples/gpu_check"
  xz -T0 -6 -c "$bundle/gpu_check.stripped" >"$bundle/gpu_check.xz"
  rm "$bundle/gpu_check.stripped"
  fx=$shared/fixtures/tiny-sd-2block
  for part in model_index.json reference.safetensors scheduler text_encoder tokenizer unet vae; do
    cp -r "$fx/$part" "$bundle/fixtures/tiny-sd-2block/"
  done
  du -sh "$bundle"
fi
