//! Adapters: small types that own a layer's trainable [`Var`]s and build its effective weight
//! `W' = W + scale * dW` from the frozen base weight `W` with candle ops, so that backward reaches
//! their parameters.
//!
//! | method | tuned | `dW` | parameters per layer |
//! |---|---|---|---|
//! | [`Method::Atoms`] | `dD [m, d]`, zero-init | `alpha @ dD` | `m d` |
//! | [`Method::AtomsRec`] | `beta [g, m, m1]`, `D1 [m, m1, d]` (zero-init) | `alpha[o,i] @ (beta[i] D1)` | `g m m1 + m m1 d` |
//! | [`Method::Lora`] | `down [r, ci k]`, `up [co, r]` (zero-init) | `(a/r) up @ down` | `r (ci k + co)` |
//! | [`Method::Full`] | `dW`, zero-init | `dW` | `co ci k` |
//!
//! Every adapter starts exactly at the base model: its zero-initialised factor makes `W' = W` bit
//! for bit at step 0, whatever the decomposition's error.
//!
//! With SVD atoms the coefficients are the projection `alpha = Wr @ D0^T`, so
//! `W' = Wr (I + scale D0^T dD)` (DESIGN.md 1.1): the adapter builds a `d x d` transform and needs
//! no copy of `alpha`, which is as large as the weight. Lasso atoms keep an explicit `alpha`.

mod atoms;
mod atoms_rec;
mod full;
pub(crate) mod lora;
mod transform;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use atoms::{AtomsAdapter, Coefficients};
pub use atoms_rec::AtomsRecAdapter;
pub use full::FullAdapter;
pub use lora::LoraAdapter;

use crate::{Block, DictionaryKind, Error, Layout, Result};

/// A tuning method (DESIGN.md 1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Filter atoms: tune `dD`, keep `alpha` frozen (the paper's method).
    Atoms,
    /// Recursive atoms: per-input-channel atom updates `beta @ D1` (DESIGN.md 1.2).
    AtomsRec,
    /// Low-rank adaptation, the baseline.
    Lora,
    /// A dense `dW` per layer, the upper bound.
    Full,
}

impl Method {
    /// Every method, in the order of the docs.
    pub const ALL: [Method; 4] = [Method::Atoms, Method::AtomsRec, Method::Lora, Method::Full];

    /// The name users type and delta files record.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Atoms => "atoms",
            Method::AtomsRec => "atoms-rec",
            Method::Lora => "lora",
            Method::Full => "full",
        }
    }

    /// The per-layer tensor suffixes a delta of this method holds.
    pub fn suffixes(&self) -> &'static [&'static str] {
        match self {
            Method::Atoms => &["atoms", "delta"],
            Method::AtomsRec => &["atoms", "beta", "d1"],
            Method::Lora => &["lora_down", "lora_up"],
            Method::Full => &["diff"],
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::invalid("method", s, "expected atoms, atoms-rec, lora or full"))
    }
}

/// A method and its hyper-parameters: everything needed to build an adapter for any layer, and
/// what a delta file records so it can be applied again.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// The method.
    pub method: Method,
    /// Atoms per layer `m` (atoms methods); `None` means `m = d`, an exact dictionary. A layer
    /// whose filters have fewer numbers (`d < m`, such as a 1x1 conv) gets `m = d`.
    pub atoms: Option<usize>,
    /// How atoms are computed from the base weight (atoms methods).
    pub dictionary: DictionaryKind,
    /// Sub-atoms per atom `m1` (atoms-rec).
    pub sub_atoms: usize,
    /// LoRA rank `r`.
    pub rank: usize,
    /// LoRA `alpha`; the update is scaled by `alpha / rank`.
    pub lora_alpha: f64,
    /// Channel block of linear layers (atoms methods).
    pub block: Block,
    /// Seed of the random initialisation (atoms-rec `beta`, LoRA `down`).
    pub seed: u64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig::new(Method::Atoms)
    }
}

