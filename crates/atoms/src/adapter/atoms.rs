//! `atoms`: tune the layer's atoms by `dD [m, d]`, keep the coefficients frozen (DESIGN.md 1.1).

use candle_core::{Tensor, Var};

use super::transform::transform_filters;
use super::{base_plus_delta, check_base, param_dtype, scaled, Adapter, FilterTransform, Method};
use crate::{Dictionary, DictionaryKind, Layout, Result};

/// How an atoms adapter gets its frozen coefficients `alpha [N, m]`.
#[derive(Debug, Clone)]
pub enum Coefficients {
    /// `alpha = Wr @ D0^T` (SVD atoms): never stored, folded into a `d x d` transform.
    Projection,
    /// Stored `alpha [N, m]` (grouped `[g, N/g, m]` for recursive atoms), for lasso atoms.
    Explicit(Tensor),
}

impl Coefficients {
    /// The coefficients `dictionary` gives for `base`, as `[N, m]`.
    pub(super) fn of(dictionary: &Dictionary, base: &Tensor, layout: &Layout) -> Result<Self> {
        if dictionary.is_projection() {
            return Ok(Coefficients::Projection);
        }
        let alpha = dictionary.coefficients_tensor(base, layout)?;
        Ok(Coefficients::Explicit(
            alpha.to_dtype(param_dtype(base.dtype()))?,
        ))
    }
}

/// The `atoms` adapter of one layer.
///
/// ```
/// use atoms::{Adapter, AdapterConfig, LayerAdapter, Method};
/// use candle_core::{Device, Tensor};
/// let w = Tensor::randn(0f32, 1.0, (8, 4, 3, 3), &Device::Cpu)?;
/// let a = LayerAdapter::new(&AdapterConfig::new(Method::Atoms), "conv", &w)?;
/// assert_eq!(a.num_params(), 81);
/// // At init the effective weight is the base weight, bit for bit.
/// let w2 = a.effective_weight(&w, 1.0)?;
/// assert_eq!(w2.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct AtomsAdapter {
    layout: Layout,
    kind: DictionaryKind,
    /// `D0 [m, d]`, frozen.
    atoms: Tensor,
    /// `dD [m, d]`, tuned.
    delta: Var,
    coefficients: Coefficients,
}

impl AtomsAdapter {
    /// A zero-initialised adapter on `base`, with `m` atoms (`None`: `m = d`) computed by `kind`.
    pub fn new(
        layout: Layout,
        base: &Tensor,
        m: Option<usize>,
        kind: DictionaryKind,
    ) -> Result<Self> {
        let dictionary = Dictionary::from_weight(base, &layout, m, kind)?.rounded_to_f32();
        Self::from_dictionary(layout, base, &dictionary, None)
    }

    /// An adapter with the given atoms and `dD` (`None`: zeros), coefficients from `base`.
    pub fn from_dictionary(
        layout: Layout,
        base: &Tensor,
        dictionary: &Dictionary,
        delta: Option<&Tensor>,
    ) -> Result<Self> {
        check_base(&layout, base)?;
        let dtype = param_dtype(base.dtype());
        let device = base.device();
        let atoms = dictionary.atoms_tensor(dtype, device)?;
        let delta = match delta {
            Some(t) => Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?,
            None => Var::zeros(atoms.dims(), dtype, device)?,
        };
        if delta.dims() != atoms.dims() {
            return Err(crate::Error::TensorShape {
                tensor: "delta".into(),
                found: delta.dims().to_vec(),
                expected: atoms.dims().to_vec(),
            });
        }
        Ok(AtomsAdapter {
            layout,
            kind: dictionary.kind(),
            coefficients: Coefficients::of(dictionary, base, &layout)?,
            atoms,
            delta,
        })
    }

    /// The frozen atoms `D0 [m, d]`.
    pub fn atoms(&self) -> &Tensor {
        &self.atoms
    }

    /// The tuned atom update `dD [m, d]`.
    pub fn delta(&self) -> &Var {
        &self.delta
    }

    /// How the atoms were computed.
    pub fn dictionary_kind(&self) -> DictionaryKind {
        self.kind
    }

    /// `scale * D0^T @ dD`, the `d x d` update of every filter (projection coefficients).
    fn filter_update(&self, scale: f64) -> Result<Tensor> {
        scaled(self.atoms.t()?.matmul(self.delta.as_tensor())?, scale)
    }
}

impl Adapter for AtomsAdapter {
    fn method(&self) -> Method {
        Method::Atoms
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.delta.clone()]
    }

    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        check_base(&self.layout, base)?;
        match &self.coefficients {
            // alpha @ dD = Wr @ (D0^T dD)
            Coefficients::Projection => {
                let w = base.to_dtype(self.atoms.dtype())?;
                transform_filters(&w, &self.filter_update(scale)?, &self.layout)
            }
            Coefficients::Explicit(alpha) => {
                let dd = scaled(self.delta.as_tensor().clone(), scale)?;
                self.layout.from_filters(&alpha.matmul(&dd)?)
            }
        }
    }

    fn effective_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        match self.filter_transform(scale)? {
            // W' = Wr (I + scale D0^T dD): one [N, d] x [d, d] product, exact at dD = 0.
            Some(ft) => {
                let t = ft.matrix()?;
                check_base(&self.layout, base)?;
                let w = transform_filters(&base.to_dtype(t.dtype())?, &t, &self.layout)?;
                Ok(w.to_dtype(base.dtype())?)
            }
            None => base_plus_delta(self, base, scale),
        }
    }

    fn filter_transform(&self, scale: f64) -> Result<Option<FilterTransform>> {
        if scale == 0.0 || !matches!(self.coefficients, Coefficients::Projection) {
            return Ok(None);
        }
        Ok(Some(FilterTransform::Atoms {
            atoms: self.atoms.clone(),
            delta: self.delta.as_tensor().clone(),
            scale,
        }))
    }

    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![
            ("atoms", self.atoms.clone()),
            ("delta", self.delta.as_tensor().clone()),
        ])
    }
}
