//! `full`: a dense, zero-initialised `dW` per layer; the upper-bound baseline.

use candle_core::{Tensor, Var};

use super::{check_base, param_dtype, scaled, Adapter, Method};
use crate::{Layout, Result};

/// The `full` adapter of one layer.
#[derive(Debug)]
pub struct FullAdapter {
    layout: Layout,
    diff: Var,
}

impl FullAdapter {
    /// A zero `dW` shaped like `base`.
    pub fn new(layout: Layout, base: &Tensor) -> Result<Self> {
        let zeros = Tensor::zeros(base.dims(), param_dtype(base.dtype()), base.device())?;
        Self::from_diff(layout, base, &zeros)
    }

    /// An adapter holding a stored `dW`.
    pub fn from_diff(layout: Layout, base: &Tensor, diff: &Tensor) -> Result<Self> {
        check_base(&layout, base)?;
        check_base(&layout, diff)?;
        let diff = diff
            .to_dtype(param_dtype(base.dtype()))?
            .to_device(base.device())?;
        Ok(FullAdapter {
            layout,
            diff: Var::from_tensor(&diff)?,
        })
    }
}

impl Adapter for FullAdapter {
    fn method(&self) -> Method {
        Method::Full
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.diff.clone()]
    }

    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        check_base(&self.layout, base)?;
        scaled(self.diff.as_tensor().clone(), scale)
    }

    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![("diff", self.diff.as_tensor().clone())])
    }
}
