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

/// The root mean square of the differences relative to that of the reference numbers: a few
/// bf16 roundings that flip (an f32 sum a hair on the other side of a rounding boundary than
/// f64's) move the largest difference, not this.
fn rms_err(got: &Tensor, want: &[f64]) -> f64 {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let size: f64 = want.iter().map(|w| w * w).sum();
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, w)| (g as f64 - w).powi(2))
        .sum();
    (diff / size).sqrt()
}

fn transpose(v: &[f32], (r, c): (usize, usize)) -> Vec<f32> {
    (0..c * r).map(|i| v[(i % r) * c + i / r]).collect()
}

/// Turns the bf16 products on where the CPU has them (and, in `bf16_tiled.rs`'s copy of these
/// tests, their tiles: [`tiles_if_included`]); says the test is skipped (and returns false)
/// where it does not.
fn bf16_on() -> bool {
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return false;
    }
    ops::cpu_bf16::set_enabled(true);
    tiles_if_included();
    true
}

/// In `bf16_tiled.rs`, which includes this file, left operands tiled for AMX and their
/// products on the emulated tile unit; here, not.
fn tiles_if_included() {
    ops::cpu_bf16::amx::set_emulated(module_path!().contains("_tiled"));
}

/// Whether left operands are tiled now: emulated in `bf16_tiled.rs`'s copy of the tests, or on
/// the CPU's AMX tiles where they were asked for (`ATOMTUNE_CPU_AMX=1`).
fn tiled() -> bool {
    ops::cpu_bf16::amx::active()
}

