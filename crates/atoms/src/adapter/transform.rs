//! `W' = Wr @ T`: every filter of a weight times a `d x d` matrix (one per input group when `T`
//! is `[g, d, d]`), as one op.
//!
//! Built from plain candle ops (`reshape`, `matmul`, `reshape`) and candle's autograd, this costs
//! little forward but a lot backward: candle's autograd computes the gradient of the frozen
//! weight too (a full-size matmul) and each reshape node allocates a zero tensor to add the
//! incoming gradient into, so for the 589M conv weights of SD 1.5 the backward took 9 s. Here a
//! conv's `Wr T` is ops' linear op over the filter rows (a parallel gemm on the CPU), and the
//! other layouts (grouped `T`, linear blocks) run the product on the detached inputs from candle
//! ops and enter the graph through [`ops::handoff`]; both backwards compute only
//! `dL/dT = Wr^T dL/dW'` (and `dL/dWr = dL/dW' T^T` should the weight itself be tracked).

use candle_core::Tensor;
use ops::handoff::{self, Backward};

use crate::{Error, Layout, Result};

/// `W'` with every filter `f` of `w` (shaped like the weight) replaced by `Wr[f] @ T[group(f)]`;
/// `t` is `[d, d]` (one transform for all) or `[g, d, d]` (one per input group).
pub(crate) fn transform_filters(w: &Tensor, t: &Tensor, layout: &Layout) -> Result<Tensor> {
    let d = layout.filter_dim();
    let grouped = t.rank() == 3;
    let want: Vec<usize> = if grouped {
        vec![layout.groups(), d, d]
    } else {
        vec![d, d]
    };
    if t.dims() != want.as_slice()
        || w.dims() != layout.shape().as_slice()
        || w.dtype() != t.dtype()
    {
        return Err(Error::invalid(
            "filter transform",
            format!("{:?} x {:?}", w.dims(), t.dims()),
            format!("expected {layout} and {want:?} of one dtype"),
        ));
    }
    if !grouped && layout.is_conv() {
        // A conv's filters are the rows of a free reshape, `Wr [co ci, d]`, and `Wr T` is the
        // linear layer `Wr (T^T)^T`: ops' linear op (one parallel gemm on the CPU, candle's
        // matmul elsewhere), whose backward computes only the transform's gradient. (candle's
        // own matmul of this skinny shape took 2.5x as long for SD 1.5's convs: the
        // effective_weight bench.)
        let wr = layout.to_filters(w)?;
        return layout.from_filters(&ops::linear::linear(&wr, &t.t()?, None)?);
    }
    let y = composed(&w.detach(), &t.detach(), layout)?;
    let grad = FilterTransformGrad { layout: *layout };
    Ok(handoff::attach(y, &[w, t], grad)?)
}

/// The same product from plain candle ops (every device; with candle's autograd, the reference
/// for the op).
pub(crate) fn composed(w: &Tensor, t: &Tensor, layout: &Layout) -> Result<Tensor> {
    if t.rank() == 3 {
        layout.from_grouped(&layout.to_grouped(w)?.matmul(t)?)
    } else {
        layout.from_filters(&layout.to_filters(w)?.matmul(t)?)
    }
}

/// `W' = Wr @ T` is linear in both: `dL/dT = Wr^T @ dL/dW'` and `dL/dWr = dL/dW' @ T^T` (per
/// group when grouped), each only when its input is tracked.
struct FilterTransformGrad {
    layout: Layout,
}

impl FilterTransformGrad {
    fn grads(&self, w: &Tensor, t: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let l = &self.layout;
        let (wd, td) = (w.detach(), t.detach());
        let grad = grad.detach().to_dtype(td.dtype())?;
        let (wm, gm) = if t.rank() == 3 {
            (l.to_grouped(&wd)?, l.to_grouped(&grad)?)
        } else {
            (l.to_filters(&wd)?, l.to_filters(&grad)?)
        };
        let last = wm.rank() - 1;
        let dt = if t.track_op() {
            Some(wm.transpose(last - 1, last)?.matmul(&gm)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dwm = gm.matmul(&td.transpose(last - 1, last)?)?;
            Some(if t.rank() == 3 {
                l.from_grouped(&dwm)?
            } else {
                l.from_filters(&dwm)?
            })
        } else {
            None
        };
        Ok(vec![dw, dt])
    }
}

impl Backward for FilterTransformGrad {
    fn name(&self) -> &'static str {
        "atoms-filter-transform"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let &[w, t] = inputs else {
            candle_core::bail!("{}: two inputs expected", self.name());
        };
        self.grads(w, t, dy).map_err(candle_core::Error::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Block;
    use candle_core::{DType, Device, Var};

    #[test]
    fn the_op_equals_the_composed_form_forward_and_backward() {
        // The weight is tracked too here, to check its gradient; adapters keep it frozen.
        let cases: [(&[usize], Block); 4] = [
            (&[6, 5, 3, 3], Block::default()),
            (&[7, 3, 1, 1], Block::default()),
            (&[4, 3, 3, 2], Block::default()),
            (&[8, 12], Block { rows: 2, cols: 4 }),
        ];
        for dtype in [DType::F32, DType::F64] {
            for (shape, block) in cases {
                let layout = Layout::from_shape(shape, block).unwrap();
                let d = layout.filter_dim();
                let w = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for grouped in [false, true] {
                    let tdims = if grouped {
                        vec![layout.groups(), d, d]
                    } else {
                        vec![d, d]
                    };
                    let t = Tensor::randn(0f32, 1.0, tdims, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let g = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let v = Var::from_tensor(&t).unwrap();
                    let wv = Var::from_tensor(&w).unwrap();
                    let fast = transform_filters(&wv, v.as_tensor(), &layout).unwrap();
                    let slow = composed(&wv, v.as_tensor(), &layout).unwrap();
                    let diff = |a: &Tensor, b: &Tensor| {
                        let e = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                        e.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
                    };
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert!(
                        diff(&fast, &slow) < tol,
                        "{layout} grouped={grouped} {dtype:?}"
                    );
                    let gf = (fast * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (slow * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, x) in [("dT", &v), ("dW", &wv)] {
                        let (a, b) = (gf.get(x).unwrap(), gs.get(x).unwrap());
                        assert!(
                            diff(a, b) < tol * 10.0,
                            "{layout} grouped={grouped} {dtype:?}: {name}"
                        );
                    }
                }
            }
        }
    }
}
