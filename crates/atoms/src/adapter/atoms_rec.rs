//! `atoms-rec`: recursive (overcomplete) atoms, one atom update per input group (DESIGN.md 1.2).
//!
//! `dD[i, l] = sum_a beta[i, l, a] D1[l, a]`, and `W'[o, i] = W[o, i] + sum_l alpha[o, i, l] dD[i, l]`,
//! where `i` runs over input channels of a conv (input block columns of a linear weight). `D1` is
//! zero-initialised, so the start is exact while `beta` starts random and gives `D1` a gradient.

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::{
    base_plus_delta, check_base, param_dtype, scaled, uniform_var, Adapter, Coefficients,
    FilterTransform, Method,
};
use crate::{Dictionary, DictionaryKind, Error, Layout, Result};

/// The `atoms-rec` adapter of one layer.
#[derive(Debug)]
pub struct AtomsRecAdapter {
    layout: Layout,
    kind: DictionaryKind,
    /// `D0 [m, d]`, frozen.
    atoms: Tensor,
    /// `beta [g, m, m1]`, tuned.
    beta: Var,
    /// `D1 [m, m1, d]`, tuned, zero-init.
    d1: Var,
    /// Explicit coefficients are kept grouped, `[g, N/g, m]`.
    coefficients: Coefficients,
}

impl AtomsRecAdapter {
    /// A fresh adapter: `m` atoms (`None`: `m = d`) by `kind`, `m1` sub-atoms per atom, `beta`
    /// uniform in `±1/sqrt(m1)` (Kaiming-uniform for fan-in `m1`), `D1 = 0`.
    pub fn new(
        layout: Layout,
        base: &Tensor,
        m: Option<usize>,
        kind: DictionaryKind,
        m1: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let dictionary = Dictionary::from_weight(base, &layout, m, kind)?.rounded_to_f32();
        let m = dictionary.num_atoms();
        let dtype = param_dtype(base.dtype());
        let bound = 1.0 / (m1 as f64).sqrt();
        let beta = uniform_var(&[layout.groups(), m, m1], bound, rng, dtype, base.device())?;
        let d1 = Tensor::zeros((m, m1, layout.filter_dim()), dtype, base.device())?;
        Self::from_dictionary(layout, base, &dictionary, beta.as_tensor(), &d1)
    }

    /// An adapter with the given atoms, `beta` and `D1`, coefficients from `base`.
    pub fn from_dictionary(
        layout: Layout,
        base: &Tensor,
        dictionary: &Dictionary,
        beta: &Tensor,
        d1: &Tensor,
    ) -> Result<Self> {
        check_base(&layout, base)?;
        let (g, m, d) = (layout.groups(), dictionary.num_atoms(), layout.filter_dim());
        let m1 = beta.dims().get(2).copied().unwrap_or(0);
        for (name, t, want) in [("beta", beta, vec![g, m, m1]), ("d1", d1, vec![m, m1, d])] {
            if t.dims() != want.as_slice() || m1 == 0 {
                return Err(Error::TensorShape {
                    tensor: name.into(),
                    found: t.dims().to_vec(),
                    expected: want,
                });
            }
        }
        let dtype = param_dtype(base.dtype());
        let device = base.device();
        let coefficients = match Coefficients::of(dictionary, base, &layout)? {
            Coefficients::Explicit(alpha) => {
                let n = layout.num_filters();
                Coefficients::Explicit(
                    alpha
                        .reshape((n / g, g, m))?
                        .transpose(0, 1)?
                        .contiguous()?,
                )
            }
            p => p,
        };
        Ok(AtomsRecAdapter {
            layout,
            kind: dictionary.kind(),
            atoms: dictionary.atoms_tensor(dtype, device)?,
            beta: Var::from_tensor(&beta.to_dtype(dtype)?.to_device(device)?)?,
            d1: Var::from_tensor(&d1.to_dtype(dtype)?.to_device(device)?)?,
            coefficients,
        })
    }

    /// The frozen atoms `D0 [m, d]`.
    pub fn atoms(&self) -> &Tensor {
        &self.atoms
    }

    /// How the atoms were computed.
    pub fn dictionary_kind(&self) -> DictionaryKind {
        self.kind
    }

    /// `dD [g, m, d]`: each group's atom updates, `beta[i] D1`.
    fn atom_updates(&self) -> Result<Tensor> {
        let beta = self.beta.as_tensor().transpose(0, 1)?.contiguous()?; // [m, g, m1]
        let dd = beta.matmul(self.d1.as_tensor())?; // [m, g, d]
        Ok(dd.transpose(0, 1)?.contiguous()?)
    }

    /// `scale * D0^T @ dD[i]` for every group, `[g, d, d]` (projection coefficients).
    fn filter_updates(&self, scale: f64) -> Result<Tensor> {
        scaled(
            self.atoms.t()?.broadcast_matmul(&self.atom_updates()?)?,
            scale,
        )
    }
}

impl Adapter for AtomsRecAdapter {
    fn method(&self) -> Method {
        Method::AtomsRec
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.beta.clone(), self.d1.clone()]
    }

    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        check_base(&self.layout, base)?;
        let grouped = match &self.coefficients {
            Coefficients::Projection => {
                let wg = self
                    .layout
                    .to_grouped(&base.to_dtype(self.atoms.dtype())?)?;
                wg.matmul(&self.filter_updates(scale)?)?
            }
            Coefficients::Explicit(alpha) => alpha.matmul(&scaled(self.atom_updates()?, scale)?)?,
        };
        self.layout.from_grouped(&grouped)
    }

    fn effective_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        match self.filter_transform(scale)? {
            // W'[., i] = W[., i] (I + scale D0^T dD[i]): exact at D1 = 0.
            Some(ft) => {
                let t = ft.matrix()?;
                check_base(&self.layout, base)?;
                let wg = self.layout.to_grouped(&base.to_dtype(t.dtype())?)?;
                Ok(self
                    .layout
                    .from_grouped(&wg.matmul(&t)?)?
                    .to_dtype(base.dtype())?)
            }
            None => base_plus_delta(self, base, scale),
        }
    }

    fn filter_transform(&self, scale: f64) -> Result<Option<FilterTransform>> {
        if scale == 0.0 || !matches!(self.coefficients, Coefficients::Projection) {
            return Ok(None);
        }
        let d = self.layout.filter_dim();
        let eye = Tensor::eye(d, self.atoms.dtype(), self.atoms.device())?;
        Ok(Some(FilterTransform::Matrix(
            self.filter_updates(scale)?.broadcast_add(&eye)?,
        )))
    }

    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![
            ("atoms", self.atoms.clone()),
            ("beta", self.beta.as_tensor().clone()),
            ("d1", self.d1.as_tensor().clone()),
        ])
    }
}