#[test]
fn linear_gradients_run_in_bf16_when_it_is_on() {
    if !bf16_on() {
        return;
    }
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

/// A linear layer that keeps its frozen weight's panels gives the bits of one that packs them at
/// every call, forward and input gradient, at its first call and after; another weight through
/// the same cache is not served the first one's panels; a tracked weight keeps nothing, nor
/// do a product of many rows and inference (unless asked); a cache whose weight keeps changing
/// gives up.
#[test]
fn kept_weight_panels_give_the_same_bits() {
    if !bf16_on() {
        return;
    }
    ops::weight_cache::set_enabled(true);
    let (m, din, dout) = (256, 288, 320);
    let x = Var::from_tensor(&tensor(wave(m * din, 1.0, 0.1), (m, din))).unwrap();
    let c = tensor(wave(m * dout, 2.0, 0.3), (m, dout));
    let run = |w: &Tensor, cache: Option<&ops::WeightCache>| {
        let y = ops::linear::linear_cached(&x, w, None, cache).unwrap();
        let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(&x).unwrap();
        [&y, dx].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let weight = |phase: f64| tensor(wave(dout * din, 0.5, phase), (dout, din));
    let cache = ops::WeightCache::new();
    for w in [weight(0.2).to_dtype(DType::BF16).unwrap(), weight(0.4)] {
        let want = run(&w, None);
        for call in 0..2 {
            assert!(
                run(&w, Some(&cache)) == want,
                "call {call} of {:?}",
                w.dtype()
            );
        }
        // both uses kept, each the weight's size in bf16 (no padding at these sizes)
        assert_eq!(cache.bytes(), 2 * din * dout * 2, "{:?}", w.dtype());
    }
    let tracked = Var::from_tensor(&weight(0.6)).unwrap();
    let kept = cache.bytes();
    assert!(run(&tracked, Some(&cache)) == run(&tracked, None));
    assert_eq!(
        cache.bytes(),
        kept,
        "a tracked weight's panels are not kept"
    );
    for phase in [0.8, 1.0, 1.2] {
        let w = weight(phase);
        assert!(run(&w, Some(&cache)) == run(&w, None), "weight {phase}");
    }
    assert_eq!(
        cache.bytes(),
        0,
        "a cache whose weight keeps changing keeps nothing"
    );

    // past MAX_ROWS rows, and in inference (no input tracked), the products pack as usual
    let rows = ops::weight_cache::MAX_ROWS + 8;
    let many = Var::from_tensor(&tensor(wave(rows * din, 1.0, 0.5), (rows, din))).unwrap();
    let (w, cache) = (weight(0.2), ops::WeightCache::new());
    for (x, what) in [(many.as_tensor(), "520 rows"), (&x.detach(), "inference")] {
        let y = ops::linear::linear_cached(x, &w, None, Some(&cache)).unwrap();
        let want = ops::linear::linear(x, &w, None).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        assert_eq!(cache.bytes(), 0, "{what} keeps nothing");
    }
    // asked to (`atomtune sample --keep-packed-weights`), inference keeps the forward's panels,
    // with the same bits
    ops::weight_cache::set_in_inference(true);
    let (x, cache) = (x.detach(), ops::WeightCache::new());
    let want = ops::linear::linear(&x, &w, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for call in 0..2 {
        let y = ops::linear::linear_cached(&x, &w, None, Some(&cache)).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            want,
            "call {call} in inference"
        );
    }
    ops::weight_cache::set_in_inference(false);
    assert_eq!(cache.bytes(), din * dout * 2, "inference keeps when asked");
}

/// An atoms-adapted conv whose layer keeps its weight's panels (the forward's `W` on
/// transformed columns, the backward's `W^T`) gives the bits of one that packs them at every
/// call: output, `dx` and `dT`, at its first call and after.
#[test]
fn an_adapted_conv_with_kept_panels_gives_the_same_bits() {
    if !bf16_on() {
        return;
    }
    ops::weight_cache::set_enabled(true);
    // more filters than pixels (the forward multiplies W by the transformed columns), both
    // products worth bf16, 8 x 8 pixels
    let (c, o, h, wd) = (40, 264, 8, 8);
    let dev = &Device::Cpu;
    let x = Var::from_tensor(
        &Tensor::from_vec(wave(c * h * wd, 1.0, 0.1), (1, c, h, wd), dev).unwrap(),
    )
    .unwrap();
    let t = Var::from_tensor(&Tensor::from_vec(wave(81, 0.5, 0.4), (9, 9), dev).unwrap()).unwrap();
    let dy = Tensor::from_vec(wave(o * h * wd, 1.0, 0.6), (1, o, h, wd), dev).unwrap();
    let cfg = ops::conv::ConvConfig {
        stride: 1,
        padding: 1,
    };
    let transform = ops::conv::FilterTransform::Matrix(t.as_tensor().clone());
    let run = |w: &Tensor, cache: Option<&ops::WeightCache>| {
        let y =
            ops::conv::conv2d_transformed_cached(x.as_tensor(), w, None, &transform, cfg, cache)
                .unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        [&y, g.get(&x).unwrap(), g.get(&t).unwrap()]
            .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let w = Tensor::from_vec(wave(o * c * 9, 0.3, 0.2), (o, c, 3, 3), dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let want = run(&w, None);
    let cache = ops::WeightCache::new();
    for call in 0..2 {
        assert!(run(&w, Some(&cache)) == want, "call {call}");
    }
    // W [o, 9c] in panels of 12 rows (o rounded up to 264), W^T [9c, o] (9c = 360 rows); tiled,
    // each panel's depth in whole groups of 32
    let depth = |k: usize| if tiled() { k.next_multiple_of(32) } else { k };
    assert_eq!(cache.bytes(), (264 * depth(9 * c) + 9 * c * depth(o)) * 2);
}

/// A conv of `x [c, h, w]` (one image) with `w [o, c, 3, 3]` at `stride`, padding 1, plus
/// `bias`, in f64 from bf16-rounded operands: `[o, ho, wo]`.
fn rounded_conv(
    (x, w, bias): (&[f32], &[f32], &[f32]),
    (c, h, wd, o): (usize, usize, usize, usize),
    stride: usize,
) -> Vec<f64> {
    let (ho, wo) = ((h + 2 - 3) / stride + 1, (wd + 2 - 3) / stride + 1);
    let mut out = vec![0f64; o * ho * wo];
    for oc in 0..o {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut acc = bias[oc] as f64;
                for ic in 0..c {
                    for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                        let (iy, ix) = (
                            (oy * stride + i) as isize - 1,
                            (ox * stride + j) as isize - 1,
                        );
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                            continue;
                        }
                        let xv = x[(ic * h + iy as usize) * wd + ix as usize];
                        acc += r(xv) * r(w[((oc * c + ic) * 3 + i) * 3 + j]);
                    }
                }
                out[(oc * ho + oy) * wo + ox] = acc;
            }
        }
    }
    out
}

