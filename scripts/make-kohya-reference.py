"""Builds tests/data/kohya/: a kohya-format LoRA / LoCon file for the tiny-sd15-shape fixture
(linear and conv modules on the UNet, one on the text encoder, each with its own rank and
alpha) and what diffusers' `load_lora_weights` makes of it at weight 0.7: the UNet's output on
the fixture's reference inputs and the text encoder's last hidden state.

    ../peer-venv/bin/python scripts/make-kohya-reference.py   (torch, diffusers, peft)

The Rust test `sample/tests/kohya.rs` applies the same file with `--delta FILE:0.7` semantics and
compares.
"""
import pathlib

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

root = pathlib.Path(__file__).resolve().parent.parent
fx = root.parent / "shared" / "fixtures" / "tiny-sd15-shape"
out = root / "tests" / "data" / "kohya"
out.mkdir(parents=True, exist_ok=True)
gen = torch.Generator().manual_seed(0)


def rnd(*shape):
    return (torch.randn(*shape, generator=gen) * 0.1).float()


# module: (weight shape, rank, alpha)
modules = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((32, 32), 4, 2.0),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ((32, 128), 4, 4.0),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((32, 32, 1, 1), 2, 2.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((32, 32, 3, 3), 4, 1.0),
    "lora_unet_mid_block_resnets_0_conv2": ((64, 64, 3, 3), 8, 8.0),
    # diffusers recognises a kohya text-encoder LoRA by its attention's output module. Its
    # text-encoder path (diffusers 0.42) scales every module by the first module's alpha, so the
    # text encoder's modules share one alpha here (their ranks differ); the UNet's modules, which
    # it scales one by one, have their own.
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((32, 32), 4, 4.0),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": ((32, 32), 2, 4.0),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": ((32, 32), 8, 4.0),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": ((32, 32), 4, 4.0),
}
tensors = {}
for name, (shape, rank, alpha) in modules.items():
    co, ci = shape[0], shape[1]
    if len(shape) == 4:
        down, up = rnd(rank, ci, shape[2], shape[3]), rnd(co, rank, 1, 1)
    else:
        down, up = rnd(rank, ci), rnd(co, rank)
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.alpha"] = torch.tensor(alpha)
save_file(tensors, str(out / "lora.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})

ref = load_file(str(fx / "reference.safetensors"))
pipe = StableDiffusionPipeline.from_pretrained(str(fx), safety_checker=None, requires_safety_checker=False)
pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
pipe.fuse_lora(lora_scale=0.7)
with torch.no_grad():
    unet_out = pipe.unet(
        ref["unet.sample"], ref["unet.timestep"], encoder_hidden_states=ref["unet.encoder_hidden_states"]
    ).sample
    te_out = pipe.text_encoder(ref["text.input_ids"].long())[0]
save_file(
    {"unet.out": unet_out.contiguous(), "text.last_hidden_state": te_out.contiguous()},
    str(out / "reference.safetensors"),
    metadata={"weight": "0.7", "diffusers": __import__("diffusers").__version__},
)
print("wrote", out)
