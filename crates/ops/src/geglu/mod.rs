//! GEGLU, `h * gelu(g)` for `[h, g]` the two halves of the last axis, as one op.
//!
//! Composed from candle ops ([`geglu_slow`]) it is two strided views, an erf-GELU, a product
//! and, backward, a GELU derivative built from half a dozen full-size ops plus two zero-padded
//! copies of the input (the backward of each view). Here the op keeps only its input, and the
//! backward computes `[dy gelu(g), dy h gelu'(g)]` in the input's layout, with
//! `gelu(x) = x Phi(x)` and `gelu'(x) = Phi(x) + x phi(x)` (`Phi`, `phi`: the standard normal
//! CDF and density): by the fused CPU kernel (`fused.rs`) or from candle ops on every device
//! (`portable.rs`, in f32 for half precision).

use candle_core::{Tensor, D};

use crate::kernels;
use crate::Result;

mod fused;
mod portable;

/// `x [..., 2n]` -> `x[..., :n] * gelu(x[..., n:])`, `[..., n]` (diffusers' `GEGLU`, exact GELU).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let two_n = x.dim(D::Minus1)?;
    if two_n % 2 != 0 {
        candle_core::bail!("GEGLU needs an even last axis, got {:?}", x.dims());
    }
    if kernels::fused(&[x])? {
        fused::geglu(x)
    } else {
        portable::geglu(x)
    }
}

/// The same from candle ops and candle's autograd: the reference.
pub fn geglu_slow(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? / 2;
    let h = x.narrow(D::Minus1, 0, n)?;
    let g = x.narrow(D::Minus1, n, n)?;
    h * g.gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{check_half_precision, max_abs, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Device, Var};

    #[test]
    fn each_kernel_equals_the_composed_form_and_its_gradient() {
        for (kernels, dtype) in Kernels::ALL
            .into_iter()
            .flat_map(|k| [(k, DType::F32), (k, DType::F64)])
        {
            let x = Var::from_tensor(
                &(crate::test_support::normal(0f32, 1.5, (2, 3, 10)).unwrap())
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let fast = kernels.scope(|| geglu(&x).unwrap());
            let slow = geglu_slow(&x).unwrap();
            assert_eq!(fast.dims(), &[2, 3, 5]);
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-10 };
            assert!(diff(&fast, &slow) < tol, "{kernels} {dtype:?} forward");
            let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
            // candle's own GELU derivative is good to ~1e-6 in f64; finite differences below
            // hold ours to 1e-8.
            let e = diff(gf.get(&x).unwrap(), gs.get(&x).unwrap());
            assert!(e < 1e-5, "{kernels} {dtype:?} backward {e}");
        }
    }

    #[test]
    fn the_gradient_equals_central_differences_in_f64() {
        for kernels in Kernels::ALL {
            kernels.scope(gradient_equals_central_differences);
        }
    }

    fn gradient_equals_central_differences() {
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

    /// Half precision (the portable form, in f32 inside): within the dtype's rounding.
    #[test]
    fn half_precision_stays_close_to_f32() {
        let x = crate::test_support::normal(0f32, 1.5, (2, 5, 16)).unwrap();
        check_half_precision(
            &x,
            |x| geglu_slow(x).unwrap(),
            |x, _| geglu(x).unwrap(),
            &[(DType::F16, 4e-3), (DType::BF16, 3e-2)],
        );
    }

    #[test]
    fn an_odd_last_axis_is_an_error() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(geglu(&x).is_err());
    }
}
