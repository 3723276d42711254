//! The CLIP text encoder (`CLIPTextModel`, and `CLIPTextModelWithProjection` for SDXL's second
//! encoder): token and position embeddings, pre-norm transformer layers with a causal mask, final
//! layer norm; the pooled output is the state at the first end-of-text token, projected by
//! `text_projection` when the model has one. [`ClipEncoder`], the transformer layers, is shared
//! with CLIP's vision tower (the evaluation's image encoder).

use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor, D};

use crate::config::{ClipActivation, ClipConfig};
use crate::layers::Layers;
use crate::nn::{LayerNorm, Linear};
use crate::weights::Weights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP's transformer encoder (`encoder.layers.*`): pre-norm layers of self-attention and MLP,
/// the same in the text and the vision tower.
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
    hidden: usize,
    heads: usize,
    act: ClipActivation,
}

impl ClipEncoder {
    /// Loads `c.num_hidden_layers` layers from `w` (keys `layers.<i>.*`).
    pub fn new(w: &Weights, c: &ClipConfig, layers: &Layers) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |w: &Weights, din, dout| Linear::new(w, layers, din, dout, true);
        let enc = w.pp("layers");
        Ok(ClipEncoder {
            layers: (0..c.num_hidden_layers)
                .map(|i| {
                    let l = enc.pp(i);
                    let a = l.pp("self_attn");
                    Ok(EncoderLayer {
                        ln1: LayerNorm::new(&l.pp("layer_norm1"), h, c.layer_norm_eps)?,
                        q: lin(&a.pp("q_proj"), h, h)?,
                        k: lin(&a.pp("k_proj"), h, h)?,
                        v: lin(&a.pp("v_proj"), h, h)?,
                        out: lin(&a.pp("out_proj"), h, h)?,
                        ln2: LayerNorm::new(&l.pp("layer_norm2"), h, c.layer_norm_eps)?,
                        fc1: lin(&l.pp("mlp.fc1"), h, c.intermediate_size)?,
                        fc2: lin(&l.pp("mlp.fc2"), c.intermediate_size, h)?,
                    })
                })
                .collect::<Result<_>>()?,
            hidden: h,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)?)
    }

    /// Runs the layers on `x [b, n, hidden]` (each position attending only to earlier ones when
    /// `causal`); returns the output and the last layer's input (transformers'
    /// `hidden_states[-2]`).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<(Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        let (heads, hidden) = (self.heads, self.hidden);
        let hd = hidden / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mask = if causal {
            Some(Self::causal_mask(n, DType::F32, x.device())?)
        } else {
            None
        };
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)?)
        };
        let mut x = x.clone();
        let mut penultimate = x.clone();
        for l in &self.layers {
            penultimate = x.clone();
            let h = l.ln1.forward(&x)?;
            let (q, k, v) = (
                split(l.q.forward(&h)?)?,
                split(l.k.forward(&h)?)?,
                split(l.v.forward(&h)?)?,
            );
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let o = probs
                .matmul(&v)?
                .to_dtype(x.dtype())?
                .transpose(1, 2)?
                .reshape((b, n, hidden))?;
            x = (x + l.out.forward(&o)?)?;
            let h = l.fc1.forward(&l.ln2.forward(&x)?)?;
            let h = match self.act {
                ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                ClipActivation::Gelu => h.gelu_erf()?,
            };
            x = (x + l.fc2.forward(&h)?)?;
        }
        Ok((x, penultimate))
    }
}

