//! What building the effective weights `W'` costs, for every conv of SD 1.5 (98 layers, 589M
//! weights, random values), next to what the same convolutions cost in a training step.
//!
//! ```text
//! cargo bench -p atomtune-atoms --bench effective_weight -- [--latent 64] [--method atoms] [--runs 3]
//! ```
//!
//! A training step no longer builds `W'`: each adapted conv runs as `conv(x, W, T)` with the
//! `d x d` transform `T = I + D0^T dD` applied to its input columns (`ops::conv`), so what
//! the step builds is `T`, reported first below. `W'` itself is built when a delta is merged
//! or baked for sampling, and by adapters without a transform (lasso atoms, LoRA, full).
//! The SD 1.5 bench measures the whole adapter's share of a step
//! (`--mode train` against `--mode input-grad`, `scripts/bench-adapter-cost.sh`).
//!
//! Prints, as medians over `--runs`:
//! - `build T`: the transforms `T` of all layers (what each training step builds, atoms only);
//! - `build`: `W' = W + dW` for all layers (what each training step's forward does first);
//! - `dL/dT`: the backward's arithmetic alone (`Wr^T dL/dW'` for every layer, atoms only);
//! - `build+backward`: the build plus the backward pass from `dL/dW'` to the adapter parameters
//!   through candle's autograd;
//! - `conv forward`: the 98 convolutions themselves, forward only, batch 1, on inputs of the size
//!   they see at `--latent` (64 = 512x512 images). A training step runs these forwards, their
//!   backward and everything else of the UNet, so this is a lower bound of a step, and
//!   `build+backward / conv forward` an upper bound of the share `W'` takes of a step.

use std::time::Instant;

use atoms::{Adapter, AdapterConfig, LayerAdapter, Method};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use testutil::{unet_convs, UnetShape};

