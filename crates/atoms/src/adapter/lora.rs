//! `lora`: the low-rank baseline, `dW = (alpha / r) up @ down`, for linear and conv weights.
//!
//! For a conv `[co, ci, kh, kw]`, `down` is a `[r, ci, kh, kw]` conv and `up` a `[co, r, 1, 1]`
//! conv (the LoCon / diffusers layout); internally both are kept as matrices. `up` starts at zero
//! so the start is exact; `down` is Kaiming-uniform (`±1/sqrt(fan_in)`, as peft does).

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::{check_base, param_dtype, scaled, uniform_var, Adapter, Method};
use crate::{Error, Layout, Result};

/// The `lora` adapter of one layer.
#[derive(Debug)]
pub struct LoraAdapter {
    layout: Layout,
    /// `down [r, ci*kh*kw]`, tuned.
    down: Var,
    /// `up [co, r]`, tuned, zero-init.
    up: Var,
    alpha: f64,
}

impl LoraAdapter {
    /// A fresh rank-`rank` adapter with LoRA `alpha`.
    pub fn new(
        layout: Layout,
        base: &Tensor,
        rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        check_base(&layout, base)?;
        let (co, _) = layout.channels();
        let fan_in = layout.numel() / co;
        if rank == 0 || rank > co.min(fan_in) {
            return Err(Error::invalid(
                "lora rank",
                rank,
                format!("must be between 1 and {} for {layout}", co.min(fan_in)),
            ));
        }
        let dtype = param_dtype(base.dtype());
        let bound = 1.0 / (fan_in as f64).sqrt();
        let down = uniform_var(&[rank, fan_in], bound, rng, dtype, base.device())?;
        let up = Tensor::zeros((co, rank), dtype, base.device())?;
        Self::from_parts(layout, base, down.as_tensor(), &up, alpha)
    }

    /// An adapter from stored factors, in the file layout (`[r, ci(, kh, kw)]`, `[co, r(, 1, 1)]`)
    /// or as matrices.
    pub fn from_parts(
        layout: Layout,
        base: &Tensor,
        down: &Tensor,
        up: &Tensor,
        alpha: f64,
    ) -> Result<Self> {
        check_base(&layout, base)?;
        let (co, _) = layout.channels();
        let fan_in = layout.numel() / co;
        let r = down.dims().first().copied().unwrap_or(0);
        let (want_down, want_up) = file_shapes(&layout, r);
        let down_ok = down.dims() == want_down.as_slice() || down.dims() == [r, fan_in];
        let up_ok = up.dims() == want_up.as_slice() || up.dims() == [co, r];
        if r == 0 || !down_ok {
            return Err(Error::TensorShape {
                tensor: "lora_down".into(),
                found: down.dims().to_vec(),
                expected: want_down,
            });
        }
        if !up_ok {
            return Err(Error::TensorShape {
                tensor: "lora_up".into(),
                found: up.dims().to_vec(),
                expected: want_up,
            });
        }
        let dtype = param_dtype(base.dtype());
        let device = base.device();
        Ok(LoraAdapter {
            layout,
            down: Var::from_tensor(
                &down
                    .reshape((r, fan_in))?
                    .to_dtype(dtype)?
                    .to_device(device)?,
            )?,
            up: Var::from_tensor(&up.reshape((co, r))?.to_dtype(dtype)?.to_device(device)?)?,
            alpha,
        })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// LoRA's `alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

/// Shapes of `lora_down` and `lora_up` in a delta file for a layer of `layout` at rank `r`.
pub(crate) fn file_shapes(layout: &Layout, r: usize) -> (Vec<usize>, Vec<usize>) {
    match *layout {
        Layout::Conv { co, ci, kh, kw } => (vec![r, ci, kh, kw], vec![co, r, 1, 1]),
        Layout::Linear { co, ci, .. } => (vec![r, ci], vec![co, r]),
    }
}

impl Adapter for LoraAdapter {
    fn method(&self) -> Method {
        Method::Lora
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.down.clone(), self.up.clone()]
    }

    fn delta_weight(&self, base: &Tensor, scale: f64) -> Result<Tensor> {
        check_base(&self.layout, base)?;
        let dw = self.up.as_tensor().matmul(self.down.as_tensor())?;
        Ok(scaled(dw, scale * self.alpha / self.rank() as f64)?.reshape(self.layout.shape())?)
    }

    fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let (down, up) = file_shapes(&self.layout, self.rank());
        Ok(vec![
            ("lora_down", self.down.as_tensor().reshape(down)?),
            ("lora_up", self.up.as_tensor().reshape(up)?),
        ])
    }
}
