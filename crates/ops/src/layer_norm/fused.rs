//! The fused CPU layer norm: one pass per row forward (statistics in f64, then normalise, scale
//! and shift), keeping only its input; the backward recomputes the row statistics, and sums the
//! parameter gradients over fixed blocks of rows in order (the same bits on any thread count).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::fastmath::{mean_rstd, simd_dispatch, LANES};
use crate::cpu::{float_op, slices, task_len, unpack_norm_grads, Float};
use crate::Result;

/// Rows per task in the backward's parameter-gradient sums.
const ROWS: usize = 64;

/// The fused op on contiguous inputs of one dtype (f32 or f64).
pub(super) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// The per-row loops for one element type: f64 as written, f32 compiled for the CPU's vector
/// units ([`simd_dispatch!`]).
trait Rows: Float {
    /// `y = (x - mean) rstd gamma + beta` for one row.
    fn forward_row(y: &mut [Self], x: &[Self], gamma: &[Self], beta: &[Self], eps: f64);
    /// `dx` for one row; adds `dy xhat` and `dy` into `sums` (`[dgamma, dbeta]`) when it is not
    /// empty.
    fn backward_row(
        dx: &mut [Self],
        x: &[Self],
        dy: &[Self],
        gamma: &[Self],
        sums: &mut [Self],
        eps: f64,
    );
}

impl Rows for f64 {
    fn forward_row(y: &mut [f64], x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) {
        forward_row(y, x, gamma, beta, eps)
    }
    fn backward_row(dx: &mut [f64], x: &[f64], dy: &[f64], g: &[f64], s: &mut [f64], eps: f64) {
        backward_row(dx, x, dy, g, s, eps)
    }
}

impl Rows for f32 {
    fn forward_row(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) {
        forward_row_f32(y, x, gamma, beta, eps)
    }
    fn backward_row(dx: &mut [f32], x: &[f32], dy: &[f32], g: &[f32], s: &mut [f32], eps: f64) {
        backward_row_f32(dx, x, dy, g, s, eps)
    }
}

simd_dispatch! {
    fn forward_row_f32(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f64)
        = forward_row::<f32>;
}
simd_dispatch! {
    fn backward_row_f32(dx: &mut [f32], x: &[f32], dy: &[f32], g: &[f32], s: &mut [f32], eps: f64)
        = backward_row::<f32>;
}

/// A row's mean and `1 / sqrt(var + eps)`, computed in f64, as `T`.
#[inline(always)]
fn stats<T: Float>(v: &[T], eps: f64) -> (T, T) {
    let (mean, rstd) = mean_rstd(v, eps);
    (
        T::from(mean).unwrap_or(T::zero()),
        T::from(rstd).unwrap_or(T::zero()),
    )
}

#[inline(always)]
fn forward_row<T: Float>(y: &mut [T], x: &[T], gamma: &[T], beta: &[T], eps: f64) {
    let (mean, rstd) = stats(x, eps);
    for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mean) * rstd * g + b;
    }
}

#[inline(always)]
fn backward_row<T: Float>(dx: &mut [T], x: &[T], dy: &[T], gamma: &[T], sums: &mut [T], eps: f64) {
    let (mean, rstd) = stats(x, eps);
    // s1 = sum dy gamma, s2 = sum dy gamma xhat, in lanes
    let (mut s1, mut s2) = ([T::zero(); LANES], [T::zero(); LANES]);
    let mut chunks = x.chunks_exact(LANES).zip(dy.chunks_exact(LANES));
    for (i, (xc, dc)) in (&mut chunks).enumerate() {
        let gc = &gamma[i * LANES..(i + 1) * LANES];
        for l in 0..LANES {
            let dg = dc[l] * gc[l];
            s1[l] = s1[l] + dg;
            s2[l] = s2[l] + dg * (xc[l] - mean) * rstd;
        }
    }
    let done = x.len() / LANES * LANES;
    let (mut t1, mut t2) = (T::zero(), T::zero());
    for j in done..x.len().min(dy.len()).min(gamma.len()) {
        let dg = dy[j] * gamma[j];
        t1 = t1 + dg;
        t2 = t2 + dg * (x[j] - mean) * rstd;
    }
    let add = |acc: T, &v: &T| acc + v;
    let n = T::from(x.len()).unwrap_or(T::one());
    let (m1, m2) = (s1.iter().fold(t1, add) / n, s2.iter().fold(t2, add) / n);
    for (((o, &v), &d), &g) in dx.iter_mut().zip(x).zip(dy).zip(gamma) {
        let xh = (v - mean) * rstd;
        *o = rstd * (d * g - m1 - xh * m2);
    }
    if !sums.is_empty() {
        let (pg, pb) = sums.split_at_mut(x.len());
        for (((a, b), &v), &d) in pg.iter_mut().zip(pb.iter_mut()).zip(x).zip(dy) {
            *a = *a + d * (v - mean) * rstd;
            *b = *b + d;
        }
    }
}

