//! The linear layer's gradients run on the bf16 kernel when bf16 products are on: each equals
//! the f64 product of the same bf16-rounded operands up to f32 sums, which an f32 product of
//! the unrounded operands misses by bf16's rounding. Its own binary: the switch is process-wide.

use candle_core::{DType, Device, Tensor, Var};

/// `n` numbers spread over [-s, s] with no bf16-exact pattern.
fn wave(n: usize, s: f64, phase: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (s * ((i as f64) * 0.7 + phase).sin() * (1.0 + 0.3 * (i as f64 * 0.13).cos())) as f32
        })
        .collect()
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Rows of `a [m, k]` times `b [k, n]` in f64, each operand first rounded to bf16.
fn rounded_product(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f64> {
    let r = |x: f32| half::bf16::from_f32(x).to_f64();
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for l in 0..k {
            let x = r(a[i * k + l]);
            for j in 0..n {
                out[i * n + j] += x * r(b[l * n + j]);
            }
        }
    }
    out
}

/// The largest difference relative to the largest reference number.
fn rel_err(got: &Tensor, want: &[f64]) -> f64 {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let size = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, w)| m.max((g as f64 - w).abs()));
    diff / size
}

fn transpose(v: &[f32], (r, c): (usize, usize)) -> Vec<f32> {
    (0..c * r).map(|i| v[(i % r) * c + i / r]).collect()
}

#[test]
fn linear_gradients_run_in_bf16_when_it_is_on() {
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    ops::cpu_bf16::set_enabled(true);
    // large enough for the bf16 kernel in both products: rows 288, din 96, dout 320
    let (m, din, dout) = (288, 96, 320);
    let (xv, wv, cv) = (
        wave(m * din, 1.0, 0.1),
        wave(dout * din, 0.5, 0.2),
        wave(m * dout, 2.0, 0.3),
    );
    let x = Var::from_tensor(&tensor(xv.clone(), (m, din))).unwrap();
    let c = tensor(cv.clone(), (m, dout));
    // dy = c: the gradient of sum(y * c)
    let grads = |w: &Tensor| {
        let y = ops::linear::linear(&x, w, None).unwrap();
        (y * &c).unwrap().sum_all().unwrap().backward().unwrap()
    };

    // a frozen bf16 weight (what --dtype bf16 keeps): dx = dy W
    let w16 = tensor(wv.clone(), (dout, din))
        .to_dtype(DType::BF16)
        .unwrap();
    let dx = grads(&w16).get(&x).unwrap().clone();
    let want = rounded_product(&cv, &wv, (m, dout, din));
    let e = rel_err(&dx, &want);
    assert!(e < 1e-5, "dx is {e} from the bf16-rounded product");

    // a tracked f32 weight (LoRA's effective weight): dW = dy^T x
    let w = Var::from_tensor(&tensor(wv, (dout, din))).unwrap();
    let dw = grads(&w).get(&w).unwrap().clone();
    let want = rounded_product(&transpose(&cv, (m, dout)), &xv, (dout, m, din));
    let e = rel_err(&dw, &want);
    assert!(e < 1e-5, "dW is {e} from the bf16-rounded product");
    ops::cpu_bf16::set_enabled(false);
}
