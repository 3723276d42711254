#!/usr/bin/env bash
# Merges a kohya LoRA on UNet and text-encoder layers into each family's tiny fixture (SD 1.x,
# an SD 2.x kind made from it with OpenCLIP's GELU, SDXL) as a single file and as a folder, and
# has diffusers' own single-file converters read each single file to the folder's weights
# (scripts/check-single-file-layout.py). Needs ../shared/fixtures and a Python with torch and
# diffusers (PY, default ../peer-venv/bin/python).
#
#   scripts/check-merge-layouts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-../peer-venv/bin/python}
FX=${ATOMTUNE_SHARED:-../shared}/fixtures
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q -p atomtune-cli
bin=target/release/atomtune

cp -r "$FX/tiny-sd15-shape" "$tmp/sd2-model"
sed -i 's/"quick_gelu"/"gelu"/' "$tmp/sd2-model/text_encoder/config.json"

"$PY" - "$tmp" <<'PYEOF'
import sys
import torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
u = lambda *s: torch.rand(*s, generator=g) - 0.5
def lora(module, out, inp):
    return {f"{module}.lora_down.weight": u(2, inp), f"{module}.lora_up.weight": u(out, 2)}
unet = lora("lora_unet_conv_in", 32, 36) | lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 64, 32)
te = lambda p: lora(f"{p}_text_model_encoder_layers_1_self_attn_k_proj", 32, 32) | lora(f"{p}_text_model_encoder_layers_0_mlp_fc1", 37, 32)
save_file(unet | te("lora_te"), f"{sys.argv[1]}/sd-lora.safetensors")
save_file(lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)
          | lora("lora_te2_text_model_encoder_layers_2_self_attn_v_proj", 32, 32)
          | lora("lora_te2_text_model_encoder_layers_1_mlp_fc2", 32, 64), f"{sys.argv[1]}/xl-lora.safetensors")
PYEOF

export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
status=0
for case in "sd1:$FX/tiny-sd15-shape:sd-lora" "sd2:$tmp/sd2-model:sd-lora" "sdxl:$FX/tiny-sdxl-shape:xl-lora"; do
  IFS=: read -r name model lora <<< "$case"
  for out in "$tmp/$name.safetensors" "$tmp/$name"; do
    "$bin" merge --model "$model" --delta "$tmp/$lora.safetensors" --dtype f32 --out "$out" > /dev/null
  done
  echo "== $name"
  "$PY" scripts/check-single-file-layout.py "$tmp/$name.safetensors" "$tmp/$name" || status=1
done
exit $status
