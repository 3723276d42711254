//! SD's 3x3 convs take Winograd's F(2x2, 3x3) when bf16 products are on (`ops::conv::winograd`):
//! through `ops::conv::conv2d`, with a bias and a weight in f32 or bf16, the result is as close
//! to the exact conv as the direct bf16 products' (both a few bf16 roundings off), and it is not
//! the direct conv's result; so is a frozen conv's input gradient (the transposed conv). Its own
//! binary: both switches are process-wide.

use candle_core::{DType, Device, Tensor};

/// `n` numbers of a fixed pseudo-random sequence, uniform over [-s, s] (activations and
/// weights with no pattern: a periodic one makes outputs that cancel).
fn wave(n: usize, s: f64, seed: f64) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.to_bits();
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s * (((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)) as f32
        })
        .collect()
}

/// The conv of `x [c, h, w]` with `w [o, c, 3, 3]`, padding 1, plus `bias`, in f64.
fn exact_conv(
    (x, w, bias): (&[f32], &[f32], &[f32]),
    (c, h, wd, o): (usize, usize, usize, usize),
) -> Vec<f64> {
    let mut out = vec![0f64; o * h * wd];
    for oc in 0..o {
        for oy in 0..h {
            for ox in 0..wd {
                let mut acc = bias[oc] as f64;
                for ic in 0..c {
                    for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                        let (iy, ix) = ((oy + i) as isize - 1, (ox + j) as isize - 1);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                            continue;
                        }
                        let xv = x[(ic * h + iy as usize) * wd + ix as usize] as f64;
                        acc += xv * w[((oc * c + ic) * 3 + i) * 3 + j] as f64;
                    }
                }
                out[(oc * h + oy) * wd + ox] = acc;
            }
        }
    }
    out
}

/// The root mean square of the differences relative to that of the reference numbers.
fn rms_err(got: &[f32], want: &[f64]) -> f64 {
    let size: f64 = want.iter().map(|w| w * w).sum();
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, w)| (g as f64 - w).powi(2))
        .sum();
    (diff / size).sqrt()
}

/// The switches are process-wide: the tests here take turns.
static SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// In `winograd_tiled.rs`, which includes this file, left operands tiled for AMX and their
/// products on the emulated tile unit; here, not.
fn tiles_if_included() {
    ops::cpu_bf16::amx::set_emulated(module_path!().contains("_tiled"));
}

#[test]
fn sd_sized_3x3_convs_run_winograd_when_bf16_is_on() {
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let _turn = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    tiles_if_included();
    ops::cpu_bf16::set_enabled(true);
    // past both thresholds: 257 channels (odd: a pair half empty), 70 filters, 12 x 12 tiles
    // (23 rows: the last row of tiles overhangs)
    let (c, h, wd, o) = (257, 23, 24, 70);
    let (xv, wv, bv) = (
        wave(c * h * wd, 1.0, 0.1),
        wave(o * c * 9, 0.05, 0.2),
        wave(o, 0.5, 0.3),
    );
    let x = Tensor::from_vec(xv.clone(), (1, c, h, wd), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(wv.clone(), (o, c, 3, 3), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(bv.clone(), o, &Device::Cpu).unwrap();
    let cfg = ops::conv::ConvConfig {
        stride: 1,
        padding: 1,
    };
    let want = exact_conv((&xv, &wv, &bv), (c, h, wd, o));
    let run = |w: &Tensor, winograd: bool| {
        ops::conv::winograd::set_enabled(winograd);
        let y = ops::conv::conv2d(&x, w, Some(&bias), cfg).unwrap();
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let direct = run(&w, false);
    let winograd = run(&w, true);
    let from_bf16 = run(&w.to_dtype(DType::BF16).unwrap(), true);
    let (ed, ew) = (rms_err(&direct, &want), rms_err(&winograd, &want));
    eprintln!("rms error against the exact conv: direct {ed:.2e}, Winograd {ew:.2e}");
    // both a few bf16 roundings (2^-9 = 2e-3 relative each) off, Winograd's from larger
    // transformed numbers
    assert!(ed < 4e-3 && ew < 8e-3, "direct {ed}, Winograd {ew}");
    assert!(ew < 3.0 * ed, "Winograd {ew} against direct {ed}");
    // it did run: its roundings are not the direct conv's
    assert!(direct.iter().zip(&winograd).any(|(a, b)| a != b));
    // a weight kept in bf16 gives the bits of its f32 original (what a baked bf16 weight
    // relies on)
    assert!(winograd
        .iter()
        .zip(&from_bf16)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn a_frozen_convs_input_gradient_runs_winograd_when_bf16_is_on() {
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let _turn = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    tiles_if_included();
    // 70 channels in, 257 out: the transposed conv reads 257 and writes 70
    let (c, h, wd, o) = (70, 23, 24, 257);
    let x = Tensor::from_vec(wave(c * h * wd, 1.0, 0.4), (1, c, h, wd), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(wave(o * c * 9, 0.05, 0.5), (o, c, 3, 3), &Device::Cpu).unwrap();
    let up = Tensor::from_vec(wave(o * h * wd, 1.0, 0.6), (1, o, h, wd), &Device::Cpu).unwrap();
    let cfg = ops::conv::ConvConfig {
        stride: 1,
        padding: 1,
    };
    let grad = |bf16: bool, winograd: bool| {
        ops::cpu_bf16::set_enabled(bf16);
        ops::conv::winograd::set_enabled(winograd);
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let y = ops::conv::conv2d(xv.as_tensor(), &w, None, cfg).unwrap();
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap();
        dx.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let exact: Vec<f64> = grad(false, false).iter().map(|&v| v as f64).collect();
    let (direct, winograd) = (grad(true, false), grad(true, true));
    ops::conv::winograd::set_enabled(true);
    let (ed, ew) = (rms_err(&direct, &exact), rms_err(&winograd, &exact));
    eprintln!("dx, rms error against f32: direct {ed:.2e}, Winograd {ew:.2e}");
    // as the forward: direct a few bf16 roundings off (2e-3), Winograd about twice that
    assert!(
        ed < 4e-3 && ew < 8e-3 && ew < 3.0 * ed,
        "direct {ed}, Winograd {ew}"
    );
    assert!(direct.iter().zip(&winograd).any(|(a, b)| a != b));
}