impl LayerNorm {
    fn forward<T: Rows>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let c = gamma.len();
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .with_min_len(task_len(c))
            .for_each(|(yr, xr)| T::forward_row(yr, xr, gamma, beta, self.eps));
        y
    }

    /// `[dx, dgamma, dbeta]` packed; the parameter sums only when `sums`.
    fn backward<T: Rows>(&self, x: &[T], gamma: &[T], dy: &[T], sums: bool) -> Vec<T> {
        let c = gamma.len();
        let mut out = vec![T::zero(); x.len() + 2 * c];
        let (dx, tail) = out.split_at_mut(x.len());
        let partials: Vec<Vec<T>> = dx
            .par_chunks_mut(c * ROWS)
            .zip(x.par_chunks(c * ROWS).zip(dy.par_chunks(c * ROWS)))
            .with_min_len(task_len(c * ROWS))
            .map(|(dxb, (xb, dyb))| {
                let mut part = if sums {
                    vec![T::zero(); 2 * c]
                } else {
                    Vec::new()
                };
                for (dxr, (xr, dyr)) in dxb
                    .chunks_exact_mut(c)
                    .zip(xb.chunks_exact(c).zip(dyb.chunks_exact(c)))
                {
                    T::backward_row(dxr, xr, dyr, gamma, &mut part, self.eps);
                }
                part
            })
            .collect();
        if sums {
            for p in &partials {
                tail.iter_mut().zip(p).for_each(|(a, &b)| *a = *a + b);
            }
        }
        out
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "atomtune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let c = l2.shape().elem_count();
        if l1.dims().last() != Some(&c) || l3.shape().elem_count() != c {
            candle_core::bail!(
                "layer norm: input {:?} does not fit scale {:?} and shift {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = float_op!(s1.dtype(), "atomtune-layer-norm", |F| self.forward(
            slices::<F>(s1, l1)?,
            slices::<F>(s2, l2)?,
            slices::<F>(s3, l3)?,
        ));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _time = crate::op_times::start(|| format!("{} backward", self.name()));
        if !(x.track_op() || gamma.track_op() || beta.track_op()) {
            return Ok((None, None, None));
        }
        let op = LayerNormGrad {
            eps: self.eps,
            gamma: gamma.detach(),
            sums: gamma.track_op() || beta.track_op(),
        };
        let packed = x
            .detach()
            .apply_op2_no_bwd(&dy.detach().contiguous()?, &op)?;
        unpack_norm_grads(&packed, x, gamma, beta)
    }
}

/// The backward as an op on `(x, dy)`; `gamma` is small and copied out.
struct LayerNormGrad {
    eps: f64,
    gamma: Tensor,
    sums: bool,
}

impl candle_core::CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "atomtune-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let norm = LayerNorm { eps: self.eps };
        let g = self.gamma.flatten_all()?;
        let out = float_op!(s1.dtype(), "atomtune-layer-norm backward", |F| norm
            .backward(
                slices::<F>(s1, l1)?,
                &g.to_vec1::<F>()?,
                slices::<F>(s2, l2)?,
                self.sums,
            ));
        let len = l1.shape().elem_count() + 2 * self.gamma.elem_count();
        Ok((out, Shape::from(len)))
    }
}