#[test]
fn convolutions_run_in_bf16_when_it_is_on() {
    if !bf16_on() {
        return;
    }
    // past the bf16 threshold (k = 37 * 9 = 333, odd: a pair straddles two channels; o 70);
    // 13 wide (panels of 32 pixels span output rows) and stride 2 (19 -> 10 wide)
    let (c, o) = (37, 70);
    for (h, wd, stride) in [(13, 13, 1), (19, 20, 2), (9, 40, 1)] {
        let (xv, wv, bv) = (
            wave(c * h * wd, 1.0, 0.1),
            wave(o * c * 9, 0.3, 0.2),
            wave(o, 0.5, 0.3),
        );
        let x = Tensor::from_vec(xv.clone(), (1, c, h, wd), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(wv.clone(), (o, c, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(bv.clone(), o, &Device::Cpu).unwrap();
        let cfg = ops::conv::ConvConfig { stride, padding: 1 };
        let want = rounded_conv((&xv, &wv, &bv), (c, h, wd, o), stride);
        let mut outputs = Vec::new();
        for (what, w) in [
            ("f32", w.clone()),
            ("bf16", w.to_dtype(DType::BF16).unwrap()),
        ] {
            let y = ops::conv::conv2d(&x, &w, Some(&bias), cfg).unwrap();
            let e = rel_err(&y, &want);
            assert!(
                e < 1e-5,
                "{h}x{wd} stride {stride}, {what} weight: {e} from the bf16-rounded conv"
            );
            outputs.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        // an f32 weight and its bf16 rounding give the same bits (what a weight baked for
        // inference in bf16 relies on: `Layers::bake`)
        assert!(
            outputs[0]
                .iter()
                .zip(&outputs[1])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{h}x{wd} stride {stride}: f32 and bf16 weights differ"
        );
    }
}

/// An atoms-adapted conv's backward with bf16 products (`W^T dy` a group of input channels
/// at a time): its `dT` and `dx` against f64 from bf16-rounded `W` and `dy` (the product's
/// operands), with the transform's mixing, `dT`'s sums and the scatter onto `dx` unrounded.
#[test]
fn adapted_conv_backward_runs_in_bf16_when_it_is_on() {
    if !bf16_on() {
        return;
    }
    // `o` past 256: `W^T dy` (inner size o) is worth bf16; 13 x 11 output pixels
    let (c, o, h, wd) = (30, 260, 13, 11);
    let (xv, wv, tv, gv) = (
        wave(c * h * wd, 1.0, 0.1),
        wave(o * c * 9, 0.3, 0.2),
        wave(81, 0.5, 0.4),
        wave(o * h * wd, 1.0, 0.6),
    );
    let dev = &Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (1, c, h, wd), dev).unwrap()).unwrap();
    let t = Var::from_tensor(&Tensor::from_vec(tv.clone(), (9, 9), dev).unwrap()).unwrap();
    let w = Tensor::from_vec(wv.clone(), (o, c, 3, 3), dev).unwrap();
    let dy = Tensor::from_vec(gv.clone(), (1, o, h, wd), dev).unwrap();
    let cfg = ops::conv::ConvConfig {
        stride: 1,
        padding: 1,
    };
    let transform = ops::conv::FilterTransform::Matrix(t.as_tensor().clone());
    let y = ops::conv::conv2d_transformed(x.as_tensor(), &w, None, &transform, cfg).unwrap();
    let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();

    let npix = h * wd;
    // dcols'[c 9 + j, p] = sum_o W[o, c, j] dy[o, p], operands rounded
    let dcp = rounded_product(&transpose(&wv, (o, c * 9)), &gv, (c * 9, o, npix));
    // the input's im2col matrix, padding 1
    let at = |ci: usize, y: isize, x: isize| -> f64 {
        if y < 0 || x < 0 || y >= h as isize || x >= wd as isize {
            0.0
        } else {
            xv[(ci * h + y as usize) * wd + x as usize] as f64
        }
    };
    let (mut dt, mut dx) = (vec![0f64; 81], vec![0f64; c * h * wd]);
    for ci in 0..c {
        for p in 0..npix {
            let (oy, ox) = ((p / wd) as isize, (p % wd) as isize);
            for j in 0..9 {
                let g = dcp[(ci * 9 + j) * npix + p];
                for l in 0..9 {
                    dt[j * 9 + l] +=
                        g * at(ci, oy + (l / 3) as isize - 1, ox + (l % 3) as isize - 1);
                }
            }
            // dcols[c 9 + l, p] = sum_j T[j, l] dcols'[c 9 + j, p], scattered onto the input
            for l in 0..9 {
                let (iy, ix) = (oy + (l / 3) as isize - 1, ox + (l % 3) as isize - 1);
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                    continue;
                }
                let v: f64 = (0..9)
                    .map(|j| tv[j * 9 + l] as f64 * dcp[(ci * 9 + j) * npix + p])
                    .sum();
                dx[(ci * h + iy as usize) * wd + ix as usize] += v;
            }
        }
    }
    let e = rel_err(grads.get(&t).unwrap(), &dt);
    assert!(e < 1e-5, "dT is {e} from the bf16-rounded backward");
    let e = rel_err(grads.get(&x).unwrap(), &dx);
    assert!(e < 1e-5, "dx is {e} from the bf16-rounded backward");
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

/// Keys per block of the bf16 attention (its `KEY_BLOCK`): the forward's online softmax rounds
/// each block's probabilities at the running row maximum.
const KEY_BLOCK: usize = 288;

/// Attention as the bf16 forward computes it, in f64: scores from bf16-rounded queries and keys;
/// keys in blocks of [`KEY_BLOCK`], each block's probabilities `e^(s - mx)` at the running row
/// maximum `mx` rounded to bf16 before they meet the (rounded) values, the sums so far rescaled
/// when the maximum rises; rows normalised by the sum of the unrounded probabilities. With
/// `round` false, exact attention.
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
            let (mut mx, mut sum, mut o) = (f64::NEG_INFINITY, 0f64, vec![0f64; d]);
            for j0 in (0..m).step_by(KEY_BLOCK) {
                let block = j0..(j0 + KEY_BLOCK).min(m);
                let new = s[block.clone()].iter().fold(mx, |a, &b| a.max(b));
                let alpha = (mx - new).exp();
                sum *= alpha;
                o.iter_mut().for_each(|x| *x *= alpha);
                for j in block {
                    let p = (s[j] - new).exp();
                    sum += p;
                    let (p, vj) = (rd(p as f32), head(v, j, hi, heads, d));
                    for (o, &x) in o.iter_mut().zip(vj) {
                        *o += p * rd(x);
                    }
                }
                mx = new;
            }
            for (dst, x) in out[(i * heads + hi) * d..].iter_mut().zip(o) {
                *dst = x / sum;
            }
        }
    }
    out
}

