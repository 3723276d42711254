//! Model configs, read from the diffusers / transformers `config.json` files.
//!
//! Nothing about an architecture is hard-coded: block types, widths, heads, projections all come
//! from the file. Keys a model does not know are ignored (as diffusers' `from_config` does); keys
//! we know but whose value selects an option we do not implement are an error that names the key,
//! so an unsupported checkpoint fails at load instead of giving wrong images.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// A parsed JSON config with typed getters whose errors name the file and key.
pub(crate) struct Json {
    path: PathBuf,
    map: Map<String, Value>,
}

impl Json {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        match v {
            Value::Object(map) => Ok(Json {
                path: path.into(),
                map,
            }),
            _ => Err(Error::Config {
                path: path.into(),
                reason: "not a JSON object".into(),
            }),
        }
    }

    fn bad(&self, key: &str, want: &str) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: format!(
                "`{key}` should be {want}, found {}",
                self.map.get(key).unwrap_or(&Value::Null)
            ),
        }
    }

    /// The value of `key`, `None` if absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(String::from)
                .ok_or_else(|| self.bad(key, "a string")),
        }
    }

    pub(crate) fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.bad(key, "a list of integers"))
    }

    pub(crate) fn str_list(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.bad(key, "a list of strings"))
    }

    /// An integer, or one integer per block: always returned as `n` values.
    pub(crate) fn per_block(&self, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(vec![default; n]),
            Some(Value::Number(x)) => {
                let x = x
                    .as_u64()
                    .ok_or_else(|| self.bad(key, "a positive integer"))?
                    as usize;
                Ok(vec![x; n])
            }
            Some(_) => {
                let v = self.usize_list(key)?;
                if v.len() != n {
                    return Err(self.bad(key, &format!("an integer or a list of {n}")));
                }
                Ok(v)
            }
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: format!("`{key}` is missing"),
        }
    }

    /// Errors unless `key` is absent, null, or one of `allowed`: options we do not implement.
    pub(crate) fn only(&self, key: &str, allowed: &[Value], hint: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if allowed.contains(v) => Ok(()),
            Some(v) => Err(Error::Unsupported {
                path: self.path.clone(),
                key: key.into(),
                value: v.to_string(),
                hint: hint.into(),
            }),
        }
    }

    pub(crate) fn unsupported(&self, key: &str, value: &str, hint: &str) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            key: key.into(),
            value: value.into(),
            hint: hint.into(),
        }
    }

    /// The class of a pipeline component in `model_index.json` (`"unet": ["diffusers", "UNet2DConditionModel"]`).
    pub(crate) fn component_class(&self, key: &str) -> Option<String> {
        self.get(key)?
            .as_array()?
            .get(1)?
            .as_str()
            .map(String::from)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A down block type of the UNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownBlock {
    /// `CrossAttnDownBlock2D`: resnets with transformers.
    CrossAttn,
    /// `DownBlock2D`: resnets only.
    Plain,
}

/// An up block type of the UNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBlock {
    /// `CrossAttnUpBlock2D`.
    CrossAttn,
    /// `UpBlock2D`.
    Plain,
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`): the pooled text embedding and
/// the six size/crop "time ids", each through a sinusoidal projection, concatenated and mapped by
/// `add_embedding` onto the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// Width of each time id's sinusoidal projection (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// Input width of `add_embedding` (`projection_class_embeddings_input_dim`): six time ids'
    /// projections plus the pooled text embedding.
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// The number of time ids: original size, crop top-left, target size (each height, width).
    pub const TIME_IDS: usize = 6;

    /// The width of the pooled text embedding this UNet takes.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - Self::TIME_IDS * self.time_embed_dim
    }
}

/// `unet/config.json` of a `UNet2DConditionModel` (SD 1.x / 2.x / XL family).
#[derive(Clone, Debug, PartialEq)]
pub struct UnetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// `2 * x - 1` on the input first.
    pub center_input_sample: bool,
    /// Sinusoidal embedding order: `cos, sin` when true.
    pub flip_sin_to_cos: bool,
    /// Shift of the sinusoidal frequencies.
    pub freq_shift: f64,
    /// Down block types.
    pub down_blocks: Vec<DownBlock>,
    /// Up block types.
    pub up_blocks: Vec<UpBlock>,
    /// Widths of the blocks.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Padding of the downsampler convs.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Epsilon of the resnet and output group norms.
    pub norm_eps: f64,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
    /// Transformer blocks per transformer, per down block (up blocks mirror them; the mid block
    /// takes the last).
    pub transformer_layers_per_block: Vec<usize>,
    /// SDXL's added text/time conditioning; `None` for SD 1.x/2.x.
    pub addition: Option<TextTimeConfig>,
    /// Attention heads per down block (diffusers' `attention_head_dim`, which in these UNets is
    /// the number of heads; or `num_attention_heads` when given).
    pub heads: Vec<usize>,
    /// Linear `proj_in`/`proj_out` (SD 2.x) instead of 1x1 convs.
    pub use_linear_projection: bool,
    /// Attention scores in f32 (SD 2.x at 768). Always so here: attention computes in f32 for
    /// half-precision models ([`crate::nn::attention`]) and in the model's dtype otherwise.
    pub upcast_attention: bool,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// The sample size the model was trained at (latent side), if known.
    pub sample_size: Option<usize>,
}

impl UnetConfig {
    /// Reads `unet/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&Json::read(path)?)
    }

    /// Parses a config's text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        Self::from_json(&Json::parse(path, text)?)
    }

    fn from_json(j: &Json) -> Result<Self> {
        let block_out_channels = j.usize_list("block_out_channels")?;
        let n = block_out_channels.len();
        let down_blocks = j
            .str_list("down_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlock::CrossAttn),
                "DownBlock2D" => Ok(DownBlock::Plain),
                other => Err(j.unsupported(
                    "down_block_types",
                    other,
                    "CrossAttnDownBlock2D or DownBlock2D",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = j
            .str_list("up_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlock::CrossAttn),
                "UpBlock2D" => Ok(UpBlock::Plain),
                other => {
                    Err(j.unsupported("up_block_types", other, "CrossAttnUpBlock2D or UpBlock2D"))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if down_blocks.len() != n || up_blocks.len() != n || n == 0 {
            return Err(Error::Config {
                path: j.path().into(),
                reason: format!(
                    "{} down and {} up block types for {n} block widths",
                    down_blocks.len(),
                    up_blocks.len()
                ),
            });
        }
        let s = |x: &str| Value::String(x.into());
        j.only(
            "mid_block_type",
            &[s("UNetMidBlock2DCrossAttn")],
            "UNetMidBlock2DCrossAttn",
        )?;
        j.only("act_fn", &[s("silu")], "silu")?;
        j.only("resnet_time_scale_shift", &[s("default")], "default")?;
        j.only("time_embedding_type", &[s("positional")], "positional")?;
        j.only("attention_type", &[s("default")], "default")?;
        j.only(
            "addition_embed_type",
            &[s("text_time")],
            "text_time (SDXL) or none",
        )?;
        let no = "not used by SD 1.x/2.x/XL UNets";
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "time_cond_proj_dim",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            j.only(key, &[], no)?;
        }
        for key in [
            "only_cross_attention",
            "dual_cross_attention",
            "resnet_skip_time_act",
            "class_embeddings_concat",
            "mid_block_only_cross_attention",
        ] {
            j.only(key, &[Value::Bool(false)], "false")?;
        }
        j.only(
            "resnet_out_scale_factor",
            &[serde_json::json!(1.0), serde_json::json!(1)],
            "1.0",
        )?;
        if let Some(Value::Array(_)) = j.get("cross_attention_dim") {
            return Err(j.unsupported(
                "cross_attention_dim",
                "a list",
                "one integer for every block",
            ));
        }
        if let Some(Value::Array(_)) = j.get("layers_per_block") {
            return Err(j.unsupported("layers_per_block", "a list", "one integer for every block"));
        }
        if j.get("addition_embed_type").is_none() {
            j.only(
                "projection_class_embeddings_input_dim",
                &[],
                "only used with addition_embed_type",
            )?;
        }
        let addition = Self::text_time(j)?;
        let transformer_layers_per_block = j.per_block("transformer_layers_per_block", n, 1)?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = if j.get("num_attention_heads").is_some() {
            j.per_block("num_attention_heads", n, 8)?
        } else {
            j.per_block("attention_head_dim", n, 8)?
        };
        let norm_num_groups = j.usize_or("norm_num_groups", 32)?;
        for (i, &c) in block_out_channels.iter().enumerate() {
            if norm_num_groups == 0
                || c % norm_num_groups != 0
                || heads[i] == 0
                || c % heads[i] != 0
            {
                return Err(Error::Config {
                    path: j.path().into(),
                    reason: format!(
                        "block width {c} is not divisible by norm_num_groups {norm_num_groups} and heads {}",
                        heads[i]
                    ),
                });
            }
        }
        Ok(UnetConfig {
            in_channels: j.usize_or("in_channels", 4)?,
            out_channels: j.usize_or("out_channels", 4)?,
            center_input_sample: j.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: j.bool_or("flip_sin_to_cos", true)?,
            freq_shift: j.f64_or("freq_shift", 0.0)?,
            down_blocks,
            up_blocks,
            block_out_channels,
            layers_per_block: j.usize_or("layers_per_block", 2)?,
            downsample_padding: j.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: j.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: j.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim: j.usize_or("cross_attention_dim", 1280)?,
            transformer_layers_per_block,
            addition,
            heads,
            use_linear_projection: j.bool_or("use_linear_projection", false)?,
            upcast_attention: j.bool_or("upcast_attention", false)?,
            conv_in_kernel: j.usize_or("conv_in_kernel", 3)?,
            conv_out_kernel: j.usize_or("conv_out_kernel", 3)?,
            sample_size: j
                .get("sample_size")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
        })
    }

    /// The `text_time` conditioning's widths, checked: its input is six time-id projections and a
    /// pooled embedding.
    fn text_time(j: &Json) -> Result<Option<TextTimeConfig>> {
        if j.get("addition_embed_type").is_none() {
            return Ok(None);
        }
        let time_embed_dim = j.usize_or("addition_time_embed_dim", 0)?;
        let input_dim = j.usize_or("projection_class_embeddings_input_dim", 0)?;
        let ids = TextTimeConfig::TIME_IDS * time_embed_dim;
        if time_embed_dim == 0 || input_dim <= ids {
            return Err(Error::Config {
                path: j.path().into(),
                reason: format!(
                    "addition_embed_type \"text_time\" needs a positive addition_time_embed_dim ({time_embed_dim}) and projection_class_embeddings_input_dim ({input_dim}) above 6 x addition_time_embed_dim"
                ),
            });
        }
        Ok(Some(TextTimeConfig {
            time_embed_dim,
            input_dim,
        }))
    }
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Block widths (encoder order).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before the UNet.
    pub scaling_factor: f64,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
    /// Whether the VAE runs in f32 inside a half-precision model (diffusers' default: true; the
    /// SD VAEs overflow f16 on some images and give NaN).
    pub force_upcast: bool,
}

impl VaeConfig {
    /// Reads `vae/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&Json::read(path)?)
    }

    /// Parses a config's text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        Self::from_json(&Json::parse(path, text)?)
    }

    fn from_json(j: &Json) -> Result<Self> {
        let block_out_channels = j.usize_list("block_out_channels")?;
        let groups = j.usize_or("norm_num_groups", 32)?;
        if block_out_channels.is_empty()
            || groups == 0
            || block_out_channels
                .iter()
                .any(|&c| c == 0 || c % groups != 0)
        {
            return Err(Error::Config {
                path: j.path().into(),
                reason: format!(
                    "block_out_channels {block_out_channels:?} should be one or more widths divisible by norm_num_groups {groups}"
                ),
            });
        }
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types = j.str_list(key)?;
            if let Some(bad) = types.iter().find(|t| t.as_str() != want) {
                return Err(j.unsupported(key, bad, want));
            }
            if types.len() != block_out_channels.len() {
                return Err(Error::Config {
                    path: j.path().into(),
                    reason: format!(
                        "`{key}` has {} entries for {} block widths",
                        types.len(),
                        block_out_channels.len()
                    ),
                });
            }
        }
        j.only("act_fn", &[Value::String("silu".into())], "silu")?;
        j.only("shift_factor", &[], "not used by SD 1.x/2.x VAEs")?;
        j.only("latents_mean", &[], "not used by SD 1.x/2.x VAEs")?;
        j.only("latents_std", &[], "not used by SD 1.x/2.x VAEs")?;
        Ok(VaeConfig {
            in_channels: j.usize_or("in_channels", 3)?,
            out_channels: j.usize_or("out_channels", 3)?,
            block_out_channels,
            layers_per_block: j.usize_or("layers_per_block", 1)?,
            latent_channels: j.usize_or("latent_channels", 4)?,
            norm_num_groups: j.usize_or("norm_num_groups", 32)?,
            scaling_factor: j.f64_or("scaling_factor", 0.18215)?,
            use_quant_conv: j.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: j.bool_or("use_post_quant_conv", true)?,
            mid_block_add_attention: j.bool_or("mid_block_add_attention", true)?,
            force_upcast: j.bool_or("force_upcast", true)?,
        })
    }
}