impl AdapterConfig {
    /// The defaults of `method`: `m = d`, SVD atoms, `m1 = 3`, rank 4 with alpha 4, 4x4 blocks.
    pub fn new(method: Method) -> Self {
        AdapterConfig {
            method,
            atoms: None,
            dictionary: DictionaryKind::Svd,
            sub_atoms: 3,
            rank: 4,
            lora_alpha: 4.0,
            block: Block::default(),
            seed: 0,
        }
    }

    /// Checks the hyper-parameters that do not depend on a layer.
    pub fn validate(&self) -> Result<()> {
        if self.atoms == Some(0) {
            return Err(Error::invalid(
                "atoms per layer (m)",
                0,
                "must be at least 1",
            ));
        }
        if self.sub_atoms == 0 {
            return Err(Error::invalid("sub-atoms (m1)", 0, "must be at least 1"));
        }
        if self.rank == 0 {
            return Err(Error::invalid("lora rank", 0, "must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::invalid(
                "lora alpha",
                self.lora_alpha,
                "must be finite",
            ));
        }
        if let DictionaryKind::Lasso(o) = self.dictionary {
            o.check()?;
        }
        Ok(())
    }

    /// The layout of a base weight under this config.
    pub fn layout(&self, base_shape: &[usize]) -> Result<Layout> {
        Layout::from_shape(base_shape, self.block)
    }

    /// The number of trainable parameters an adapter of this config has on a weight of this shape.
    pub fn num_params(&self, base_shape: &[usize]) -> Result<usize> {
        let l = self.layout(base_shape)?;
        let d = l.filter_dim();
        let m = self.atoms.unwrap_or(d).min(d);
        let (co, ci) = l.channels();
        let k = l.numel() / (co * ci);
        Ok(match self.method {
            Method::Atoms => m * d,
            Method::AtomsRec => l.groups() * m * self.sub_atoms + m * self.sub_atoms * d,
            Method::Lora => self.rank * (ci * k + co),
            Method::Full => l.numel(),
        })
    }
}

/// What every adapter offers.
pub trait Adapter {
    /// The method it implements.
    fn method(&self) -> Method;

    /// The layout of the weight it adapts.
    fn layout(&self) -> &Layout;

    /// Its trainable parameters.
    fn vars(&self) -> Vec<Var>;

    /// The number of trainable numbers.
    fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `scale * dW`, shaped like the base weight, in the parameters' dtype.
    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor>;

    /// `W' = W + scale * dW`, in the base weight's dtype. At `scale = 0`, `W` itself.
    fn effective_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        base_plus_delta(self, base, scale)
    }

    /// The transform for which `W' = Wr T` at `scale`, when this adapter's effective weight has
    /// that form: atoms and atoms-rec with projection (SVD) coefficients. `None` otherwise, and
    /// at `scale = 0`. A convolution can then apply `T` to its input columns (or to its kernel,
    /// as a temporary) and never keep `W'` (DESIGN.md 1.1: "a `d x d` transform of each layer's
    /// spatial filters").
    fn filter_transform(&self, scale: f64) -> Result<Option<FilterTransform>> {
        let _ = scale;
        Ok(None)
    }

    /// The tensors a delta file stores for this layer, by suffix (see [`Method::suffixes`]).
    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>>;
}

/// A transform `T` with `W' = Wr T` ([`Adapter::filter_transform`]); the type the convolutions
/// of `ops` take.
pub use ops::conv::FilterTransform;

/// One layer's adapter, of any method.
#[derive(Debug)]
pub enum LayerAdapter {
    /// See [`AtomsAdapter`].
    Atoms(AtomsAdapter),
    /// See [`AtomsRecAdapter`].
    AtomsRec(AtomsRecAdapter),
    /// See [`LoraAdapter`].
    Lora(LoraAdapter),
    /// See [`FullAdapter`].
    Full(FullAdapter),
}

