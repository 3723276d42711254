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

thread_local! {
    /// The state of this test thread's numbers: each test (a thread of its own) draws the same
    /// ones at every run, so that a tolerance it passes once it passes always (candle's
    /// `Tensor::randn` draws new ones each run: one case in many runs landed past a bound).
    static STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0x9e37_79b9_7f4a_7c15) };
}

/// Standard normal numbers of `shape` in `dtype`, on the CPU: a fixed sequence per test thread
/// (splitmix64, Box-Muller).
pub(crate) fn randn(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let uniform = || {
        STATE.with(|s| {
            let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // in (0, 1]
            ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
        })
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random numbers")
}

/// Normal numbers of mean `mean` and deviation `std` in f32: [`randn`]'s, scaled.
pub(crate) fn normal<S: Into<candle_core::Shape>>(
    mean: f32,
    std: f32,
    shape: S,
) -> candle_core::Result<Tensor> {
    let shape: candle_core::Shape = shape.into();
    randn(shape.dims(), DType::F32).affine(std as f64, mean as f64)
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
