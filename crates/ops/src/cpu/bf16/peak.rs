//! The micro-kernel's rate on one core with its panels in L1, the ceiling the products work
//! against: `cargo test --release -p atomtune-ops --lib kernel_peak -- --ignored --nocapture`;
//! and, on a thread a core at SD 1.5's shapes, the products on packed operands in place and
//! the packing alone: `... --lib in_place -- --ignored --nocapture --test-threads 1`; SDXL's
//! linears with their weights read from memory: `... --lib streamed_weight -- --ignored
//! --nocapture`. On a CPU with AMX, the first two also measure the tiles (`amx_kernel_peak`;
//! `in_place_product_rate` prints both kernels).

use super::kernel::{kernel, Out};
use super::product::{gemm_packed, gemm_with_packed, multiply};
use super::{amx, supported, Panels, MR, NR};
use crate::cpu::matmul::{Dst, Mat};

#[test]
#[ignore = "a measurement, not a check"]
fn kernel_peak() {
    if !supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let pairs = 256;
    // bf16 1.0 in both halves of every pair word
    let (a, b) = (
        vec![0x3f80_3f80u32; pairs * MR],
        vec![0x3f80_3f80u32; pairs * NR],
    );
    let mut c = vec![0f32; MR * NR];
    let reps = 200_000;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        // SAFETY: checked above; the panels hold `pairs` pairs, `c` one block.
        let out = Out {
            c: c.as_mut_ptr(),
            rs: NR,
            block: (MR, NR),
            scale: 1.0,
            accumulate: true,
        };
        unsafe { kernel::<2>(&a, &b, pairs, out) };
    }
    let dt = t.elapsed().as_secs_f64();
    let flops = 2.0 * (MR * NR * 2 * pairs) as f64 * reps as f64;
    assert_eq!(c[0], (2 * pairs * reps) as f32);
    eprintln!(
        "micro-kernel, one core, panels in L1: {:.1} GFLOP/s",
        flops / dt / 1e9
    );
}

/// The best of 15 runs of `f`, seconds (on rayon's pool: a thread a core).
fn best_of_15(mut f: impl FnMut()) -> f64 {
    (0..15)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

#[test]
#[ignore = "a measurement, not a check"]
fn in_place_product_rate() {
    if !supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    // (m, k, n): a 64x64 conv's forward, a 64x64 attention projection, its GEGLU's output
    for (m, k, n) in [(320, 2880, 4096), (8192, 320, 320), (8192, 1280, 320)] {
        let (a, b) = (vec![0.25f32; m * k], vec![0.5f32; k * n]);
        let pa = Panels::left(&Mat::new(&a[..], m, k), Vec::new());
        let pb = Panels::right(&Mat::new(&b[..], k, n), Vec::new());
        let mut c = vec![0f32; m * n];
        let dst = Dst {
            ptr: c.as_mut_ptr(),
            rs: 0,
        };
        // SAFETY: checked above; `c` holds the m x n product.
        let dt = best_of_15(|| unsafe { gemm_packed(2, dst, &pa, &pb, 1.0, false) });
        assert_eq!(c[0], 0.125 * k as f32);
        let rate = 2.0 * (m * n * k) as f64 / dt / 1e9;
        eprintln!("{m}x{k}x{n} on packed operands: {rate:.0} GFLOP/s");
        if amx::available() {
            let pa = Panels::left_pairs(&Mat::new(&a[..], m, k), Vec::new()).tiled();
            c.fill(0.0);
            // SAFETY: as above.
            let dt = best_of_15(|| unsafe { gemm_packed(2, dst, &pa, &pb, 1.0, false) });
            assert_eq!(c[0], 0.125 * k as f32);
            let rate = 2.0 * (m * n * k) as f64 / dt / 1e9;
            eprintln!("{m}x{k}x{n} on AMX tiles: {rate:.0} GFLOP/s");
        }
    }
}

/// The AMX kernel's rate on one core, its operands in L2 (two panels of 12 rows and a right
/// panel at depth 1,024, over and over), as [`multiply`] runs it: configuring the tiles per
/// call included.
#[test]
#[ignore = "a measurement, not a check"]
fn amx_kernel_peak() {
    if !amx::available() {
        eprintln!("skipped: this CPU has no AMX");
        return;
    }
    let (m, k, n) = (240, 1024, NR);
    let (a, b) = (vec![1.0f32; m * k], vec![1.0f32; k * n]);
    let pa = Panels::left_pairs(&Mat::new(&a[..], m, k), Vec::new()).tiled();
    let pb = Panels::right(&Mat::new(&b[..], k, n), Vec::new());
    let mut c = vec![0f32; m * n];
    let reps = 2_000;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let dst = Dst {
            ptr: c.as_mut_ptr(),
            rs: 0,
        };
        // SAFETY: AMX implies AVX512-BF16; `c` holds the m x n product.
        unsafe { multiply(dst, pa.all(), pb.all(), 1.0, false) };
    }
    let dt = t.elapsed().as_secs_f64();
    assert_eq!(c[0], k as f32);
    let flops = 2.0 * (m * n * k) as f64 * reps as f64;
    eprintln!("AMX kernel, one core: {:.1} GFLOP/s", flops / dt / 1e9);
}

