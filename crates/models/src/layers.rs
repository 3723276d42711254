//! The adapter hook: every conv and linear layer of a model registers its base weight here under
//! its diffusers name, and asks here for the weight to use at each forward pass.
//!
//! Adapters from `atoms` attach by name ([`Layers::attach`]) without touching model code. A layer
//! with no adapter uses its base weight as is; one adapter gives `W' = W + scale dW` through the
//! adapter's own (exact, fast) path; several stack, `W + sum_k scale_k dW_k`, each computed from
//! the base. [`Layers`] is also the [`atoms::BaseWeights`] a delta is checked against.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use atoms::{Adapter, LayerAdapter};
use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// What kind of layer a weight belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// A 2-d convolution, weight `[co, ci, kh, kw]`.
    Conv,
    /// A linear layer, weight `[co, ci]`.
    Linear,
}

/// A registered layer.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    /// Conv or linear.
    pub kind: LayerKind,
    /// The frozen base weight, as the layer keeps it (bf16 in the CPU's mixed precision).
    pub weight: Tensor,
    /// Where the original of a weight kept in bf16 is read again from ([`Layers::base_weight`]).
    original: Option<crate::weights::Weights>,
}

struct Attached {
    adapter: Arc<LayerAdapter>,
    scale: f64,
}

#[derive(Default)]
struct Inner {
    layers: BTreeMap<String, LayerInfo>,
    adapters: BTreeMap<String, Vec<Attached>>,
    /// Effective weights computed once by [`Layers::bake`], used until adapters change.
    baked: BTreeMap<String, Tensor>,
    /// Which of the model's blocks run checkpointed ([`Layers::set_checkpointing`]).
    checkpointing: Checkpointing,
    /// The model family's name ([`crate::arch::Architecture::name`]), when known.
    architecture: Option<String>,
}

/// Which UNet blocks gradient checkpointing covers ([`Layers::set_checkpointing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every block keeps its activations for the backward.
    #[default]
    Off,
    /// The blocks whose activations are largest for the work of recomputing them: every resnet
    /// and transformer of the first (full-resolution) level, and the transformers of the second.
    /// SD 1.5 at latent 64: 4.7 GB instead of 6.7, for a step about 20% longer (BENCHMARKS.md).
    Selective,
    /// Every resnet and transformer block: the least memory (4.1 GB for SD 1.5 at latent 64),
    /// for one more forward per step (about 40% longer).
    All,
}

impl Checkpointing {
    /// Whether a block runs checkpointed under this mode; `selected` says whether
    /// [`Checkpointing::Selective`] covers it.
    pub fn covers(self, selected: bool) -> bool {
        match self {
            Checkpointing::Off => false,
            Checkpointing::Selective => selected,
            Checkpointing::All => true,
        }
    }
}

/// The adaptable layers of one model, shared by the model's modules.
#[derive(Clone, Default)]
pub struct Layers {
    id: Arc<str>,
    inner: Arc<RwLock<Inner>>,
}

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read().expect("lock");
        f.debug_struct("Layers")
            .field("id", &self.id)
            .field("layers", &inner.layers.len())
            .field("adapted", &inner.adapters.len())
            .finish()
    }
}

impl Layers {
    /// An empty table for a model known as `id` (a hub id or a path, for messages).
    pub fn new(id: impl Into<String>) -> Self {
        let id: String = id.into();
        Layers {
            id: id.into(),
            inner: Arc::default(),
        }
    }

    /// Records the model family (`sd1`, `sd2`, `sdxl`) deltas are checked against.
    pub fn set_architecture(&self, name: &str) {
        self.inner.write().expect("lock").architecture = Some(name.to_string());
    }

    /// Registers layer `name`; `original`: where to read the weight as loaded when `weight` is
    /// a bf16 copy of it.
    pub(crate) fn register(
        &self,
        name: &str,
        kind: LayerKind,
        weight: &Tensor,
        original: Option<crate::weights::Weights>,
    ) {
        let mut inner = self.inner.write().expect("lock");
        inner.layers.insert(
            name.to_string(),
            LayerInfo {
                kind,
                weight: weight.clone(),
                original,
            },
        );
    }

    /// Layer `name`'s base weight as loaded: for a weight kept in bf16, the original read
    /// again (so that adapters are built, and deltas fingerprint their base, as in f32).
    pub fn base_weight(&self, name: &str) -> Result<Tensor> {
        let info = self
            .get(name)
            .ok_or_else(|| Error::Atoms(atoms::Error::UnknownLayer { layer: name.into() }))?;
        match &info.original {
            Some(w) => w.get(info.weight.dims(), "weight"),
            None => Ok(info.weight),
        }
    }

