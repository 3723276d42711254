//! The time of an atoms-adapted 3x3 conv's forward and backward (`ops::conv::conv2d_transformed`
//! with gradients for the input and the atoms' update) at SD 1.5's UNet shapes, next to the
//! time its products alone would take at the rate of a plain conv's forward of the same shape
//! (with direct products: the backward's `W^T dy` has as many; the adapted forward runs
//! Winograd's F(2x2, 3x3) where it applies, as `atomtune` does):
//!
//! ```text
//! cargo run --release -p atomtune-ops --example adapted_conv_rate
//! ```
//!
//! bf16 products where the CPU has AVX512-BF16 (what `--dtype bf16` runs), else f32.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use ops::conv::{ConvConfig, FilterTransform};

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> candle_core::Result<()> {
    ops::tune_process();
    ops::cpu_bf16::set_enabled(ops::cpu_bf16::supported());
    ops::on_compute_thread(|| {
        for (c, o, side) in [
            (320, 320, 64),
            (640, 320, 64),
            (640, 640, 32),
            (1280, 1280, 16),
        ] {
            let dev = Device::Cpu;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, c, side, side), &dev)?)?;
            let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &dev)?.to_dtype(DType::BF16)?;
            let atoms = Tensor::randn(0f32, 0.3, (9, 9), &dev)?;
            let delta = Var::from_tensor(&Tensor::randn(0f32, 0.01, (9, 9), &dev)?)?;
            let cfg = ConvConfig {
                stride: 1,
                padding: 1,
            };
            let t = FilterTransform::Atoms {
                atoms,
                delta: delta.as_tensor().clone(),
                scale: 1.0,
            };
            let dy = Tensor::randn(0f32, 1.0, (1, o, side, side), &dev)?;
            let (mut fwd, mut bwd, mut plain) = (vec![], vec![], vec![]);
            for _ in 0..6 {
                let t0 = Instant::now();
                let y = ops::conv::conv2d_transformed(x.as_tensor(), &w, None, &t, cfg)?;
                fwd.push(t0.elapsed().as_secs_f64());
                let loss = (y * &dy)?.sum_all()?;
                let t1 = Instant::now();
                let g = loss.backward()?;
                bwd.push(t1.elapsed().as_secs_f64());
                assert!(g.get(&x).is_some() && g.get(&delta).is_some());
                // the plain forward's direct products (the backward's `W^T dy` is as many), not
                // Winograd's 2.25x fewer
                ops::conv::winograd::set_enabled(false);
                let t2 = Instant::now();
                ops::conv::conv2d(&x.as_tensor().detach(), &w, None, cfg)?;
                plain.push(t2.elapsed().as_secs_f64());
                ops::conv::winograd::set_enabled(true);
            }
            let (f, b, p) = (median(fwd), median(bwd), median(plain));
            println!(
                "{c}x{side}x{side} -> {o}: forward {:.1} ms, backward {:.1} ms ({:.2}x a plain forward's {:.1} ms)",
                f * 1e3,
                b * 1e3,
                b / p,
                p * 1e3
            );
        }
        Ok(())
    })
}
