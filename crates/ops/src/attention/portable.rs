//! The portable attention: chunks of query rows from candle tensor ops, on every device.
//!
//! Forward, per chunk of `c` query rows and every head at once (`[b h, c, m]` scores):
//! `S = scale Q_c K^T`, the row maximum `M`, `E = e^(S - M)`, its row sum `Z`,
//! `O_c = (E V) / Z`, and the row's log-sum-exp `l = M + ln Z`, the one number per query row
//! the op keeps. Backward, per chunk: `P = e^(S - l)` recomputed from the scores,
//! `dV += P^T G`, `dS = scale P (G V^T - rowsum(G O))`, `dQ_c = dS K`, `dK += dS^T Q_c`.
//! Everything is computed in f32 for half-precision inputs (f64 for f64; the products run on
//! cuBLAS on CUDA, where f32 GEMMs may use TF32), and the output is returned in the inputs'
//! dtype: the upcast happens inside the op, so the graph keeps the half-precision inputs only.
//! Memory: the inputs with their heads split (in f32, for the op's duration), and a few score
//! chunks of about `chunk_bytes` each; never a whole `[b h, n, m]` matrix.

use candle_core::{Tensor, D};

use super::Dims;
use crate::handoff::{self, Backward};
use crate::kernels::wide;
use crate::Result;

/// Bytes of f32 scores one chunk holds (`[b h, c, m]`). A chunk's forward holds about three
/// such buffers at once and its backward about five; at SD 1.5's 4096 positions and batch 2
/// (16 head rows), 128 MB is 512 query rows, big enough to keep a GPU busy.
pub(super) const CHUNK_BYTES: usize = 128 << 20;

/// `[b, n, h w]` -> `[b h, n, w]`, contiguous, in the dtype the op computes in.
fn split(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, n, hw) = x.dims3()?;
    x.detach()
        .to_dtype(wide(x.dtype()))?
        .reshape((b, n, h, hw / h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * h, n, hw / h))
}

/// `[b h, n, w]` -> `[b, n, h w]`.
fn merge(x: &Tensor, h: usize) -> Result<Tensor> {
    let (bh, n, w) = x.dims3()?;
    x.reshape((bh / h, h, n, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((bh / h, n, h * w))
}

/// Query rows per chunk so that a chunk's `[b h, rows, m]` f32 scores take about `chunk_bytes`.
pub(super) fn chunk_rows(dm: Dims, chunk_bytes: usize) -> usize {
    let row = 4 * dm.b * dm.h * dm.m.max(1);
    (chunk_bytes / row).clamp(1, dm.n.max(1))
}

/// The scaled scores of query rows `qc [b h, c, d]` against every key.
fn scores(qc: &Tensor, kh: &Tensor, scale: f64) -> Result<Tensor> {
    qc.matmul(&kh.t()?)? * scale
}

/// The op on inputs of checked shapes `dm`, with score chunks of about `chunk_bytes`.
pub(super) fn attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dm: Dims,
    scale: f64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (qh, kh, vh) = (split(q, dm.h)?, split(k, dm.h)?, split(v, dm.h)?);
    let rows = chunk_rows(dm, chunk_bytes);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for s in (0..dm.n).step_by(rows) {
        let c = rows.min(dm.n - s);
        let sc = scores(&qh.narrow(1, s, c)?, &kh, scale)?;
        let max = sc.max_keepdim(D::Minus1)?;
        let e = sc.broadcast_sub(&max)?.exp()?;
        drop(sc);
        let sum = e.sum_keepdim(D::Minus1)?;
        outs.push(e.matmul(&vh)?.broadcast_div(&sum)?);
        lses.push((max + sum.log()?)?);
    }
    let out = merge(&Tensor::cat(&outs, 1)?, dm.h)?.to_dtype(v.dtype())?;
    let grad = AttentionGrad {
        dm,
        scale,
        rows,
        log_sum_exp: Tensor::cat(&lses, 1)?,
    };
    handoff::attach(out, &[q, k, v], grad)
}

/// The backward: what the forward left (each query row's log-sum-exp, `[b h, n, 1]`, in the
/// dtype the op computes in) and how it chunked.
struct AttentionGrad {
    dm: Dims,
    scale: f64,
    rows: usize,
    log_sum_exp: Tensor,
}

/// `acc + x`, or `x` for the first chunk.
fn accumulate(acc: Option<Tensor>, x: Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match acc {
        Some(a) => (a + x)?,
        None => x,
    }))
}

impl Backward for AttentionGrad {
    fn name(&self) -> &'static str {
        "atomtune-attention-portable"
    }

    fn backward(&self, inputs: &[&Tensor], y: &Tensor, dy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let &[q, k, v] = inputs else {
            candle_core::bail!("{}: three inputs expected", self.name());
        };
        let h = self.dm.h;
        let (qh, kh, vh) = (split(q, h)?, split(k, h)?, split(v, h)?);
        let gh = split(dy, h)?;
        // rowsum(G O), per query row
        let rowsum = (&gh * split(y, h)?)?.sum_keepdim(D::Minus1)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
        for s in (0..self.dm.n).step_by(self.rows) {
            let c = self.rows.min(self.dm.n - s);
            let (qc, gc) = (qh.narrow(1, s, c)?, gh.narrow(1, s, c)?);
            let p = scores(&qc, &kh, self.scale)?
                .broadcast_sub(&self.log_sum_exp.narrow(1, s, c)?)?
                .exp()?;
            dv = accumulate(dv, p.t()?.matmul(&gc)?)?;
            let dp = gc.matmul(&vh.t()?)?;
            let ds = ((dp.broadcast_sub(&rowsum.narrow(1, s, c)?)? * p)? * self.scale)?;
            dq.push(ds.matmul(&kh)?);
            dk = accumulate(dk, ds.t()?.matmul(&qc)?)?;
        }
        let grad = |t: &Tensor, g: Option<Tensor>| -> Result<Option<Tensor>> {
            match g {
                Some(g) if t.track_op() => Ok(Some(merge(&g, h)?.to_dtype(t.dtype())?)),
                _ => Ok(None),
            }
        };
        Ok(vec![
            grad(q, Some(Tensor::cat(&dq, 1)?))?,
            grad(k, dk)?,
            grad(v, dv)?,
        ])
    }
}
