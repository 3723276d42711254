//! The fused CPU group norm (+ SiLU): the forward is two passes (statistics, then normalise,
//! scale, shift and activate) and keeps only its input; the backward recomputes the statistics.
//! Statistics are accumulated in f64; f32 loops are vectorised ([`simd_dispatch!`]).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::GroupNormConfig;
use crate::cpu::fastmath::{mean_rstd, simd_dispatch, LANES};
use crate::cpu::unpack_norm_grads;
use crate::cpu::{float_op, slices, task_len, Float};
use crate::Result;

/// The fused op on contiguous inputs of one dtype (f32 or f64).
pub(super) fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    norm: GroupNormConfig,
) -> Result<Tensor> {
    let op = GroupNorm {
        groups: norm.groups,
        eps: norm.eps,
        silu: norm.silu,
    };
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

struct GroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// `(batch, channels, elements per channel)` of `x [b, c, ...]`.
fn split_dims(x: &[usize]) -> (usize, usize, usize) {
    (x[0], x[1], x[2..].iter().product())
}

/// The per-channel loops of the op for one element type: f64 as written, f32 compiled for the
/// CPU's vector units ([`simd_dispatch!`]).
trait Rows: Float {
    /// Mean and `1 / sqrt(var + eps)` of one group's values, accumulated in f64.
    fn stats(v: &[Self], eps: f64) -> (f64, f64);
    /// `y = z` or `silu(z)`, `z = x a + b`.
    fn normalize(y: &mut [Self], x: &[Self], a: Self, b: Self, silu: bool);
    /// Writes `dz` (`dy silu'(z)` or `dy`) into `dz` and returns `(sum dz xhat, sum dz)`, where
    /// `xhat = (x - mean) rstd` and `z = xhat gamma + beta`, `k = (mean, rstd, gamma, beta)`.
    fn grad_z(dz: &mut [Self], x: &[Self], dy: &[Self], k: [Self; 4], silu: bool) -> (Self, Self);
    /// `dx = rstd (dz gamma - m1 - xhat m2)` in place of `dz`, `k = (mean, rstd, gamma, m1, m2)`.
    fn grad_x(dx: &mut [Self], x: &[Self], k: [Self; 5]);
}

impl Rows for f64 {
    fn stats(v: &[f64], eps: f64) -> (f64, f64) {
        mean_rstd(v, eps)
    }
    fn normalize(y: &mut [f64], x: &[f64], a: f64, b: f64, silu: bool) {
        normalize(y, x, a, b, silu)
    }
    fn grad_z(dz: &mut [f64], x: &[f64], dy: &[f64], k: [f64; 4], silu: bool) -> (f64, f64) {
        grad_z(dz, x, dy, k, silu)
    }
    fn grad_x(dx: &mut [f64], x: &[f64], k: [f64; 5]) {
        grad_x(dx, x, k)
    }
}

impl Rows for f32 {
    fn stats(v: &[f32], eps: f64) -> (f64, f64) {
        stats_f32(v, eps)
    }
    fn normalize(y: &mut [f32], x: &[f32], a: f32, b: f32, silu: bool) {
        normalize_f32(y, x, a, b, silu)
    }
    fn grad_z(dz: &mut [f32], x: &[f32], dy: &[f32], k: [f32; 4], silu: bool) -> (f32, f32) {
        grad_z_f32(dz, x, dy, k, silu)
    }
    fn grad_x(dx: &mut [f32], x: &[f32], k: [f32; 5]) {
        grad_x_f32(dx, x, k)
    }
}

simd_dispatch! {
    fn stats_f32(v: &[f32], eps: f64) -> (f64, f64) = mean_rstd::<f32>;
}
simd_dispatch! {
    fn normalize_f32(y: &mut [f32], x: &[f32], a: f32, b: f32, silu: bool) = normalize::<f32>;
}
simd_dispatch! {
    fn grad_z_f32(dz: &mut [f32], x: &[f32], dy: &[f32], k: [f32; 4], silu: bool) -> (f32, f32)
        = grad_z::<f32>;
}
simd_dispatch! {
    fn grad_x_f32(dx: &mut [f32], x: &[f32], k: [f32; 5]) = grad_x::<f32>;
}

#[inline(always)]
fn normalize<T: Float>(y: &mut [T], x: &[T], a: T, b: T, silu: bool) {
    if silu {
        for (o, &v) in y.iter_mut().zip(x) {
            let z = v * a + b;
            *o = z * z.sigmoid();
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * a + b;
        }
    }
}

#[inline(always)]
fn grad_z<T: Float>(dz: &mut [T], x: &[T], dy: &[T], k: [T; 4], silu: bool) -> (T, T) {
    let [mean, rstd, gamma, beta] = k;
    let (mut sg, mut sb) = ([T::zero(); LANES], [T::zero(); LANES]);
    let n = dz.len().min(x.len()).min(dy.len());
    let (dz, x, dy) = (&mut dz[..n], &x[..n], &dy[..n]);
    let one = |d: &mut T, v: T, g: T| {
        let xh = (v - mean) * rstd;
        *d = if silu {
            let z = xh * gamma + beta;
            let s = z.sigmoid();
            g * (s + z * s * (T::one() - s))
        } else {
            g
        };
        (*d * xh, *d)
    };
    let mut dzc = dz.chunks_exact_mut(LANES);
    let (mut xc, mut gc) = (x.chunks_exact(LANES), dy.chunks_exact(LANES));
    for ((d, v), g) in (&mut dzc).zip(&mut xc).zip(&mut gc) {
        for l in 0..LANES {
            let (a, b) = one(&mut d[l], v[l], g[l]);
            sg[l] = sg[l] + a;
            sb[l] = sb[l] + b;
        }
    }
    let (mut tg, mut tb) = (T::zero(), T::zero());
    let rest = dzc.into_remainder().iter_mut();
    for ((d, &v), &g) in rest.zip(xc.remainder()).zip(gc.remainder()) {
        let (a, b) = one(d, v, g);
        tg = tg + a;
        tb = tb + b;
    }
    let add = |acc: T, &x: &T| acc + x;
    (sg.iter().fold(tg, add), sb.iter().fold(tb, add))
}

#[inline(always)]
fn grad_x<T: Float>(dx: &mut [T], x: &[T], k: [T; 5]) {
    let [mean, rstd, gamma, m1, m2] = k;
    for (d, &v) in dx.iter_mut().zip(x) {
        let xh = (v - mean) * rstd;
        *d = rstd * (*d * gamma - m1 - xh * m2);
    }
}

impl GroupNorm {
    fn forward<T: Rows>(&self, x: &[T], gamma: &[T], beta: &[T], dims: &[usize]) -> Vec<T> {
        let (_, c, hw) = split_dims(dims);
        let cg = c / self.groups;
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw))
            .with_min_len(task_len(cg * hw))
            .enumerate()
            .for_each(|(bg, (yg, xg))| {
                let (mean, rstd) = T::stats(xg, self.eps);
                let g0 = (bg % self.groups) * cg;
                for (ch, (yc, xc)) in yg.chunks_exact_mut(hw).zip(xg.chunks_exact(hw)).enumerate() {
                    // z = (x - mean) rstd gamma + beta = x a + b
                    let a_f = rstd * gamma[g0 + ch].to_f64().unwrap_or(0.0);
                    let b = beta[g0 + ch].to_f64().unwrap_or(0.0) - mean * a_f;
                    let (a, b) = (T::from(a_f).unwrap(), T::from(b).unwrap());
                    T::normalize(yc, xc, a, b, self.silu);
                }
            });
        y
    }

    /// `dx`, and the per-channel sums `sum dz xhat` and `sum dz` (for `dgamma`, `dbeta`),
    /// packed as `[dx, dgamma, dbeta]`.
    fn backward<T: Rows>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        dy: &[T],
        dims: &[usize],
    ) -> Vec<T> {
        let (b, c, hw) = split_dims(dims);
        let cg = c / self.groups;
        let mut out = vec![T::zero(); x.len() + 2 * c];
        let (dx, _) = out.split_at_mut(x.len());
        // Per (batch, group): the channel sums, for dgamma and dbeta.
        let sums: Vec<Vec<(f64, f64)>> = dx
            .par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw).zip(dy.par_chunks(cg * hw)))
            .with_min_len(task_len(cg * hw))
            .enumerate()
            .map(|(bg, (dxg, (xg, dyg)))| {
                let (mean, rstd) = T::stats(xg, self.eps);
                let g0 = (bg % self.groups) * cg;
                let (tm, tr) = (T::from(mean).unwrap(), T::from(rstd).unwrap());
                let mut chan = Vec::with_capacity(cg);
                // Pass 1: dz into dx (as scratch), the group sums of dxhat and dxhat xhat.
                let (mut s1, mut s2) = (0f64, 0f64);
                for ch in 0..cg {
                    let (gm, bt) = (gamma[g0 + ch], beta[g0 + ch]);
                    let r = ch * hw..(ch + 1) * hw;
                    let k = [tm, tr, gm, bt];
                    let (sg, sb) =
                        T::grad_z(&mut dxg[r.clone()], &xg[r.clone()], &dyg[r], k, self.silu);
                    let (sg, sb) = (sg.to_f64().unwrap_or(0.0), sb.to_f64().unwrap_or(0.0));
                    let gmf = gm.to_f64().unwrap_or(0.0);
                    s1 += sb * gmf;
                    s2 += sg * gmf;
                    chan.push((sg, sb));
                }
                let n = (cg * hw) as f64;
                let (m1, m2) = (T::from(s1 / n).unwrap(), T::from(s2 / n).unwrap());
                // Pass 2: dx = rstd (dz gamma - mean(dxhat) - xhat mean(dxhat xhat)).
                for ch in 0..cg {
                    let r = ch * hw..(ch + 1) * hw;
                    T::grad_x(
                        &mut dxg[r.clone()],
                        &xg[r],
                        [tm, tr, gamma[g0 + ch], m1, m2],
                    );
                }
                chan
            })
            .collect();
        // Channel sums over the batch, in batch order (the same bits on any thread count).
        let tail = &mut out[x.len()..];
        for bi in 0..b {
            for g in 0..self.groups {
                for (ch, &(sg, sb)) in sums[bi * self.groups + g].iter().enumerate() {
                    let k = g * cg + ch;
                    tail[k] = tail[k] + T::from(sg).unwrap();
                    tail[c + k] = tail[c + k] + T::from(sb).unwrap();
                }
            }
        }
        out
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "atomtune-group-norm"
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
        let y = float_op!(s1.dtype(), "atomtune-group-norm", |F| self.forward(
            slices::<F>(s1, l1)?,
            slices::<F>(s2, l2)?,
            slices::<F>(s3, l3)?,
            l1.dims(),
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
        let op = GroupNormGrad {
            norm: GroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
            },
            dims: x.dims().to_vec(),
            gamma: gamma.detach(),
            beta: beta.detach(),
        };
        let packed = x
            .detach()
            .apply_op2_no_bwd(&dy.detach().contiguous()?, &op)?;
        unpack_norm_grads(&packed, x, gamma, beta)
    }
}

/// The backward as an op on `(x, dy)`; `gamma` and `beta` are small and copied out.
struct GroupNormGrad {
    norm: GroupNorm,
    dims: Vec<usize>,
    gamma: Tensor,
    beta: Tensor,
}

impl candle_core::CustomOp2 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "atomtune-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let out = float_op!(s1.dtype(), "atomtune-group-norm backward", |F| self
            .norm
            .backward(
                slices::<F>(s1, l1)?,
                &self.gamma.to_vec1::<F>()?,
                &self.beta.to_vec1::<F>()?,
                slices::<F>(s2, l2)?,
                &self.dims,
            ));
        let len = l1.shape().elem_count() + 2 * self.dims[1];
        Ok((out, Shape::from(len)))
    }
}
