"""Writes an SD 1.5-sized diffusers folder with random weights (the PyTorch peer's SD 1.5
configs; f32, 4.0 GB), with the CLIP tokenizer from assets/: a model of real size with files,
for measuring what needs files (`atomtune merge`), where `sd15-random` has none.

    ../peer-venv/bin/python scripts/make-random-sd15-folder.py OUT_DIR   (torch, diffusers)
"""
import importlib.util
import json
import os
import pathlib
import shutil
import sys

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

root = pathlib.Path(__file__).resolve().parent.parent
out = pathlib.Path(sys.argv[1])
sys.argv = sys.argv[:1]  # the peer module is imported for its configs, not run
spec = importlib.util.spec_from_file_location("peer", root.parent / "shared" / "peer" / "peer_train.py")
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)

torch.manual_seed(0)
UNet2DConditionModel(**peer.SD15_UNET).save_pretrained(out / "unet")
AutoencoderKL(**peer.SD15_VAE).save_pretrained(out / "vae")
CLIPTextModel(CLIPTextConfig(**peer.SD15_TEXT)).save_pretrained(out / "text_encoder")
DDIMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
).save_pretrained(out / "scheduler")
os.makedirs(out / "tokenizer", exist_ok=True)
for f in ["vocab.json", "merges.txt"]:
    shutil.copy(root / "assets" / "clip-tokenizer" / f, out / "tokenizer" / f)
index = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}
(out / "model_index.json").write_text(json.dumps(index))
print("wrote", out)
