//! Pivotal tuning (`--train-token-embedding`): the trigger becomes a new token of every
//! tokenizer, read as its own embedding row by each text encoder (started at the mean of the
//! class word's rows), trained jointly with the adapters by an optimizer of its own (at
//! `--embedding-lr`), and stored in the delta ([`atoms::EMBEDDING_PREFIX`]), so that a
//! kilobyte delta also carries what the subject's name means.

use std::collections::{BTreeMap, HashMap};

use atoms::Delta;
use candle_core::{DType, Tensor, Var};
use models::{StableDiffusion, TextEncoders};

use crate::optim::{AdamWConfig, Optimizer, OptimizerKind};
use crate::{Error, Result};

/// The prefix of the embedding optimizer's tensors in a checkpoint's `optimizer.safetensors`.
pub const PREFIX: &str = "embedding.";

/// The trigger's trained rows, one per text encoder, and their optimizer.
pub struct TokenEmbedding {
    /// The optimizer over the rows (its `vars()` are the rows, first encoder first).
    pub opt: Optimizer,
}

impl TokenEmbedding {
    /// Adds `token` to `sd`'s tokenizers with trainable rows: those of checkpoint delta
    /// `resume`, else the mean of `class_word`'s rows.
    pub fn attach(
        sd: &StableDiffusion,
        token: &str,
        class_word: &str,
        resume: Option<&Delta>,
        kind: OptimizerKind,
        adamw: AdamWConfig,
    ) -> Result<Self> {
        let start = match resume {
            Some(d) => TextEncoders::NAMES
                .iter()
                .take(sd.text.iter().count())
                .map(|name| {
                    d.embeddings().get(*name).cloned().ok_or_else(|| {
                        Error::Config(format!(
                            "the checkpoint has no token embedding for {name}: it was made without --train-token-embedding"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            None => sd.text.word_embedding(class_word, &sd.id)?,
        };
        let vars = start
            .iter()
            .map(|t| {
                Var::from_tensor(
                    &t.to_dtype(DType::F32)?
                        .to_device(sd.unet.device())?
                        .copy()?,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rows: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        sd.text.add_token(token, &rows, &sd.id)?;
        Ok(TokenEmbedding {
            opt: Optimizer::new(kind, vars, adamw)?,
        })
    }

    /// The rows by encoder name, copied to the CPU (the variables change in place).
    pub fn embeddings(&self) -> Result<BTreeMap<String, Tensor>> {
        TextEncoders::NAMES
            .iter()
            .zip(self.opt.vars())
            .map(|(n, v)| {
                Ok((
                    n.to_string(),
                    v.as_tensor().to_device(&candle_core::Device::Cpu)?.copy()?,
                ))
            })
            .collect()
    }

    /// The optimizer's state with [`PREFIX`], for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .opt
            .state()?
            .into_iter()
            .map(|(k, t)| (format!("{PREFIX}{k}"), t))
            .collect())
    }

    /// Restores the optimizer from a checkpoint's tensors with [`PREFIX`].
    pub fn load_state(&mut self, all: &HashMap<String, Tensor>) -> Result<()> {
        let mine: HashMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(PREFIX).map(|k| (k.to_string(), t.clone())))
            .collect();
        self.opt.load_state(&mine)
    }
}
