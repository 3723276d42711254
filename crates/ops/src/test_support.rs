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
