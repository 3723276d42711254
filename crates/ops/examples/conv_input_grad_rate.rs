//! The time of a frozen 3x3 conv's backward (the input gradient alone: what LoRA's and the
//! other non-conv methods' training runs through every conv) at SD 1.5's UNet shapes, with bf16
//! products as direct products and as Winograd's F(2x2, 3x3) (`ops::conv::winograd`), in turn,
//! on CPUs with AVX512-BF16:
//!
//! ```text
//! cargo run --release -p atomtune-ops --example conv_input_grad_rate
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use ops::conv::ConvConfig;

fn main() -> candle_core::Result<()> {
    ops::tune_process();
    if !ops::cpu_bf16::supported() {
        eprintln!("this CPU has no AVX512-BF16: nothing to compare");
        return Ok(());
    }
    ops::on_compute_thread(|| {
        ops::cpu_bf16::set_enabled(true);
        let cfg = ConvConfig {
            stride: 1,
            padding: 1,
        };
        // (in, out, side): one image, as a training step
        for (c, o, side) in [
            (320, 320, 64),
            (640, 320, 64),
            (640, 640, 32),
            (1280, 1280, 16),
        ] {
            let dev = Device::Cpu;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, c, side, side), &dev)?)?;
            let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &dev)?.to_dtype(DType::BF16)?;
            let up = Tensor::randn(0f32, 1.0, (1, o, side, side), &dev)?;
            print!("{c}x{side}x{side} -> {o}:");
            // two rounds of each, in turn
            for winograd in [false, true, false, true] {
                ops::conv::winograd::set_enabled(winograd);
                let mut times = Vec::new();
                for _ in 0..5 {
                    let y = ops::conv::conv2d(x.as_tensor(), &w, None, cfg)?;
                    let loss = (y * &up)?.sum_all()?;
                    let t = Instant::now();
                    loss.backward()?;
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let name = if winograd { "Winograd" } else { "direct" };
                print!(" {name} {:.1} ms", times[times.len() / 2] * 1e3);
            }
            println!();
        }
        ops::conv::winograd::set_enabled(true);
        Ok(())
    })
}