/// The gradients of `sum(y c)` for attention `y` as the bf16 backward computes them, in f64:
/// probabilities `P` from bf16-rounded queries and keys, then each product of the backward on
/// bf16-rounded operands (`dV = P^T c`, `dP = c V^T`, `dQ = dS K`, `dK = dS^T Q`), `P` and
/// `dS = scale P (dP - rowsum(c y))` themselves unrounded; `y` is the forward's output.
/// With `round` false, exact gradients.
fn reference_grads(
    [q, k, v, c, y]: [&[f32]; 5],
    (n, m, heads, d): (usize, usize, usize, usize),
    scale: f64,
    round: bool,
) -> [Vec<f64>; 3] {
    let rd = |x: f64| if round { r(x as f32) } else { x };
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; n * heads * d],
        vec![0f64; m * heads * d],
        vec![0f64; m * heads * d],
    );
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| rd(x as f64) * rd(y as f64))
            .sum()
    };
    for hi in 0..heads {
        for i in 0..n {
            let (qi, ci) = (head(q, i, hi, heads, d), head(c, i, hi, heads, d));
            let s: Vec<f64> = (0..m)
                .map(|j| scale * dot(qi, head(k, j, hi, heads, d)))
                .collect();
            let mx = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = mx + s.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln();
            let at = (i * heads + hi) * d;
            let rowsum: f64 = ci
                .iter()
                .zip(&y[at..at + d])
                .map(|(&g, &o)| g as f64 * o as f64)
                .sum();
            for (j, &sj) in s.iter().enumerate() {
                let p = (sj - lse).exp();
                let (kj, vj) = (head(k, j, hi, heads, d), head(v, j, hi, heads, d));
                let ds = scale * p * (dot(ci, vj) - rowsum);
                let jt = (j * heads + hi) * d;
                for l in 0..d {
                    dv[jt + l] += rd(p) * rd(ci[l] as f64);
                    dq[at + l] += rd(ds) * rd(kj[l] as f64);
                    dk[jt + l] += rd(ds) * rd(qi[l] as f64);
                }
            }
        }
    }
    [dq, dk, dv]
}

