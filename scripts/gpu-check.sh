#!/usr/bin/env bash
# The GPU check, for a CUDA machine without a network (an H100/H200 with driver 580 and
# PyTorch's cu13 libraries): the tiny-fixture parity of the CPU tests, on the GPU against the CPU
# and diffusers; SD 1.5 training steps (random weights, atoms on every conv) in f16 and bf16 at
# batch 1 and 2, with and without gradient checkpointing; a 30-step sampling run at 512x512.
# Prints one JSON line (seconds, peak GPU memory) and exits non-zero when the parity fails.
#
#   scripts/check-cuda.sh --bundle          # here: build and gather target/cuda/bundle (~30 MB)
#   scripts/gpu-check.sh [BUNDLE] [ARGS]    # there: BUNDLE defaults to target/cuda/bundle;
#                                           # ARGS go to gpu_check (e.g. --parts parity,train)
#
# GPU_CHECK_BIN and GPU_CHECK_DEVICE (default: the bundle's binary, cuda) let the script itself
# be tried on a CPU build: GPU_CHECK_BIN=target/release/examples/gpu_check GPU_CHECK_DEVICE=cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-target/cuda/bundle}
shift || true
if [ ! -d "$bundle" ]; then
  echo "gpu-check: no bundle at $bundle (make it with scripts/check-cuda.sh --bundle)" >&2
  exit 1
fi

# The CUDA 13 libraries the binary links: those of PyTorch's cu13 wheels on the machine.
sp=$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null || true)
if [ -n "$sp" ]; then
  export LD_LIBRARY_PATH="$sp/nvidia/cu13/lib:$sp/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

bin=${GPU_CHECK_BIN:-$bundle/gpu_check}
if [ ! -x "$bin" ]; then
  # carried xz-compressed (the stripped binary alone is over 64 MB, mostly PTX)
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bin.xz" "$bin"
  chmod +x "$bin"
fi

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
out=$("$bin" --fixture "$bundle/fixtures/tiny-sd-2block" --device "${GPU_CHECK_DEVICE:-cuda}" "$@")
python3 - "$gpu" "$out" <<'EOF'
import json, sys
gpu, out = sys.argv[1], json.loads(sys.argv[2])
out["gpu"] = gpu
print(json.dumps(out))
p = out.get("parity")
if p is not None:
    bad = [k for k, limit in [("unet_vs_cpu", 1e-4), ("unet_vs_diffusers", 1e-4),
                              ("loss_vs_cpu", 1e-5), ("loss_vs_diffusers", 1e-5),
                              ("grads_vs_cpu_max", 1e-3), ("grads_vs_diffusers_max", 1e-3),
                              ("image_vs_cpu_max_of_255", 2.0), ("image_vs_diffusers_max_of_255", 2.0)]
           if not p[k] <= limit]
    if bad:
        sys.exit("gpu-check: parity fails: " + ", ".join(f"{k}={p[k]}" for k in bad))
EOF