    /// Every registered layer's name, in order.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .expect("lock")
            .layers
            .keys()
            .cloned()
            .collect()
    }

    /// One layer.
    pub fn get(&self, name: &str) -> Option<LayerInfo> {
        self.inner.read().expect("lock").layers.get(name).cloned()
    }

    /// The names of the layers a target set selects (DESIGN.md 1.4).
    pub fn select(&self, targets: Targets) -> Vec<String> {
        let inner = self.inner.read().expect("lock");
        inner
            .layers
            .iter()
            .filter(|(name, info)| targets.selects(name, info))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Attaches `adapter` to `name` at `scale` (adapters already there stay: they stack).
    pub fn attach(&self, name: &str, adapter: LayerAdapter, scale: f64) -> Result<()> {
        let mut inner = self.inner.write().expect("lock");
        let info = inner
            .layers
            .get(name)
            .ok_or_else(|| Error::Atoms(atoms::Error::UnknownLayer { layer: name.into() }))?;
        if adapter.layout().shape() != info.weight.dims() {
            return Err(Error::Input(format!(
                "adapter for `{name}` was built for {} but the layer's weight is {:?}",
                adapter.layout(),
                info.weight.dims()
            )));
        }
        // a weight baked before this adapter came is stale
        inner.baked.remove(name);
        inner
            .adapters
            .entry(name.to_string())
            .or_default()
            .push(Attached {
                adapter: Arc::new(adapter),
                scale,
            });
        Ok(())
    }

    /// Removes every adapter.
    pub fn detach_all(&self) {
        let mut inner = self.inner.write().expect("lock");
        inner.adapters.clear();
        inner.baked.clear();
    }

    /// Computes every adapted layer's effective weight now and uses it until adapters change:
    /// for inference, where adapter parameters are fixed and a model runs many times. (Not for
    /// training: gradients do not flow through baked weights.)
    pub fn bake(&self) -> Result<()> {
        self.bake_for(ops::cpu_bf16::active())
    }

    /// [`Layers::bake`] for products that run in bf16 (`bf16_products`) or not.
    fn bake_for(&self, bf16_products: bool) -> Result<()> {
        let names: Vec<(String, Tensor)> = {
            let inner = self.inner.read().expect("lock");
            inner
                .adapters
                .keys()
                .map(|n| (n.clone(), inner.layers[n].weight.clone()))
                .collect()
        };
        let mut baked = BTreeMap::new();
        for (name, base) in names {
            let w = self.compute_weight(&name, &base)?.detach();
            // A base kept in bf16 gets an f32 adapted weight (see `compute_weight`); where bf16
            // products take it, they round it to bf16 as they pack it, so it is kept in bf16
            // here: the same products at half the memory (SD 1.5's adapted convs 2.3 -> 1.15
            // GB). Layers too small for them (SD 1.5's conv_in and conv_out) keep f32.
            let keep_bf16 = base.dtype() == DType::BF16
                && w.dtype() == DType::F32
                && base.device().is_cpu()
                && bf16_products
                && ops::cpu_bf16::takes_weight(w.dims());
            let w = if keep_bf16 {
                w.to_dtype(DType::BF16)?
            } else {
                w
            };
            baked.insert(name, w);
        }
        self.inner.write().expect("lock").baked = baked;
        Ok(())
    }

    /// Every adapted layer's effective weight (base plus its adapters), in the dtype of the
    /// weight as loaded, from that weight (an f32 original where the layer keeps bf16): what a
    /// merged checkpoint stores.
    pub fn effective_weights(&self) -> Result<BTreeMap<String, Tensor>> {
        // A layer baked for inference from the weight as loaded has it already (a second copy
        // took as much memory again as the adapted weights: 2.4 GB for SD 1.5's convs in
        // `atomtune merge`). One kept in bf16 starts again from its f32 original: exact.
        let names: Vec<(String, Option<Tensor>)> = {
            let inner = self.inner.read().expect("lock");
            inner
                .adapters
                .keys()
                .map(|n| {
                    let exact = inner.layers[n].original.is_none();
                    let baked = inner.baked.get(n).filter(|_| exact).cloned();
                    (n.clone(), baked)
                })
                .collect()
        };
        names
            .into_iter()
            .map(|(name, baked)| {
                let w = match baked {
                    Some(w) => w,
                    None => self
                        .compute_weight(&name, &self.base_weight(&name)?)?
                        .detach(),
                };
                Ok((name, w))
            })
            .collect()
    }

    /// The names of the layers with adapters attached, in order.
    pub fn adapted(&self) -> Vec<String> {
        self.inner
            .read()
            .expect("lock")
            .adapters
            .keys()
            .cloned()
            .collect()
    }

    /// The trainable parameters of every attached adapter (layers by name, then each adapter's
    /// own order: a fixed order, which optimizer state relies on).
    pub fn vars(&self) -> Vec<candle_core::Var> {
        let inner = self.inner.read().expect("lock");
        inner
            .adapters
            .values()
            .flatten()
            .flat_map(|a| a.adapter.vars())
            .collect()
    }

    /// The trainable parameters of the adapters on layers whose names start with `prefix.`.
    pub(crate) fn vars_under(&self, prefix: &str) -> Vec<candle_core::Var> {
        let inner = self.inner.read().expect("lock");
        let dotted = format!("{prefix}.");
        inner
            .adapters
            .range(dotted.clone()..)
            .take_while(|(name, _)| name.starts_with(&dotted))
            .flat_map(|(_, v)| v.iter().flat_map(|a| a.adapter.vars()))
            .collect()
    }

    /// Gradient checkpointing for training: a checkpointed resnet or transformer block keeps
    /// only its inputs for the backward and runs its forward again there ([`crate::checkpoint`]).
    /// [`Checkpointing::Off`] by default. Every device.
    pub fn set_checkpointing(&self, mode: Checkpointing) {
        self.inner.write().expect("lock").checkpointing = mode;
    }

    /// Which blocks run checkpointed.
    pub fn checkpointing(&self) -> Checkpointing {
        self.inner.read().expect("lock").checkpointing
    }

    /// The attached adapters of `name`, with their scales.
    pub fn adapters(&self, name: &str) -> Vec<(Arc<LayerAdapter>, f64)> {
        let inner = self.inner.read().expect("lock");
        inner
            .adapters
            .get(name)
            .map(|v| v.iter().map(|a| (a.adapter.clone(), a.scale)).collect())
            .unwrap_or_default()
    }

    /// The transform `T` with which conv `name` can run as `conv(x, Wr T)` without building
    /// `W'` ([`ops::conv::conv2d_transformed`]): when exactly one adapter is attached, it
    /// offers one ([`atoms::Adapter::filter_transform`]) and no weight is baked.
    pub(crate) fn filter_transform(&self, name: &str) -> Result<Option<atoms::FilterTransform>> {
        let inner = self.inner.read().expect("lock");
        if inner.baked.contains_key(name) {
            return Ok(None);
        }
        match inner.adapters.get(name).map(Vec::as_slice) {
            Some([a]) => Ok(a.adapter.filter_transform(a.scale)?),
            _ => Ok(None),
        }
    }

    /// The weight `name` uses now: `base` with its adapters applied.
    pub(crate) fn weight(&self, name: &str, base: &Tensor) -> Result<Tensor> {
        if let Some(w) = self.inner.read().expect("lock").baked.get(name) {
            return Ok(w.clone());
        }
        self.compute_weight(name, base)
    }

    fn compute_weight(&self, name: &str, base: &Tensor) -> Result<Tensor> {
        let attached = self.adapters(name);
        // A base kept in bf16 beside f32 activations: an adapted weight is f32 (W + dW in
        // bf16 would lose most of dW).
        let widened;
        let base = if base.dtype() == DType::BF16 && !attached.is_empty() && base.device().is_cpu()
        {
            widened = base.to_dtype(DType::F32)?;
            &widened
        } else {
            base
        };
        match attached.as_slice() {
            [] => Ok(base.clone()),
            [(a, scale)] => Ok(a.effective_weight(base, *scale)?),
            many => {
                let mut w = base.to_dtype(atoms::adapter::param_dtype(base.dtype()))?;
                for (a, scale) in many {
                    if *scale != 0.0 {
                        w = (w + a.delta_weight(base, *scale)?)?;
                    }
                }
                Ok(w.to_dtype(base.dtype())?)
            }
        }
    }
}

