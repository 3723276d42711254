//! The rate of `ops::linear::linear` (a linear layer's forward, f32) at SD 1.5 and SDXL shapes,
//! to compare with PyTorch's `torch.nn.functional.linear` on the same machine; on CPUs with
//! AVX512-BF16 also with bf16 products ([`ops::cpu_bf16`]), of the f32 weight and of the weight
//! kept in bf16 (what `--dtype bf16` runs):
//!
//! ```text
//! cargo run --release -p atomtune-ops --example linear_rate
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    ops::tune_process();
    ops::on_compute_thread(|| {
        // (rows, in, out): SDXL's 1280-wide blocks at 16x16 for a CFG batch, its 640-wide ones
        // at 32x32, SD 1.5's 320-wide ones at 64x64.
        for (m, k, n) in [
            (256, 1280, 1280),
            (512, 1280, 1280),
            (512, 1280, 10240),
            (512, 5120, 1280),
            (2048, 640, 640),
            (2048, 640, 5120),
            (8192, 320, 320),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            for _ in 0..2 {
                ops::linear::linear(&x, &w, None).expect("linear");
            }
            let w16 = w.to_dtype(candle_core::DType::BF16)?;
            let time = |w: &Tensor| {
                let runs = 5;
                let t = Instant::now();
                for _ in 0..runs {
                    ops::linear::linear(&x, w, None).expect("linear");
                }
                t.elapsed().as_secs_f64() / runs as f64
            };
            let dt = time(&w);
            let rate = |dt: f64| 2.0 * (m * k * n) as f64 / dt / 1e12;
            print!("{m} {k} {n} f32 {:.1} ms {:.3} TFLOP/s", dt * 1e3, rate(dt));
            if ops::cpu_bf16::supported() {
                ops::cpu_bf16::set_enabled(true);
                ops::linear::linear(&x, &w, None).expect("linear");
                let db = time(&w);
                ops::linear::linear(&x, &w16, None).expect("linear");
                let dh = time(&w16);
                ops::cpu_bf16::set_enabled(false);
                print!(
                    "  bf16 {:.1} ms {:.3} TFLOP/s ({:.2}x f32's time), bf16 weight {:.1} ms \
                     {:.3} TFLOP/s",
                    db * 1e3,
                    rate(db),
                    db / dt,
                    dh * 1e3,
                    rate(dh)
                );
            }
            println!();
        }
        Ok(())
    })
}