#[test]
fn attention_runs_in_bf16_when_it_is_on() {
    if !bf16_on() {
        return;
    }
    // self-attention shapes with 40-wide heads (SD 1.5's first level): keys past the bf16
    // path's threshold, a key count no panel divides, a chunk size that cuts the queries in
    // several chunks (the last one short); scores small enough that no probability lies near
    // a bf16 rounding boundary, so the f64 emulation of the roundings is exact to f32 sums
    // (measured 4e-7, against 2e-3 from exact attention); 77 keys: a cross-attention's text
    for m in [77, 203, 600] {
        attention_case(150, m);
    }
}

/// [`attention_runs_in_bf16_when_it_is_on`] with `n` queries and `m` keys.
fn attention_case(n: usize, m: usize) {
    let (heads, d) = (2, 40);
    let (qv, kv, vv) = (
        wave(n * heads * d, 0.5, 0.4),
        wave(m * heads * d, 0.5, 0.5),
        wave(m * heads * d, 1.0, 0.6),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let t = |v: &[f32], rows| Tensor::from_vec(v.to_vec(), (1, rows, heads * d), &Device::Cpu);
    let (q, k, v) = (t(&qv, n).unwrap(), t(&kv, m).unwrap(), t(&vv, m).unwrap());
    let got = ops::attention::attention(&q, &k, &v, heads, scale).unwrap();
    let dims = (n, m, heads, d);
    // up to f32 sums and a few flipped roundings: the forward's exponential (relative error
    // 2.7e-6) puts probabilities within that of a bf16 rounding boundary on its other side
    let want = reference((&qv, &kv, &vv), dims, scale, true);
    let (e, rms) = (rel_err(&got, &want), rms_err(&got, &want));
    eprintln!("{m} keys: {e:e} (rms {rms:e}) from the bf16-rounded attention");
    assert!(
        rms < 1e-5 && e < 5e-4,
        "{m} keys: {e} (rms {rms}) from the bf16-rounded attention"
    );
    // and rounding happened: exact attention is farther off (the f32 op is within 1e-6)
    let e = rel_err(&got, &reference((&qv, &kv, &vv), dims, scale, false));
    assert!(
        (5e-4..2e-2).contains(&e),
        "{m} keys: {e} from exact attention"
    );
    // the backward: each gradient equals the f64 emulation of its roundings up to f32 sums and
    // a few flipped roundings (measured rms up to 9e-6, largest up to 1.9e-4, at 600 keys: the
    // exponentials' 1e-7 errors flip the rounding of probabilities that lie that close to a
    // bf16 boundary; the f32 backward is 5.6e-4 off), and rounding happened (exact gradients:
    // rms 5.1e-4..8.2e-4)
    let c = wave(n * heads * d, 1.0, 0.9);
    let as_var = |x: &Tensor| Var::from_tensor(x).unwrap();
    let [qv_, kv_, vv_] = [&q, &k, &v].map(as_var);
    let y = ops::attention::attention(&qv_, &kv_, &vv_, heads, scale).unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let loss = (&y * t(&c, n).unwrap()).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let dims = (n, m, heads, d);
    let args = [&qv[..], &kv[..], &vv[..], &c[..], &yv[..]];
    let (want, exact) = (
        reference_grads(args, dims, scale, true),
        reference_grads(args, dims, scale, false),
    );
    for (i, (name, x)) in [("dq", &qv_), ("dk", &kv_), ("dv", &vv_)]
        .into_iter()
        .enumerate()
    {
        let got = g.get(x).unwrap();
        let (e, rms) = (rel_err(got, &want[i]), rms_err(got, &want[i]));
        let off = rms_err(got, &exact[i]);
        eprintln!("{name}: {e:e} (rms {rms:e}) from the rounded reference, rms {off:e} from exact");
        assert!(
            rms < 2e-5,
            "{name} is {rms} (rms) from the bf16-rounded backward"
        );
        assert!(e < 4e-4, "{name} is {e} from the bf16-rounded backward");
        assert!(
            (2e-4..2e-2).contains(&off),
            "{name} is {off} (rms) from exact gradients"
        );
    }
}

/// Keys or values that are not tracked (a cross-attention's kept text projections) get no
/// gradient, their products skipped, and the others' gradients are the same bits: on the bf16
/// path (40-wide heads, 77 and 203 keys) and the f32 one (narrow heads).
#[test]
fn untracked_keys_and_values_get_no_gradient() {
    if !bf16_on() {
        return;
    }
    for (n, m, d) in [(150, 77, 40), (100, 203, 40), (50, 30, 8)] {
        let heads = 2;
        let t = |v: Vec<f32>, rows| Tensor::from_vec(v, (1, rows, heads * d), &Device::Cpu);
        let q = t(wave(n * heads * d, 0.5, 0.4), n).unwrap();
        let k = t(wave(m * heads * d, 0.5, 0.5), m).unwrap();
        let v = t(wave(m * heads * d, 1.0, 0.6), m).unwrap();
        let c = t(wave(n * heads * d, 1.0, 0.9), n).unwrap();
        let bits = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // (dq, dk, dv) with k and v tracked or not
        let grads = |track_k: bool, track_v: bool| {
            let var = |x: &Tensor| Var::from_tensor(x).unwrap();
            let (qv, kv, vv) = (var(&q), var(&k), var(&v));
            let kt = if track_k {
                kv.as_tensor().clone()
            } else {
                k.clone()
            };
            let vt = if track_v {
                vv.as_tensor().clone()
            } else {
                v.clone()
            };
            let y = ops::attention::attention(qv.as_tensor(), &kt, &vt, heads, 0.3).unwrap();
            let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |x: &Var| g.get(x.as_tensor()).map(bits);
            (get(&qv).expect("dq"), get(&kv), get(&vv))
        };
        let all = grads(true, true);
        for (track_k, track_v) in [(false, false), (true, false), (false, true)] {
            let (dq, dk, dv) = grads(track_k, track_v);
            let case = (n, m, d, track_k, track_v);
            assert_eq!(dq, all.0, "{case:?}: dq");
            assert_eq!(dk.is_some(), track_k, "{case:?}: dk");
            assert_eq!(dv.is_some(), track_v, "{case:?}: dv");
            if let Some(dk) = dk {
                assert_eq!(Some(dk), all.1, "{case:?}: dk");
            }
            if let Some(dv) = dv {
                assert_eq!(Some(dv), all.2, "{case:?}: dv");
            }
        }
    }
}
