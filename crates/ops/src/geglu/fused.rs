//! The fused CPU GEGLU: one pass forward that keeps only its input, and one pass backward that
//! writes `[dy gelu(g), dy h gelu'(g)]` straight into the input's layout. In f64 erf comes from
//! candle's CPU kernels (as its `gelu_erf`); in f32 from vectorised approximations good to about
//! an ulp ([`crate::cpu::fastmath`]).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::fastmath::{normal_cdf, normal_pdf, simd_dispatch};
use crate::cpu::{float_op, slices, task_len, Float};
use crate::Result;

/// The fused op on a contiguous f32 or f64 input.
pub(super) fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Geglu)
}

struct Geglu;

/// The op's rows for one dtype: f64 with std's functions, f32 vectorised.
trait Elem: Float {
    /// `y = h gelu(g)`.
    fn forward_row(y: &mut [Self], h: &[Self], g: &[Self]);
    /// `dh = dy gelu(g)`, `dg = dy h gelu'(g)`.
    fn backward_row(dh: &mut [Self], dg: &mut [Self], h: &[Self], g: &[Self], dy: &[Self]);
}

impl Elem for f64 {
    fn forward_row(y: &mut [f64], h: &[f64], g: &[f64]) {
        for ((o, &a), &b) in y.iter_mut().zip(h).zip(g) {
            *o = a * b * cdf(b);
        }
    }

    fn backward_row(dh: &mut [f64], dg: &mut [f64], h: &[f64], g: &[f64], dy: &[f64]) {
        for i in 0..dh.len() {
            let (a, b, d) = (h[i], g[i], dy[i]);
            let c = cdf(b);
            dh[i] = d * b * c;
            dg[i] = d * a * (c + b * pdf(b));
        }
    }
}

/// `Phi(x)`, the standard normal CDF.
fn cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// `phi(x)`, the standard normal density.
fn pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() * 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2
}

impl Elem for f32 {
    fn forward_row(y: &mut [f32], h: &[f32], g: &[f32]) {
        forward_row_f32(y, h, g)
    }

    fn backward_row(dh: &mut [f32], dg: &mut [f32], h: &[f32], g: &[f32], dy: &[f32]) {
        backward_row_f32(dh, dg, h, g, dy)
    }
}

simd_dispatch! {
    fn forward_row_f32(y: &mut [f32], h: &[f32], g: &[f32]) = forward_row_body;
}

simd_dispatch! {
    fn backward_row_f32(dh: &mut [f32], dg: &mut [f32], h: &[f32], g: &[f32], dy: &[f32])
        = backward_row_body;
}

#[inline(always)]
fn forward_row_body(y: &mut [f32], h: &[f32], g: &[f32]) {
    for ((o, &a), &b) in y.iter_mut().zip(h).zip(g) {
        *o = a * b * normal_cdf(b);
    }
}

#[inline(always)]
fn backward_row_body(dh: &mut [f32], dg: &mut [f32], h: &[f32], g: &[f32], dy: &[f32]) {
    let n = dh
        .len()
        .min(dg.len())
        .min(h.len())
        .min(g.len())
        .min(dy.len());
    for i in 0..n {
        let (a, b, d) = (h[i], g[i], dy[i]);
        let c = normal_cdf(b);
        dh[i] = d * b * c;
        dg[i] = d * a * (c + b * normal_pdf(b));
    }
}

fn forward<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len() / 2];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(2 * n))
        .with_min_len(task_len(2 * n))
        .for_each(|(yr, xr)| {
            let (h, g) = xr.split_at(n);
            T::forward_row(yr, h, g);
        });
    y
}

fn backward<T: Elem>(x: &[T], dy: &[T], n: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(2 * n)
        .zip(x.par_chunks(2 * n).zip(dy.par_chunks(n)))
        .with_min_len(task_len(4 * n))
        .for_each(|(dr, (xr, dyr))| {
            let (h, g) = xr.split_at(n);
            let (dh, dg) = dr.split_at_mut(n);
            T::backward_row(dh, dg, h, g, dyr);
        });
    dx
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "atomtune-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let n = l.dims().last().copied().unwrap_or(0) / 2;
        let y = float_op!(s.dtype(), "atomtune-geglu", |F| forward(
            slices::<F>(s, l)?,
            n
        ));
        let mut shape = l.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _time = crate::op_times::start(|| format!("{} backward", self.name()));
        Ok(Some(x.detach().apply_op2_no_bwd(
            &dy.detach().contiguous()?,
            &GegluGrad,
        )?))
    }
}

/// The backward as an op on `(x, dy)`.
struct GegluGrad;

impl candle_core::CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "atomtune-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let n = l1.dims().last().copied().unwrap_or(0) / 2;
        let dx = float_op!(s1.dtype(), "atomtune-geglu backward", |F| backward(
            slices::<F>(s1, l1)?,
            slices::<F>(s2, l2)?,
            n
        ));
        Ok((dx, l1.shape().clone()))
    }
}
