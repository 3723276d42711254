//! diffusers names to the original (LDM / A1111 / ComfyUI) checkpoint layout, component by
//! component, as diffusers' `from_single_file` converts them (in the other direction).

use crate::weights::Take;

/// The UNet's file prefix.
pub const UNET: &str = "model.diffusion_model.";
/// The VAE's file prefix.
pub const VAE: &str = "first_stage_model.";
/// SD 1.x's text encoder (transformers' layout inside).
pub const CLIP_SD1: &str = "cond_stage_model.transformer.";

/// A UNet's layout as the mapping needs it.
#[derive(Clone, Debug)]
pub struct UnetLayout {
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Per up block, whether it has attentions (its upsampler is then `.2`, else `.1`).
    pub up_cross_attn: Vec<bool>,
}

/// `a.b.rest` -> (`a`, `b` as a number, `rest`).
fn split_index<'a>(key: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(head)?.strip_prefix('.')?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// A resnet's diffusers sub-key in LDM's `ResBlock` names.
fn resnet(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let ldm = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{param}"))
}

/// The LDM key of a diffusers UNet key (both without prefix).
pub fn unet(key: &str, l: &UnetLayout) -> Option<String> {
    let per = l.layers_per_block + 1;
    let fixed = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (from, to) in fixed {
        if let Some(param) = key.strip_prefix(from) {
            return Some(format!("{to}{param}"));
        }
    }
    if let Some((b, rest)) = split_index(key, "down_blocks") {
        if let Some((i, r)) = split_index(rest, "resnets") {
            return Some(format!("input_blocks.{}.0.{}", 1 + b * per + i, resnet(r)?));
        }
        if let Some((i, r)) = split_index(rest, "attentions") {
            return Some(format!("input_blocks.{}.1.{r}", 1 + b * per + i));
        }
        let param = rest.strip_prefix("downsamplers.0.conv.")?;
        return Some(format!(
            "input_blocks.{}.0.op.{param}",
            1 + b * per + l.layers_per_block
        ));
    }
    if let Some(rest) = key.strip_prefix("mid_block.") {
        return match split_index(rest, "resnets") {
            Some((i @ (0 | 1), r)) => Some(format!("middle_block.{}.{}", 2 * i, resnet(r)?)),
            Some(_) => None,
            None => Some(format!(
                "middle_block.1.{}",
                rest.strip_prefix("attentions.0.")?
            )),
        };
    }
    let (b, rest) = split_index(key, "up_blocks")?;
    if let Some((i, r)) = split_index(rest, "resnets") {
        return Some(format!("output_blocks.{}.0.{}", b * per + i, resnet(r)?));
    }
    if let Some((i, r)) = split_index(rest, "attentions") {
        return Some(format!("output_blocks.{}.1.{r}", b * per + i));
    }
    let param = rest.strip_prefix("upsamplers.0.conv.")?;
    let slot = if *l.up_cross_attn.get(b)? { 2 } else { 1 };
    Some(format!(
        "output_blocks.{}.{slot}.conv.{param}",
        b * per + per - 1
    ))
}

/// A VAE resnet's or mid block's diffusers sub-key in LDM names.
fn vae_mid(rest: &str) -> Option<(String, Take)> {
    if let Some((i, r)) = split_index(rest, "resnets") {
        return Some((format!("block_{}.{}", i + 1, vae_resnet(r)), Take::Whole));
    }
    let r = rest.strip_prefix("attentions.0.")?;
    let (layer, param) = r.rsplit_once('.')?;
    let (ldm, take) = match layer {
        "group_norm" => ("norm", Take::Whole),
        "to_q" | "query" => ("q", Take::Squeeze),
        "to_k" | "key" => ("k", Take::Squeeze),
        "to_v" | "value" => ("v", Take::Squeeze),
        "to_out.0" | "proj_attn" => ("proj_out", Take::Squeeze),
        _ => return None,
    };
    Some((format!("attn_1.{ldm}.{param}"), take))
}

fn vae_resnet(rest: &str) -> String {
    rest.replacen("conv_shortcut", "nin_shortcut", 1)
}

