//! GEGLU, `h * gelu(g)` for `[h, g]` the two halves of the last axis, as one op.
//!
//! Composed from candle ops it is two strided views, an erf-GELU, a product and, backward, a
//! GELU derivative built from half a dozen full-size ops plus two zero-padded copies of the
//! input (the backward of each view). Here the forward is one pass that keeps only its input,
//! and the backward one pass that writes `[dy gelu(g), dy h gelu'(g)]` straight into the input's
//! layout, with `gelu(x) = x Phi(x)` and `gelu'(x) = Phi(x) + x phi(x)` (`Phi`, `phi`: the
//! standard normal CDF and density: in f64 erf from candle's CPU kernels, as its `gelu_erf`; in
//! f32 vectorised approximations good to about an ulp, [`crate::fastmath`]). Other
//! devices and dtypes use the composed form, also the reference the tests hold this op to.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::conv::float_op;
use crate::conv::{slices, task_len};
use crate::fastmath::{normal_cdf, normal_pdf, simd_dispatch};
use crate::Result;

/// `x [..., 2n]` -> `x[..., :n] * gelu(x[..., n:])`, `[..., n]` (diffusers' `GEGLU`, exact GELU).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let two_n = x.dim(D::Minus1)?;
    if two_n % 2 != 0 {
        return Err(crate::Error::Input(format!(
            "GEGLU needs an even last axis, got {:?}",
            x.dims()
        )));
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(x.contiguous()?.apply_op1(Geglu)?);
    }
    composed(x)
}

/// The same from candle ops.
pub(crate) fn composed(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? / 2;
    let h = x.narrow(D::Minus1, 0, n)?;
    let g = x.narrow(D::Minus1, n, n)?;
    Ok((h * g.gelu_erf()?)?)
}

struct Geglu;

/// The op's rows for one dtype: f64 with std's functions, f32 vectorised ([`crate::fastmath`]).
trait Elem: crate::conv::Float {
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
        let n = l1.dims().last().copied().unwrap_or(0) / 2;
        let dx = float_op!(s1.dtype(), "atomtune-geglu backward", |F| backward(
            slices::<F>(s1, l1)?,
            slices::<F>(s2, l2)?,
            n
        ));
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn the_op_equals_the_composed_form_and_its_gradient() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 1.5, (2, 3, 10), &Device::Cpu).unwrap())
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let fast = geglu(&x).unwrap();
            let slow = composed(&x).unwrap();
            assert_eq!(fast.dims(), &[2, 3, 5]);
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-10 };
            assert!(diff(&fast, &slow) < tol, "{dtype:?} forward");
            let (gf, gs) = weighted_grads(&fast, &slow);
            // candle's own GELU derivative is good to ~1e-6 in f64; finite differences below
            // hold ours to 1e-8.
            let e = diff(gf.get(&x).unwrap(), gs.get(&x).unwrap());
            assert!(e < 1e-5, "{dtype:?} backward {e}");
        }
    }

    #[test]
    fn the_gradient_equals_central_differences_in_f64() {
        let x0: Vec<f64> = (0..24)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 4.0)
            .collect();
        let m: Vec<f64> = (0..12).map(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0).collect();
        let mt = Tensor::from_vec(m, (2, 6), &Device::Cpu).unwrap();
        let loss = |v: &[f64]| -> f64 {
            let x = Tensor::from_vec(v.to_vec(), (2, 12), &Device::Cpu).unwrap();
            (geglu(&x).unwrap() * &mt)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 12), &Device::Cpu).unwrap())
            .unwrap();
        let g = (geglu(&x).unwrap() * &mt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for i in 0..x0.len() {
            let (mut a, mut b) = (x0.clone(), x0.clone());
            a[i] += h;
            b[i] -= h;
            let fd = (loss(&a) - loss(&b)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-8 * (1.0 + fd.abs()),
                "x[{i}]: {fd} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn an_odd_last_axis_is_an_error() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(geglu(&x).is_err());
    }
}