/// The activation of CLIP's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP, SD 2.x).
    Gelu,
}

/// `text_encoder/config.json` of a `CLIPTextModel`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: ClipActivation,
    /// Layer norm epsilon.
    pub layer_norm_eps: f64,
    /// The end-of-text id, whose first position gives the pooled output.
    pub eos_token_id: usize,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`).
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Reads `text_encoder/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&Json::read(path)?)
    }

    /// Parses a config's text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        Self::from_json(&Json::parse(path, text)?)
    }

    fn from_json(j: &Json) -> Result<Self> {
        let hidden_act = match j.str_or("hidden_act", "quick_gelu")?.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => return Err(j.unsupported("hidden_act", other, "quick_gelu or gelu")),
        };
        let hidden_size = j.usize_or("hidden_size", 512)?;
        let num_attention_heads = j.usize_or("num_attention_heads", 8)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::Config {
                path: j.path().into(),
                reason: format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"),
            });
        }
        Ok(ClipConfig {
            vocab_size: j.usize_or("vocab_size", 49408)?,
            hidden_size,
            intermediate_size: j.usize_or("intermediate_size", 2048)?,
            num_hidden_layers: j.usize_or("num_hidden_layers", 12)?,
            num_attention_heads,
            max_position_embeddings: j.usize_or("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: j.f64_or("layer_norm_eps", 1e-5)?,
            eos_token_id: j.usize_or("eos_token_id", 49407)?,
            projection_dim: j.usize_or("projection_dim", 512)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2, "cross_attention_dim": 32,
        "some_future_key": 1}"#;

    #[test]
    fn unet_config_reads_heads_per_block_and_ignores_unknown_keys() {
        let c = UnetConfig::parse(Path::new("unet/config.json"), TINY).unwrap();
        assert_eq!(c.heads, vec![2, 2]);
        assert_eq!(c.down_blocks, vec![DownBlock::CrossAttn, DownBlock::Plain]);
        let list = TINY.replace(
            "\"attention_head_dim\": 2",
            "\"attention_head_dim\": [1, 4]",
        );
        assert_eq!(
            UnetConfig::parse(Path::new("c"), &list).unwrap().heads,
            vec![1, 4]
        );
    }

    #[test]
    fn unsupported_options_are_named() {
        let cases = [
            (
                "\"attention_head_dim\": 2",
                "\"attention_head_dim\": 2, \"class_embed_type\": \"timestep\"",
                "class_embed_type",
            ),
            ("\"DownBlock2D\"", "\"SimpleDownBlock\"", "down_block_types"),
            (
                "\"attention_head_dim\": 2",
                "\"attention_head_dim\": 2, \"resnet_time_scale_shift\": \"scale_shift\"",
                "resnet_time_scale_shift",
            ),
            (
                "\"attention_head_dim\": 2",
                "\"attention_head_dim\": 3",
                "not divisible",
            ),
        ];
        for (from, to, want) in cases {
            let e = UnetConfig::parse(Path::new("unet/config.json"), &TINY.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("unet/config.json"), "{e}");
        }
        let e = UnetConfig::parse(Path::new("x.json"), "{")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn clip_and_vae_configs_name_what_they_do_not_support() {
        let e = ClipConfig::parse(Path::new("te.json"), r#"{"hidden_act": "relu"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
        let vae = r#"{"block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}"#;
        assert_eq!(
            VaeConfig::parse(Path::new("v"), vae)
                .unwrap()
                .scaling_factor,
            0.18215
        );
        let e = VaeConfig::parse(
            Path::new("v"),
            &vae.replace("[\"UpDecoderBlock2D\"]", "[\"X\"]"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("up_block_types"), "{e}");
        // no blocks, or widths the groups do not divide: named, not a panic later
        for bad in ["[]", "[30]"] {
            let text = vae
                .replace("[32]", bad)
                .replace("[\"DownEncoderBlock2D\"]", "[]")
                .replace("[\"UpDecoderBlock2D\"]", "[]");
            let e = VaeConfig::parse(Path::new("v"), &text).unwrap_err();
            assert!(e.to_string().contains("block_out_channels"), "{e}");
        }
    }
}
