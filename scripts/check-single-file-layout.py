"""Reads a single-file checkpoint written by `atomtune merge ... --out FILE.safetensors` with
diffusers' own single-file converters and compares every weight with the diffusers folder
`atomtune merge` wrote from the same model and deltas (`--out DIR`): the layout A1111, ComfyUI
and diffusers' `from_single_file` read (SD 1.x `cond_stage_model.transformer.*`, SD 2.x
`cond_stage_model.model.*`, SDXL `conditioner.embedders.{0,1}.*`, with OpenCLIP's fused q, k, v).

    ../peer-venv/bin/python scripts/check-single-file-layout.py MERGED.safetensors MERGED_DIR

(The converters are called directly: `from_single_file` picks the text encoder by width, which
tiny fixtures whose two encoders have the same width defeat.) Prints, per component, the keys
missing on either side and the largest difference; exits 1 unless every weight is equal.
"""
import sys

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file

single, folder = sys.argv[1], sys.argv[2]
ck = load_file(single)
pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
converted = {
    "unet": sfu.convert_ldm_unet_checkpoint(ck, dict(pipe.unet.config)),
    "vae": sfu.convert_ldm_vae_checkpoint(ck, dict(pipe.vae.config)),
}
if getattr(pipe, "text_encoder_2", None) is not None:
    converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ck)
    converted["text_encoder_2"] = sfu.convert_open_clip_checkpoint(
        pipe.text_encoder_2, ck, prefix="conditioner.embedders.1.model."
    )
elif sfu.is_open_clip_model(ck):
    converted["text_encoder"] = sfu.convert_open_clip_checkpoint(
        pipe.text_encoder, ck, prefix="cond_stage_model.model."
    )
else:
    converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ck)
ok = True
for name, conv in converted.items():
    model = getattr(pipe, name)
    sd = model.state_dict()
    if not hasattr(model, "text_model") and name.startswith("text_encoder"):
        # transformers >= 5.6 flattens CLIPTextModel
        conv = {k.removeprefix("text_model."): v for k, v in conv.items()}
    missing, extra = sorted(set(sd) - set(conv)), sorted(set(conv) - set(sd))
    worst = max((conv[k].float() - sd[k].float()).abs().max().item() for k in sd if k in conv)
    print(f"{name}: {len(sd)} weights, missing {missing[:3]}, extra {extra[:3]}, largest difference {worst}")
    ok &= not missing and not extra and worst == 0.0
sys.exit(0 if ok else 1)
