//! The rate of `ops::conv::conv2d` (a 3x3 conv's forward, padding 1) at SD 1.5's UNet shapes,
//! to compare with PyTorch's `torch.nn.functional.conv2d` on the same machine: f32, and on CPUs
//! with AVX512-BF16 with bf16 products of a weight kept in bf16 (what `--dtype bf16` runs), by the direct conv and
//! by Winograd's F(2x2, 3x3) (`ops::conv::winograd`):
//!
//! ```text
//! cargo run --release -p atomtune-ops --example conv_rate
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ops::conv::ConvConfig;

fn main() -> candle_core::Result<()> {
    ops::tune_process();
    ops::on_compute_thread(|| {
        // (batch, in, out, side): SD 1.5's resnet convs at 64x64 latents (the up blocks' first
        // conv reads the skip connection too), one image
        for (b, c, o, side) in [
            (1, 320, 320, 64),
            (1, 640, 320, 64),
            (1, 640, 640, 32),
            (1, 1280, 1280, 16),
            (2, 1280, 1280, 16),
            (1, 1280, 1280, 8),
            (2, 1280, 1280, 8),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, side, side), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &Device::Cpu)?;
            let cfg = ConvConfig {
                stride: 1,
                padding: 1,
            };
            let time = |w: &Tensor| {
                ops::conv::conv2d(&x, w, None, cfg).expect("conv");
                let mut times: Vec<f64> = (0..9)
                    .map(|_| {
                        let t = Instant::now();
                        ops::conv::conv2d(&x, w, None, cfg).expect("conv");
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            };
            let flops = 2.0 * (b * o * c * 9 * side * side) as f64;
            let dt = time(&w);
            print!(
                "{b}x{c}x{side}x{side} -> {o}: f32 {:.1} ms {:.3} TFLOP/s",
                dt * 1e3,
                flops / dt / 1e12
            );
            if ops::cpu_bf16::supported() {
                ops::cpu_bf16::set_enabled(true);
                let wh = w.to_dtype(DType::BF16)?;
                for (name, winograd) in [("direct", false), ("Winograd", true)] {
                    ops::conv::winograd::set_enabled(winograd);
                    let dh = time(&wh);
                    print!(
                        ", bf16 {name} {:.1} ms {:.3} TFLOP/s",
                        dh * 1e3,
                        flops / dh / 1e12
                    );
                }
                ops::cpu_bf16::set_enabled(false);
            }
            println!();
        }
        Ok(())
    })
}
