//! transformers' `ViTModel` (the layout of `facebook/dino-vits16`): patch embedding, [CLS]
//! token, position embeddings, pre-norm encoder layers, final layer norm. DINO's image feature is
//! the [CLS] token of the last hidden state.
//!
//! Ours rather than candle-transformers' `vit`: that one is the image classifier
//! (`ViTForImageClassification`: keys under `vit.`, a `classifier` head it requires, its model
//! type private) and returns the head's logits, skipping the final layer norm; DINO checkpoints
//! have no head and the protocol reads the normed [CLS] features.

use std::path::Path;

use candle_core::{Tensor, D};
use models::config::ClipActivation;
use models::nn::{attention, LayerNorm, Linear};
use models::{Layers, Weights};
use serde_json::Value;

use crate::{Error, Result};

/// What the model's `config.json` says.
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Image side the position embeddings are for.
    pub image_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Layer norm epsilon.
    pub layer_norm_eps: f64,
    /// Whether query, key and value have biases.
    pub qkv_bias: bool,
    /// The MLP's activation.
    pub act: ClipActivation,
}

impl VitConfig {
    /// Reads `config.json` of a `ViTModel`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let n = |k: &str, d: usize| v.get(k).and_then(Value::as_u64).map_or(d, |x| x as usize);
        let act = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => ClipActivation::Gelu,
            "quick_gelu" => ClipActivation::QuickGelu,
            other => return Err(bad(format!("hidden_act `{other}` is not supported (gelu)"))),
        };
        let c = VitConfig {
            hidden_size: n("hidden_size", 768),
            intermediate_size: n("intermediate_size", 3072),
            num_hidden_layers: n("num_hidden_layers", 12),
            num_attention_heads: n("num_attention_heads", 12),
            patch_size: n("patch_size", 16),
            image_size: n("image_size", 224),
            num_channels: n("num_channels", 3),
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
            act,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(c)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln_before: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln_after: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The ViT image encoder.
#[derive(Debug, Clone)]
pub struct VitModel {
    config: VitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
}

impl VitModel {
    /// Loads the model from `w` (keys `embeddings.*`, `encoder.layer.<i>.*`, `layernorm.*`;
    /// a `pooler`, if there, is not used).
    pub fn new(w: &Weights, c: &VitConfig) -> Result<Self> {
        let h = c.hidden_size;
        let reg = Layers::new("vit");
        let lin = |w: &Weights, din, dout, bias| Linear::new(w, &reg, din, dout, bias);
        let e = w.pp("embeddings");
        let p = e.pp("patch_embeddings.projection");
        let tokens = (c.image_size / c.patch_size).pow(2) + 1;
        for k in ["pooler.dense.weight", "pooler.dense.bias"] {
            w.skip(k);
        }
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = w.pp("encoder.layer").pp(i);
                let a = l.pp("attention");
                Ok(Layer {
                    ln_before: LayerNorm::new(&l.pp("layernorm_before"), h, c.layer_norm_eps)?,
                    q: lin(&a.pp("attention.query"), h, h, c.qkv_bias)?,
                    k: lin(&a.pp("attention.key"), h, h, c.qkv_bias)?,
                    v: lin(&a.pp("attention.value"), h, h, c.qkv_bias)?,
                    out: lin(&a.pp("output.dense"), h, h, true)?,
                    ln_after: LayerNorm::new(&l.pp("layernorm_after"), h, c.layer_norm_eps)?,
                    fc1: lin(&l.pp("intermediate.dense"), h, c.intermediate_size, true)?,
                    fc2: lin(&l.pp("output.dense"), c.intermediate_size, h, true)?,
                })
            })
            .collect::<models::Result<_>>()?;
        Ok(VitModel {
            patch_weight: p.get((h, c.num_channels, c.patch_size, c.patch_size), "weight")?,
            patch_bias: p.get(h, "bias")?,
            cls_token: e.get((1, 1, h), "cls_token")?,
            position_embeddings: e.get((1, tokens, h), "position_embeddings")?,
            layers,
            final_ln: LayerNorm::new(&w.pp("layernorm"), h, c.layer_norm_eps)?,
            config: c.clone(),
        })
    }

    /// The last hidden state, after the final layer norm: `[b, 1 + patches, hidden]` for
    /// `pixels [b, 3, image_size, image_size]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, ph, pw) = pixels.dims4()?;
        if ph != c.image_size || pw != c.image_size {
            return Err(Error::Input(format!(
                "the ViT takes {0}x{0} images, not {pw}x{ph}",
                c.image_size
            )));
        }
        let patches = pixels
            .conv2d(&self.patch_weight, 0, c.patch_size, 1, 1)?
            .broadcast_add(&self.patch_bias.reshape((1, (), 1, 1))?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, c.hidden_size))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        let heads = c.num_attention_heads;
        let scale = 1.0 / ((c.hidden_size / heads) as f64).sqrt();
        for l in &self.layers {
            let h = l.ln_before.forward(&x)?;
            let o = attention(
                &l.q.forward(&h)?,
                &l.k.forward(&h)?,
                &l.v.forward(&h)?,
                heads,
                scale,
            )?;
            x = (x + l.out.forward(&o)?)?;
            let h = l.fc1.forward(&l.ln_after.forward(&x)?)?;
            let h = match c.act {
                ClipActivation::Gelu => h.gelu_erf()?,
                ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            };
            x = (x + l.fc2.forward(&h)?)?;
        }
        Ok(self.final_ln.forward(&x)?)
    }

    /// DINO's feature: the [CLS] token of the last hidden state, `[b, hidden]`.
    pub fn cls(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward(pixels)?.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// Rows divided by their L2 norms.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}
