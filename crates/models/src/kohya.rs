//! Where the modules of kohya / LyCORIS adapter files land in our models: `lora_unet_<layer>`
//! with the UNet's diffusers names or the original LDM names (`lora_unet_input_blocks_1_1_proj_in`),
//! and `lora_te_<layer>` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL) with transformers'
//! text-encoder names, dots as underscores.

use std::collections::HashMap;

use crate::config::UpBlock;
use crate::single_file::keys;
use crate::{Layers, StableDiffusion};

/// A module's target: the model part's layer table and the layer's name in it.
pub type Target = (Layers, String);

fn underscored(prefix: &str, name: &str) -> String {
    format!("{prefix}_{}", name.replace('.', "_"))
}

/// Every kohya module name `sd` answers to, and where it lands.
pub fn module_targets(sd: &StableDiffusion) -> HashMap<String, Target> {
    let mut out = HashMap::new();
    let unet = sd.unet.layers();
    let c = sd.unet.config();
    let layout = keys::UnetLayout {
        layers_per_block: c.layers_per_block,
        up_cross_attn: c
            .up_blocks
            .iter()
            .map(|b| *b == UpBlock::CrossAttn)
            .collect(),
    };
    for layer in unet.names() {
        out.insert(
            underscored("lora_unet", &layer),
            (unet.clone(), layer.clone()),
        );
        if let Some(ldm) = keys::unet(&format!("{layer}.weight"), &layout) {
            let ldm = ldm.strip_suffix(".weight").unwrap_or(&ldm).to_string();
            out.insert(
                underscored("lora_unet", &ldm),
                (unet.clone(), layer.clone()),
            );
        }
    }
    let prefixes: Vec<&str> = if sd.text.is_dual() {
        vec!["lora_te1", "lora_te2"]
    } else {
        vec!["lora_te"]
    };
    for (enc, prefix) in sd.text.iter().zip(prefixes) {
        let layers = enc.model.layers();
        for layer in layers.names() {
            out.insert(underscored(prefix, &layer), (layers.clone(), layer));
        }
    }
    out
}