impl atoms::BaseWeights for Layers {
    fn id(&self) -> &str {
        &self.id
    }

    fn architecture(&self) -> Option<String> {
        self.inner.read().expect("lock").architecture.clone()
    }

    fn weight_shape(&self, layer: &str) -> Option<Vec<usize>> {
        self.get(layer).map(|i| i.weight.dims().to_vec())
    }

    fn weight(&self, layer: &str) -> atoms::Result<Tensor> {
        self.base_weight(layer).map_err(|e| match e {
            Error::Atoms(e) => e,
            other => atoms::Error::Candle(candle_core::Error::Msg(format!(
                "re-reading the base weight of `{layer}`: {other}"
            ))),
        })
    }
}

/// Which layers a method tunes (DESIGN.md 1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Targets {
    /// Every convolution, 3x3 and 1x1 (the paper's SD setting).
    #[default]
    Conv,
    /// The 3x3 (and larger) convolutions only.
    Conv3x3,
    /// The attention projections `to_q`, `to_k`, `to_v`, `to_out.0` (LoRA's usual targets).
    Attn,
    /// Every convolution and every linear layer.
    All,
}

impl Targets {
    fn selects(&self, name: &str, info: &LayerInfo) -> bool {
        match self {
            Targets::Conv => info.kind == LayerKind::Conv,
            Targets::Conv3x3 => {
                info.kind == LayerKind::Conv
                    && info.weight.dims()[2..].iter().product::<usize>() > 1
            }
            Targets::Attn => {
                info.kind == LayerKind::Linear
                    && [".to_q", ".to_k", ".to_v", ".to_out.0"]
                        .iter()
                        .any(|s| name.ends_with(s))
            }
            Targets::All => true,
        }
    }

