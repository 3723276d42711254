//! The ops' products run on the bf16 kernel when bf16 products are on: each result equals an
//! f64 computation with the same bf16-rounded operands up to f32 sums, which an f32 product of
//! the unrounded operands misses by bf16's rounding. Its own binary: the switch is process-wide
//! (every test here turns it on).

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
}

/// `x` rounded to bf16, in f64.
fn r(x: f32) -> f64 {
    half::bf16::from_f32(x).to_f64()
}

/// Head `hi` of row `i` of a `[n, heads * w]` matrix.
fn head(x: &[f32], i: usize, hi: usize, heads: usize, w: usize) -> &[f32] {
    let at = (i * heads + hi) * w;
    &x[at..at + w]
}

/// Attention as the bf16 forward computes it, in f64: scores from bf16-rounded queries and keys,
/// probabilities rounded to bf16 before they meet the (rounded) values, rows normalised by the
/// sum of the unrounded probabilities. With `round` false, exact attention.
#[allow(clippy::too_many_arguments)]
fn reference(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (n, m, heads, d): (usize, usize, usize, usize),
    scale: f64,
    round: bool,
) -> Vec<f64> {
    let rd = |x: f32| if round { r(x) } else { x as f64 };
    let mut out = vec![0f64; n * heads * d];
    for hi in 0..heads {
        for i in 0..n {
            let qi = head(q, i, hi, heads, d);
            let s: Vec<f64> = (0..m)
                .map(|j| {
                    let kj = head(k, j, hi, heads, d);
                    scale * qi.iter().zip(kj).map(|(&a, &b)| rd(a) * rd(b)).sum::<f64>()
                })
                .collect();
            let mx = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let p: Vec<f64> = s.iter().map(|&x| (x - mx).exp()).collect();
            let sum: f64 = p.iter().sum();
            for (j, &pj) in p.iter().enumerate() {
                let pj = rd(pj as f32);
                let vj = head(v, j, hi, heads, d);
                for (o, &x) in out[(i * heads + hi) * d..].iter_mut().zip(vj) {
                    *o += pj * rd(x) / sum;
                }
            }
        }
    }
    out
}

#[test]
fn attention_runs_in_bf16_when_it_is_on() {
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    ops::cpu_bf16::set_enabled(true);
    // self-attention shapes with 40-wide heads (SD 1.5's first level): keys past the bf16
    // path's threshold, a key count no panel divides, a chunk size that cuts the queries in
    // several chunks (the last one short); scores small enough that no probability lies near
    // a bf16 rounding boundary, so the f64 emulation of the roundings is exact to f32 sums
    // (measured 4e-7, against 2e-3 from exact attention)
    let (n, m, heads, d) = (150, 203, 2, 40);
    let (qv, kv, vv) = (
        wave(n * heads * d, 0.5, 0.4),
        wave(m * heads * d, 0.5, 0.5),
        wave(m * heads * d, 1.0, 0.6),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let t = |v: &[f32], rows| Tensor::from_vec(v.to_vec(), (1, rows, heads * d), &Device::Cpu);
    let (q, k, v) = (t(&qv, n).unwrap(), t(&kv, m).unwrap(), t(&vv, m).unwrap());
    for chunk_bytes in [2 << 20, 40 * 4 * m] {
        let got = ops::attention::attention_chunked(&q, &k, &v, heads, scale, chunk_bytes).unwrap();
        let dims = (n, m, heads, d);
        let e = rel_err(&got, &reference((&qv, &kv, &vv), dims, scale, true));
        assert!(
            e < 1e-5,
            "chunks of {chunk_bytes} B: {e} from the bf16-rounded attention"
        );
        // and rounding happened: exact attention is farther off (the f32 op is within 1e-6)
        let e = rel_err(&got, &reference((&qv, &kv, &vv), dims, scale, false));
        assert!((5e-4..2e-2).contains(&e), "{e} from exact attention");
    }
    // the backward (f32, from the kept log-sum-exp) stays within bf16's tolerance of exact
    // gradients (f64 inputs, which never take bf16 products), for `sum(y c)`: measured 8e-4
    // (dq), 1.3e-4 (dk), 1.0e-4 (dv) of their largest number
    let c = Tensor::from_vec(
        wave(n * heads * d, 1.0, 0.9),
        (1, n, heads * d),
        &Device::Cpu,
    );
    let c = c.unwrap();
    let grads = |dtype| {
        let as_var = |x: &Tensor| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let [q, k, v] = [&q, &k, &v].map(as_var);
        let y = ops::attention::attention(&q, &k, &v, heads, scale).unwrap();
        let loss = (y * c.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [&q, &k, &v].map(|x| {
            let g = g.get(x).unwrap().to_dtype(DType::F64).unwrap();
            g.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        })
    };
    let (got, want) = (grads(DType::F32), grads(DType::F64));
    for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
        let size = w.iter().fold(0f64, |a, &b| a.max(b.abs()));
        let diff = g.iter().zip(w).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            diff / size < 1e-2,
            "{name} differs by {} of its size",
            diff / size
        );
    }
}