/// The text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: ClipEncoder,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    registry: Layers,
    /// Learned rows past the vocabulary (pivotal tuning): id `vocab_size + k` reads row `k`,
    /// `[hidden]` each. Shared by clones, like the adapters of `registry`.
    extra: Arc<RwLock<Vec<Tensor>>>,
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `[b, seq, hidden]`, after the final layer norm: what SD's UNet attends to.
    pub last_hidden_state: Tensor,
    /// `[b, seq, hidden]`: the input of the last layer (transformers' `hidden_states[-2]`), what
    /// SDXL's UNet attends to.
    pub penultimate: Tensor,
    /// `[b, hidden]`: the state at each sequence's first end-of-text token.
    pub pooled: Tensor,
    /// `[b, projection_dim]`: `pooled` through `text_projection`, for models that have one
    /// (`CLIPTextModelWithProjection`'s `text_embeds`).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextModel {
    /// Builds the encoder from `w` (keys `text_model.*`).
    pub fn new(w: &Weights, config: &ClipConfig, layers: &Layers) -> Result<Self> {
        Self::build(w, config, layers, None)
    }

    /// Builds a `CLIPTextModelWithProjection` from `w` (keys `text_model.*` and
    /// `text_projection.weight`, `[projection_dim, hidden]`, no bias).
    pub fn with_projection(w: &Weights, config: &ClipConfig, layers: &Layers) -> Result<Self> {
        let proj = Linear::new(
            &w.pp("text_projection"),
            layers,
            config.hidden_size,
            config.projection_dim,
            false,
        )?;
        Self::build(w, config, layers, Some(proj))
    }

    fn build(
        w: &Weights,
        config: &ClipConfig,
        layers: &Layers,
        projection: Option<Linear>,
    ) -> Result<Self> {
        let c = config;
        // transformers 5.6 and later save `CLIPTextModel` flattened (`embeddings.*`, not
        // `text_model.embeddings.*`); `CLIPTextModelWithProjection` keeps the wrapper
        let w = if w.contains("embeddings.token_embedding.weight")
            && !w.contains("text_model.embeddings.token_embedding.weight")
        {
            w.clone()
        } else {
            w.pp("text_model")
        };
        let h = c.hidden_size;
        let e = w.pp("embeddings");
        // Older checkpoints also store the position ids buffer; it is 0..n and not needed.
        e.skip("position_ids");
        Ok(ClipTextModel {
            token_embedding: e.pp("token_embedding").get((c.vocab_size, h), "weight")?,
            position_embedding: e
                .pp("position_embedding")
                .get((c.max_position_embeddings, h), "weight")?,
            encoder: ClipEncoder::new(&w.pp("encoder"), c, layers)?,
            registry: layers.clone(),
            final_ln: LayerNorm::new(&w.pp("final_layer_norm"), h, c.layer_norm_eps)?,
            projection,
            config: c.clone(),
            extra: Arc::default(),
        })
    }

    /// Its config.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Its linear layers, by transformers name (`text_model.encoder.layers.0.self_attn.q_proj`),
    /// where adapters (a LoRA's text-encoder modules) attach.
    pub fn layers(&self) -> &Layers {
        &self.registry
    }

    /// Appends a learned embedding row `[hidden]` (a trained token's; a `Var`'s tensor trains
    /// it); returns its id, `vocab_size` plus the rows before it.
    pub fn add_embedding(&self, row: &Tensor) -> Result<u32> {
        let h = self.config.hidden_size;
        if row.dims() != [h] {
            return Err(Error::Input(format!(
                "a token embedding of shape {:?} for a text encoder of width {h}",
                row.dims()
            )));
        }
        if !row.device().same_device(self.token_embedding.device()) {
            return Err(Error::Input(
                "a token embedding on another device than its text encoder".into(),
            ));
        }
        let mut extra = self.extra.write().expect("embedding lock");
        // kept as given (a trained variable's tensor updates in place), cast when read
        extra.push(row.clone());
        Ok((self.config.vocab_size + extra.len() - 1) as u32)
    }

    /// The learned rows, in id order.
    pub fn added_embeddings(&self) -> Vec<Tensor> {
        self.extra.read().expect("embedding lock").clone()
    }

    /// The mean of the vocabulary's rows `ids`, `[hidden]` in f32: a new token's start (from
    /// its class word).
    pub fn mean_embedding(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() || ids.iter().any(|&i| i as usize >= self.config.vocab_size) {
            return Err(Error::Input(format!(
                "token ids {ids:?} are not in the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let idx = Tensor::new(ids, self.token_embedding.device())?;
        Ok(self
            .token_embedding
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .mean(0)?)
    }

    /// The token embeddings of ids `[n]`: vocabulary rows, and learned rows past it.
    fn embed(&self, flat: &Tensor) -> Result<Tensor> {
        let extra = self.extra.read().expect("embedding lock");
        let v = self.config.vocab_size as u32;
        let ids = flat.to_vec1::<u32>()?;
        if extra.is_empty() || ids.iter().all(|&i| i < v) {
            return Ok(self.token_embedding.index_select(flat, 0)?);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i >= v + extra.len() as u32) {
            return Err(Error::Input(format!(
                "token id {bad} is past the vocabulary ({v}) and its {} learned rows",
                extra.len()
            )));
        }
        let dev = flat.device();
        let base_ids: Vec<u32> = ids.iter().map(|&i| if i < v { i } else { 0 }).collect();
        let extra_ids: Vec<u32> = ids.iter().map(|&i| i.saturating_sub(v)).collect();
        let is_extra: Vec<f32> = ids.iter().map(|&i| f32::from(u8::from(i >= v))).collect();
        let n = ids.len();
        let base = self
            .token_embedding
            .index_select(&Tensor::new(base_ids, dev)?, 0)?;
        let rows = Tensor::stack(&extra, 0)?
            .to_dtype(base.dtype())?
            .index_select(&Tensor::new(extra_ids, dev)?, 0)?;
        let m = Tensor::from_vec(is_extra, (n, 1), dev)?.to_dtype(base.dtype())?;
        // base where the id is in the vocabulary, the learned row where it is past it
        Ok((base.broadcast_mul(&(1.0 - &m)?)? + rows.broadcast_mul(&m)?)?)
    }

    /// Encodes token ids `[b, seq]` (u32 or i64).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (b, n) = ids.dims2()?;
        let c = &self.config;
        if n > c.max_position_embeddings {
            return Err(Error::Input(format!(
                "{n} tokens, the text encoder takes at most {}",
                c.max_position_embeddings
            )));
        }
        let ids = ids.to_dtype(DType::U32)?;
        let flat = ids.flatten_all()?;
        let x = self
            .embed(&flat)?
            .reshape((b, n, c.hidden_size))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let (x, penultimate) = self.encoder.forward(&x, true)?;
        let last = self.final_ln.forward(&x)?;
        // As transformers: the first position of `eos_token_id` in each row; configs with the
        // legacy `eos_token_id = 2` (SD 1.x/2.x hub repos) use the position of the largest id,
        // which is the end token in CLIP's vocabulary (learned tokens past the vocabulary do not
        // count: the rule means the end token).
        let ids_v = ids.to_vec2::<u32>()?;
        let vocab = c.vocab_size as u32;
        let pos: Vec<usize> = ids_v
            .iter()
            .map(|row| {
                if c.eos_token_id == 2 {
                    let max = row
                        .iter()
                        .copied()
                        .filter(|&t| t < vocab)
                        .max()
                        .unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&t| t as usize == c.eos_token_id)
                        .unwrap_or(row.len() - 1)
                }
            })
            .collect();
        let pooled = (0..b)
            .map(|i| last.get(i)?.get(pos[i]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let text_embeds = match &self.projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            pooled,
            text_embeds,
            penultimate,
            last_hidden_state: last,
        })
    }
}