struct Args {
    latent: usize,
    method: Method,
    runs: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        latent: 64,
        method: Method::Atoms,
        runs: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--latent" => a.latent = val().parse().expect("--latent takes a number"),
            "--method" => {
                a.method = val()
                    .parse()
                    .expect("--method: atoms, atoms-rec, lora or full")
            }
            "--runs" => a.runs = val().parse().expect("--runs takes a number"),
            _ => {
                i += 1; // cargo bench passes `--bench`; ignore what is not ours
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Input side and stride of a UNet conv at latent size `latent`, from its diffusers name.
fn geometry(name: &str, latent: usize) -> (usize, usize) {
    let idx = |prefix: &str| -> usize {
        name.strip_prefix(prefix)
            .and_then(|r| r.split('.').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    if name.starts_with("down_blocks.") {
        let side = latent >> idx("down_blocks.");
        (side, if name.contains("downsamplers") { 2 } else { 1 })
    } else if name.starts_with("mid_block.") {
        (latent >> 3, 1)
    } else if name.starts_with("up_blocks.") {
        let side = (latent >> 3) << idx("up_blocks.");
        (
            if name.contains("upsamplers") {
                side * 2
            } else {
                side
            },
            1,
        )
    } else {
        (latent, 1)
    }
}

/// A scalar zero whose gradient with respect to its input is a given tensor: hands `dL/dW'` to
/// the backward pass the way a conv backward would, at no cost of its own.
struct InjectGrad(Tensor);

impl CustomOp1 for InjectGrad {
    fn name(&self) -> &'static str {
        "inject-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args = parse_args();
    let dev = Device::Cpu;
    let layers = unet_convs(&UnetShape::sd15());
    let numel: usize = layers
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!(
        "SD 1.5 UNet convs: {} layers, {:.1}M weights; method {}; latent {}; {} threads",
        layers.len(),
        numel as f64 / 1e6,
        args.method,
        args.latent,
        rayon::current_num_threads()
    );

    let t = Instant::now();
    let weights: Vec<Tensor> = layers
        .iter()
        .map(|(_, s)| Tensor::randn(0f32, 0.02, s.as_slice(), &dev))
        .collect::<candle_core::Result<_>>()?;
    eprintln!("random weights: {:.2} s", t.elapsed().as_secs_f64());

    let cfg = AdapterConfig::new(args.method);
    let t = Instant::now();
    let adapters: Vec<LayerAdapter> = layers
        .iter()
        .zip(&weights)
        .map(|((name, _), w)| LayerAdapter::new(&cfg, name, w).expect("adapter"))
        .collect();
    let params: usize = adapters.iter().map(|a| a.num_params()).sum();
    eprintln!(
        "adapters (dictionaries included): {:.2} s, {params} trainable parameters",
        t.elapsed().as_secs_f64()
    );
    // Non-zero parameters, as after some training.
    for a in &adapters {
        for v in a.vars() {
            v.set(&Tensor::randn(0f32, 0.01, v.dims(), &dev)?)?;
        }
    }
    // Stand-ins for dL/dW' as a conv backward would hand them over.
    let grads: Vec<Tensor> = weights
        .iter()
        .map(|w| Tensor::randn(0f32, 1.0, w.dims(), &dev))
        .collect::<candle_core::Result<_>>()?;

    let (mut build, mut build_bwd, mut bwd_only, mut conv, mut build_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = Instant::now();
        let ts: Vec<Option<Tensor>> = adapters
            .iter()
            .map(|a| {
                let ft = a.filter_transform(1.0).expect("T");
                ft.map(|f| f.matrix().expect("T"))
            })
            .collect();
        build_t.push(t.elapsed().as_secs_f64());
        drop(ts);

        let t = Instant::now();
        let built: Vec<Tensor> = adapters
            .iter()
            .zip(&weights)
            .map(|(a, w)| a.effective_weight(w, 1.0).expect("W'"))
            .collect();
        build.push(t.elapsed().as_secs_f64());
        drop(built);

        let t = Instant::now();
        let mut loss = Tensor::zeros((), DType::F32, &dev)?;
        for ((a, w), g) in adapters.iter().zip(&weights).zip(&grads) {
            let wp = a.effective_weight(w, 1.0).expect("W'");
            loss = (loss + wp.apply_op1(InjectGrad(g.clone()))?)?;
        }
        let gs = loss.backward()?;
        build_bwd.push(t.elapsed().as_secs_f64());
        assert!(adapters
            .iter()
            .all(|a| a.vars().iter().all(|v| gs.get(v).is_some())));
        drop(gs);

        // The backward's own arithmetic, dL/dT = Wr^T dL/dW', outside candle's autograd (which
        // also zero-fills and adds into a W'-sized gradient buffer, as it does for every conv
        // kernel whether adapted or not).
        let t = Instant::now();
        for (w, g) in weights.iter().zip(&grads) {
            let d = w.dim(2)? * w.dim(3)?;
            let n = w.elem_count() / d;
            let _ = w.reshape((n, d))?.t()?.matmul(&g.reshape((n, d))?)?;
        }
        bwd_only.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        for ((name, shape), w) in layers.iter().zip(&weights) {
            let (side, stride) = geometry(name, args.latent);
            let x = Tensor::zeros((1, shape[1], side, side), DType::F32, &dev)?;
            let pad = shape[2] / 2;
            let _ = x.conv2d(w, pad, stride, 1, 1)?;
        }
        conv.push(t.elapsed().as_secs_f64());
    }
    let (b, bb, bo, c) = (
        median(build),
        median(build_bwd),
        median(bwd_only),
        median(conv),
    );
    println!(
        "build T             {:8.3} s  (what a training step builds)",
        median(build_t)
    );
    println!("build W'            {b:8.3} s");
    println!("dL/dT from dL/dW'   {bo:8.3} s  (the backward's arithmetic)");
    println!("build W' + backward {bb:8.3} s  (through candle's autograd)");
    println!(
        "conv forward        {c:8.3} s  (latent {}, batch 1)",
        args.latent
    );
    println!(
        "share: build+backward / conv forward = {:.1}% (upper bound of W's share of a training step)",
        100.0 * bb / c
    );
    Ok(())
}