impl LayerAdapter {
    /// A fresh adapter of `config.method` on the base weight of `layer`, at the exact start.
    /// Random parts are drawn from a generator seeded by `config.seed` and the layer's name, so
    /// a layer's initialisation does not depend on which other layers are adapted.
    pub fn new(config: &AdapterConfig, layer: &str, base: &Tensor) -> Result<Self> {
        config.validate()?;
        let layout = config.layout(base.dims())?;
        let m = config.atoms.map(|m| m.min(layout.filter_dim()));
        let mut rng = layer_rng(config.seed, layer);
        Ok(match config.method {
            Method::Atoms => {
                LayerAdapter::Atoms(AtomsAdapter::new(layout, base, m, config.dictionary)?)
            }
            Method::AtomsRec => LayerAdapter::AtomsRec(AtomsRecAdapter::new(
                layout,
                base,
                m,
                config.dictionary,
                config.sub_atoms,
                &mut rng,
            )?),
            Method::Lora => LayerAdapter::Lora(LoraAdapter::new(
                layout,
                base,
                config.rank,
                config.lora_alpha,
                &mut rng,
            )?),
            Method::Full => LayerAdapter::Full(FullAdapter::new(layout, base)?),
        })
    }

    fn inner(&self) -> &dyn Adapter {
        match self {
            LayerAdapter::Atoms(a) => a,
            LayerAdapter::AtomsRec(a) => a,
            LayerAdapter::Lora(a) => a,
            LayerAdapter::Full(a) => a,
        }
    }
}

impl Adapter for LayerAdapter {
    fn method(&self) -> Method {
        self.inner().method()
    }
    fn layout(&self) -> &Layout {
        self.inner().layout()
    }
    fn vars(&self) -> Vec<Var> {
        self.inner().vars()
    }
    fn num_params(&self) -> usize {
        self.inner().num_params()
    }
    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        self.inner().delta_weight(base, scale)
    }
    fn effective_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        self.inner().effective_weight(base, scale)
    }
    fn filter_transform(&self, scale: f64) -> Result<Option<FilterTransform>> {
        self.inner().filter_transform(scale)
    }
    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        self.inner().tensors()
    }
}

/// The dtype adapter parameters use for a base of `dtype`: the base's own for `f32`/`f64`, `f32`
/// for half-precision bases (f16/bf16 weights with f32 adapter parameters).
pub fn param_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The generator for `layer`'s random initialisation.
fn layer_rng(seed: u64, layer: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ xxhash_rust::xxh3::xxh3_64(layer.as_bytes()))
}

/// A `Var` of `shape` with entries uniform in `[-bound, bound)`, drawn on the host.
fn uniform_var(
    shape: &[usize],
    bound: f64,
    rng: &mut ChaCha8Rng,
    dtype: DType,
    device: &Device,
) -> Result<Var> {
    let n: usize = shape.iter().product();
    let vals: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    // Converted on the host: Metal has no f64.
    let t = Tensor::from_vec(vals, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok(Var::from_tensor(&t)?)
}

/// `W + scale * dW` in the base's dtype; `W` itself at `scale = 0`.
fn base_plus_delta<A: Adapter + ?Sized>(adapter: &A, base: &Tensor, scale: f64) -> Result<Tensor> {
    if scale == 0.0 {
        return Ok(base.clone());
    }
    let dw = adapter.delta_weight(base, scale)?;
    Ok((base.to_dtype(dw.dtype())? + dw)?.to_dtype(base.dtype())?)
}

/// `s * t`, skipping the multiply at `s = 1` so that an unscaled update stays bit-exact.
fn scaled(t: Tensor, s: f64) -> Result<Tensor> {
    Ok(if s == 1.0 { t } else { (t * s)? })
}

/// Checks that `base` has the shape of `layout`.
fn check_base(layout: &Layout, base: &Tensor) -> Result<()> {
    if base.dims() != layout.shape().as_slice() {
        return Err(Error::invalid(
            "base weight",
            format!("{:?}", base.dims()),
            format!("the adapter was built for {layout}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
