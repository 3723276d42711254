//! The text side of a pipeline: its tokenizers and text encoders, and how their outputs become
//! what the UNet reads.
//!
//! SD 1.x/2.x have one encoder; the UNet attends to its last hidden state. SDXL has two (OpenAI
//! CLIP ViT-L, then OpenCLIP ViT-bigG with a projection): the UNet attends to both penultimate
//! hidden states side by side, and takes the second's projected pooled output as added
//! conditioning (diffusers' `StableDiffusionXLPipeline.encode_prompt`, `clip_skip = None`).

use candle_core::{DType, Device, Tensor};

use crate::{ClipTextModel, ClipTokenizer, Error, Result};

/// One text encoder and its tokenizer (random presets have no vocabulary, so no tokenizer).
pub struct TextEncoder {
    /// The tokenizer, if the model has one.
    pub tokenizer: Option<ClipTokenizer>,
    /// The encoder.
    pub model: ClipTextModel,
}

/// A pipeline's text encoders.
pub struct TextEncoders {
    /// `text_encoder` / `tokenizer`.
    pub first: TextEncoder,
    /// SDXL's `text_encoder_2` / `tokenizer_2` (a `CLIPTextModelWithProjection`).
    pub second: Option<TextEncoder>,
}

/// The text conditioning of a batch of prompts.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[b, 77, cross_attention_dim]`: what the UNet's cross-attention reads.
    pub context: Tensor,
    /// `[b, pooled]`: SDXL's pooled text embeddings (the added conditioning), `None` for SD 1.x/2.x.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// All zeros of the same shapes: SDXL's unconditional embeddings when no negative prompt is
    /// given (`force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(PromptEmbeds {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }

    /// The batches of `parts` one after the other.
    pub fn cat(parts: &[&PromptEmbeds]) -> Result<Self> {
        let contexts: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
        Ok(PromptEmbeds {
            context: Tensor::cat(&contexts, 0)?,
            pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()?,
        })
    }

    /// Element `i` of the batch, keeping the batch dimension.
    pub fn get(&self, i: usize) -> Result<Self> {
        Ok(PromptEmbeds {
            context: self.context.narrow(0, i, 1)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.narrow(0, i, 1))
                .transpose()?,
        })
    }

    /// Converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(PromptEmbeds {
            context: self.context.to_dtype(dtype)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.to_dtype(dtype))
                .transpose()?,
        })
    }
}

impl TextEncoders {
    /// The encoders' diffusers folder names, first to last.
    pub const NAMES: [&'static str; 2] = ["text_encoder", "text_encoder_2"];

    /// Whether this is SDXL's pair of encoders.
    pub fn is_dual(&self) -> bool {
        self.second.is_some()
    }

    /// Every encoder, first to last.
    pub fn iter(&self) -> impl Iterator<Item = &TextEncoder> {
        std::iter::once(&self.first).chain(self.second.as_ref())
    }

    /// The tokenizer of every encoder, or an error naming the model that has none.
    fn tokenizers(&self, model_id: &str) -> Result<Vec<&ClipTokenizer>> {
        self.iter()
            .map(|enc| {
                enc.tokenizer.as_ref().ok_or_else(|| {
                    Error::Input(format!(
                        "model `{model_id}` has no tokenizer (random presets have no vocabulary); use a real model folder or hub id"
                    ))
                })
            })
            .collect()
    }

    /// Makes `token` a new word of every tokenizer, read as `rows[k]` by encoder `k`: `[hidden]`
    /// (pivotal tuning's learned embedding) or `[n, hidden]` (an embedding of `n` vectors).
    pub fn add_token(&self, token: &str, rows: &[Tensor], model_id: &str) -> Result<()> {
        let n = self.iter().count();
        if rows.len() != n {
            return Err(Error::Input(format!(
                "token {token:?} has embeddings for {} text encoders, the model has {n}",
                rows.len()
            )));
        }
        let toks = self.tokenizers(model_id)?;
        // every tokenizer takes it before any encoder gets a row
        for tok in &toks {
            tok.check_new_token(token)?;
        }
        for (tok, (enc, rows)) in toks.into_iter().zip(self.iter().zip(rows)) {
            let rows = match rows.rank() {
                1 => vec![rows.clone()],
                2 => (0..rows.dim(0)?)
                    .map(|i| rows.get(i))
                    .collect::<candle_core::Result<_>>()?,
                _ => {
                    return Err(Error::Input(format!(
                        "token {token:?}: an embedding of shape {:?}, not [hidden] or [n, hidden]",
                        rows.dims()
                    )))
                }
            };
            let ids = rows
                .iter()
                .map(|r| enc.model.add_embedding(r))
                .collect::<Result<Vec<_>>>()?;
            tok.add_token(token, &ids)?;
        }
        Ok(())
    }

    /// Each encoder's mean embedding of `word`'s tokens, `[hidden]` in f32: where a new token
    /// starts (from the class word).
    pub fn word_embedding(&self, word: &str, model_id: &str) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (tok, enc) in self.tokenizers(model_id)?.into_iter().zip(self.iter()) {
            out.push(enc.model.mean_embedding(&tok.word_ids(word)?)?);
        }
        Ok(out)
    }

    /// Encodes `prompts` (padded to the tokenizers' length) on `device`; returns the embeddings
    /// and a warning per prompt that was cut to the tokenizer's length. `model_id` names the
    /// model in the error for a model without a tokenizer.
    pub fn encode(
        &self,
        prompts: &[&str],
        device: &Device,
        model_id: &str,
    ) -> Result<(PromptEmbeds, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut outputs = Vec::new();
        let toks = self.tokenizers(model_id)?;
        for (k, (enc, tok)) in self.iter().zip(toks).enumerate() {
            let mut ids = Vec::new();
            for p in prompts {
                let t = tok.encode(p, true)?;
                if let (Some(n), 0) = (t.truncated_from, k) {
                    warnings.push(format!(
                        "prompt {p:?} has {n} tokens; only the first {} are used (CLIP reads {} including start and end)",
                        tok.max_length() - 2,
                        tok.max_length()
                    ));
                }
                ids.push(Tensor::new(t.ids.as_slice(), device)?);
            }
            outputs.push(enc.model.forward(&Tensor::stack(&ids, 0)?)?);
        }
        let embeds = match outputs.as_slice() {
            [one] => PromptEmbeds {
                context: one.last_hidden_state.clone(),
                pooled: None,
            },
            [a, b] => PromptEmbeds {
                context: Tensor::cat(&[&a.penultimate, &b.penultimate], 2)?,
                pooled: Some(b.text_embeds.clone().ok_or_else(|| {
                    Error::Input("SDXL's second text encoder has no text_projection".into())
                })?),
            },
            _ => unreachable!("one or two text encoders"),
        };
        Ok((embeds, warnings))
    }
}