/// A frozen weight's product as the linear layers run it ([`gemm_with_packed`]: the
/// activations packed per call, the weight's panels kept), at SDXL's linear shapes, the
/// weight cycling through copies that together pass L3 (a UNet reads each weight from
/// memory once a step).
#[test]
#[ignore = "a measurement, not a check"]
fn streamed_weight_rate() {
    if !supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    // (m, k, n): 16x16 tokens' projections, GEGLU in and out; 32x32's
    for (m, k, n) in [
        (256, 1280, 1280),
        (256, 1280, 10240),
        (256, 5120, 1280),
        (1024, 640, 640),
        (1024, 640, 5120),
        (1024, 2560, 640),
    ] {
        let (x, w) = (vec![0.25f32; m * k], vec![0.5f32; k * n]);
        let pw = Panels::right(&Mat::new(&w[..], k, n), Vec::new());
        let copies = (128usize << 20).div_ceil(pw.bytes()).max(2);
        let ws: Vec<Panels> = (0..copies)
            .map(|_| Panels::from_words(pw.words.clone(), (n, pw.pairs), NR))
            .collect();
        let mut c = vec![0f32; m * n];
        let dst = Dst {
            ptr: c.as_mut_ptr(),
            rs: 0,
        };
        // SAFETY: checked above; `c` holds the m x n product.
        let dt = best_of_15(|| unsafe {
            for w in &ws {
                gemm_with_packed(dst, w, Mat::new(&x[..], m, k), false);
            }
        }) / copies as f64;
        assert_eq!(c[0], 0.125 * k as f32);
        let rate = 2.0 * (m * n * k) as f64 / dt / 1e9;
        eprintln!(
            "{m}x{k}x{n}, weight from memory: {rate:.0} GFLOP/s ({:.3} ms)",
            dt * 1e3
        );
    }
}

#[test]
#[ignore = "a measurement, not a check"]
fn in_place_packing_rate() {
    // (k, n) of a right operand `[k, n]` (rows side by side), and the same as a left operand
    for (k, n) in [(320, 8192), (2880, 4096), (1280, 1024)] {
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let (mut right, mut buf) = (Vec::new(), Vec::new());
        let r = best_of_15(|| {
            let p = Panels::right(&Mat::new(&b[..], k, n), std::mem::take(&mut right));
            right = p.into_buffer();
        });
        // as a left operand: its transpose (rows side by side), and itself (rows as runs), in
        // pair panels and tiled for AMX (the transpose regrouped after packing, runs straight
        // into tiles)
        let mut pack_left = |transposed: bool, tiled: bool| {
            best_of_15(|| {
                let m = Mat::new(&b[..], k, n);
                let a = if transposed { m.t() } else { m };
                let used = std::mem::take(&mut buf);
                let p = match tiled {
                    true => super::amx::forced(|| Panels::left(&a, used)),
                    false => Panels::left(&a, used),
                };
                buf = p.into_buffer();
            }) * 1e3
        };
        let (lt, ltt) = (pack_left(true, false), pack_left(true, true));
        let (lr, lrt) = (pack_left(false, false), pack_left(false, true));
        eprintln!(
            "packing {k}x{n}: right {:.3} ms; left of its transpose {lt:.3} ms, tiled {ltt:.3} \
             ms; left {lr:.3} ms, tiled {lrt:.3} ms",
            r * 1e3
        );
    }
}
