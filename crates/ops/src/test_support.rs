//! Helpers for this crate's unit tests of custom ops against their composed forms.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

/// The largest absolute entry of `t`, in f64.
pub(crate) fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_dtype(DType::F64))
        .and_then(|a| a.to_scalar::<f64>())
        .expect("a tensor of numbers")
}

/// `max |a - b| / max |b|`: the error of `a` relative to the scale of the reference `b`.
pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).expect("same shapes")) / max_abs(b).max(1e-30)
}

/// Standard normal numbers of `shape` in `dtype`, on the CPU.
pub(crate) fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random numbers")
}

/// The gradients of `sum(fast * m)` and of `sum(slow * m)` for one random `m` of their shape and
/// dtype: a backward that weighs every output differently, to compare an op's gradients with
/// those of its reference form.
pub(crate) fn weighted_grads(fast: &Tensor, slow: &Tensor) -> (GradStore, GradStore) {
    let m = randn(fast.dims(), fast.dtype());
    let grads = |y: &Tensor| {
        (y * &m)
            .and_then(|p| p.sum_all())
            .and_then(|l| l.backward())
            .expect("a backward")
    };
    (grads(fast), grads(slow))
}

/// Checks that `op` on `x` in f16 and in bf16 stays within each dtype's `tol` of its f32 reference
/// `slow` (relative to the scale): the output, and the input gradient (within 4 `tol`) for one
/// random weighting of the output. `op` gets the dtype to put its other inputs in.
pub(crate) fn check_half_precision(
    x: &Tensor,
    slow: impl Fn(&Tensor) -> Tensor,
    op: impl Fn(&Tensor, DType) -> Tensor,
    tols: &[(DType, f64)],
) {
    let xv = candle_core::Var::from_tensor(x).expect("a variable");
    let want = slow(&xv);
    let m = randn(want.dims(), DType::F32);
    let grads = |y: &Tensor| {
        (y * &m)
            .and_then(|p| p.sum_all())
            .and_then(|l| l.backward())
            .expect("a backward")
    };
    let gw = grads(&want);
    for &(dtype, tol) in tols {
        let xh = candle_core::Var::from_tensor(&x.to_dtype(dtype).expect("a cast")).expect("var");
        let y = op(&xh, dtype);
        assert_eq!(y.dtype(), dtype);
        let y = y.to_dtype(DType::F32).expect("a cast");
        let e = max_rel(&y, &want);
        assert!(e < tol, "{dtype:?} forward {e}");
        let dx = grads(&y).get(&xh).expect("a gradient").to_dtype(DType::F32);
        let e = max_rel(&dx.expect("a cast"), gw.get(&xv).expect("a gradient"));
        assert!(e < tol * 4.0, "{dtype:?} dx {e}");
    }
}