/// The LDM key of a diffusers VAE key (both without prefix) of a VAE with `blocks` levels.
pub fn vae(key: &str, blocks: usize) -> Option<(String, Take)> {
    for (part, up) in [("encoder.", false), ("decoder.", true)] {
        let Some(rest) = key.strip_prefix(part) else {
            continue;
        };
        let same = |s: &str| Some((format!("{part}{s}"), Take::Whole));
        if let Some(p) = rest.strip_prefix("conv_norm_out.") {
            return same(&format!("norm_out.{p}"));
        }
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return same(rest);
        }
        if let Some(m) = rest.strip_prefix("mid_block.") {
            let (k, take) = vae_mid(m)?;
            return Some((format!("{part}mid.{k}"), take));
        }
        let head = if up { "up_blocks" } else { "down_blocks" };
        let (i, r) = split_index(rest, head)?;
        let level = if up { blocks.checked_sub(i + 1)? } else { i };
        let (ldm_head, sampler) = if up {
            ("up", "upsamplers.0.conv.")
        } else {
            ("down", "downsamplers.0.conv.")
        };
        if let Some((j, rr)) = split_index(r, "resnets") {
            return same(&format!("{ldm_head}.{level}.block.{j}.{}", vae_resnet(rr)));
        }
        let p = r.strip_prefix(sampler)?;
        let name = if up { "upsample" } else { "downsample" };
        return same(&format!("{ldm_head}.{level}.{name}.conv.{p}"));
    }
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some((key.to_string(), Take::Whole));
    }
    None
}

/// The OpenCLIP key (under `model.`) of a diffusers CLIP text key (SD 2.x's encoder, SDXL's
/// second), with q, k, v taken from the fused `in_proj` of width `hidden`.
pub fn open_clip(key: &str, hidden: usize) -> Option<(String, Take)> {
    let whole = |s: String| Some((s, Take::Whole));
    if key == "text_projection.weight" {
        return Some(("text_projection".into(), Take::Transpose));
    }
    let rest = key.strip_prefix("text_model.")?;
    match rest {
        "embeddings.token_embedding.weight" => return whole("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return whole("positional_embedding".into()),
        _ => {}
    }
    if let Some(p) = rest.strip_prefix("final_layer_norm.") {
        return whole(format!("ln_final.{p}"));
    }
    let (i, r) = split_index(rest, "encoder.layers")?;
    let block = format!("transformer.resblocks.{i}");
    let (layer, param) = r.rsplit_once('.')?;
    let qkv = |n: usize| {
        Some((
            format!("{block}.attn.in_proj_{param}"),
            Take::Rows(n * hidden, hidden),
        ))
    };
    match layer {
        "self_attn.q_proj" => qkv(0),
        "self_attn.k_proj" => qkv(1),
        "self_attn.v_proj" => qkv(2),
        "self_attn.out_proj" => whole(format!("{block}.attn.out_proj.{param}")),
        "layer_norm1" => whole(format!("{block}.ln_1.{param}")),
        "layer_norm2" => whole(format!("{block}.ln_2.{param}")),
        "mlp.fc1" => whole(format!("{block}.mlp.c_fc.{param}")),
        "mlp.fc2" => whole(format!("{block}.mlp.c_proj.{param}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UnetLayout {
        UnetLayout {
            layers_per_block: 2,
            up_cross_attn: vec![false, true, true, true],
        }
    }

    #[test]
    fn unet_names_follow_the_ldm_layout() {
        let l = sd15();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.conv2.weight",
                "input_blocks.2.0.out_layers.3.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.resnets.2.norm1.weight",
                "output_blocks.2.0.in_layers.0.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.norm.bias",
                "output_blocks.11.1.norm.bias",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
        ];
        for (d, want) in cases {
            assert_eq!(unet(d, &l).as_deref(), Some(want), "{d}");
        }
        assert_eq!(unet("mid_block.resnets.2.conv1.weight", &l), None);
    }

    #[test]
    fn vae_names_reverse_the_decoder_and_squeeze_attention() {
        assert_eq!(
            vae("decoder.up_blocks.0.resnets.1.conv1.weight", 4),
            Some(("decoder.up.3.block.1.conv1.weight".into(), Take::Whole))
        );
        assert_eq!(
            vae("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", 4),
            Some((
                "encoder.down.1.block.0.nin_shortcut.bias".into(),
                Take::Whole
            ))
        );
        assert_eq!(
            vae("encoder.mid_block.attentions.0.to_out.0.weight", 4),
            Some(("encoder.mid.attn_1.proj_out.weight".into(), Take::Squeeze))
        );
        assert_eq!(
            vae("decoder.mid_block.resnets.1.norm2.bias", 4),
            Some(("decoder.mid.block_2.norm2.bias".into(), Take::Whole))
        );
        assert_eq!(
            vae("decoder.conv_norm_out.weight", 4),
            Some(("decoder.norm_out.weight".into(), Take::Whole))
        );
    }

    #[test]
    fn open_clip_splits_the_fused_projection() {
        assert_eq!(
            open_clip("text_model.encoder.layers.3.self_attn.k_proj.weight", 1024),
            Some((
                "transformer.resblocks.3.attn.in_proj_weight".into(),
                Take::Rows(1024, 1024)
            ))
        );
        assert_eq!(
            open_clip("text_model.embeddings.position_embedding.weight", 1024),
            Some(("positional_embedding".into(), Take::Whole))
        );
    }
}