    /// The name users type.
    pub fn name(&self) -> &'static str {
        match self {
            Targets::Conv => "conv",
            Targets::Conv3x3 => "conv3x3",
            Targets::Attn => "attn",
            Targets::All => "all",
        }
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Targets {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        [Targets::Conv, Targets::Conv3x3, Targets::Attn, Targets::All]
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown targets `{s}` (expected conv, conv3x3, attn or all)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoms::adapter::FullAdapter;
    use atoms::{Block, Layout};
    use candle_core::Device;

    fn full(base: &Tensor, diff: f32) -> LayerAdapter {
        let layout = Layout::from_shape(base.dims(), Block { rows: 1, cols: 1 }).unwrap();
        let d = (base.ones_like().unwrap() * diff as f64).unwrap();
        LayerAdapter::Full(FullAdapter::from_diff(layout, base, &d).unwrap())
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A base kept in bf16 bakes to f32 (its update would be lost in bf16), but to bf16 where
    /// bf16 products take the layer and would round it anyway; a layer too small for them
    /// keeps f32.
    #[test]
    fn a_bf16_base_bakes_to_what_its_products_read() {
        let layers = Layers::new("test");
        let (big, small) = ((64, 256), (64, 16));
        for (name, dims) in [("big", big), ("small", small)] {
            let base = Tensor::arange(0f32, (dims.0 * dims.1) as f32, &Device::Cpu)
                .unwrap()
                .reshape(dims)
                .unwrap();
            let kept = base.to_dtype(DType::BF16).unwrap();
            layers.register(name, LayerKind::Linear, &kept, None);
            layers.attach(name, full(&base, 0.01), 1.0).unwrap();
        }
        let baked = |name: &str| {
            let kept = layers.get(name).unwrap().weight;
            layers.weight(name, &kept).unwrap()
        };
        layers.bake_for(false).unwrap();
        assert_eq!(baked("big").dtype(), DType::F32);
        assert_eq!(values(&baked("big"))[1], 1.01);
        layers.bake_for(true).unwrap();
        assert_eq!(baked("big").dtype(), DType::BF16);
        assert_eq!(baked("small").dtype(), DType::F32);
        // 1.01 rounds to 1.0078125 in bf16
        let big16 = values(&baked("big").to_dtype(DType::F32).unwrap());
        assert_eq!(big16[1], half::bf16::from_f32(1.01).to_f32());
    }

    /// A baked weight serves until an adapter comes: then the layer uses all its adapters
    /// again, and `effective_weights` gives what the layer uses (the baked tensor itself while
    /// it holds, not a second copy).
    #[test]
    fn an_adapter_attached_after_baking_is_used() {
        let layers = Layers::new("test");
        let base = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        layers.register("l", LayerKind::Linear, &base, None);
        layers.attach("l", full(&base, 0.5), 1.0).unwrap();
        layers.bake().unwrap();
        let baked = layers.effective_weights().unwrap()["l"].clone();
        assert_eq!(values(&baked), [1.5, 2.5, 3.5, 4.5]);
        let used = layers.weight("l", &base).unwrap();
        assert_eq!(
            used.id(),
            baked.id(),
            "effective_weights copied the baked weight"
        );
        layers.attach("l", full(&base, 0.25), 1.0).unwrap();
        assert_eq!(
            values(&layers.weight("l", &base).unwrap()),
            [1.75, 2.75, 3.75, 4.75]
        );
        assert_eq!(
            values(&layers.effective_weights().unwrap()["l"]),
            [1.75, 2.75, 3.75, 4.75]
        );
    }
}
