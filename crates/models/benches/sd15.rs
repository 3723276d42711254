//! SD 1.5's UNet at real size (random weights, 860M parameters) on this machine: forward time,
//! training-step time (forward + backward to adapter parameters + an SGD update) and peak RSS.
//! `--model sdxl-random` runs SDXL base's UNet instead (2.6B parameters, with random pooled text
//! embeddings and the time ids of a square image of the latent's size); any preset works.
//!
//! ```text
//! cargo bench -p atomtune-models --bench sd15 -- --model sdxl-random --mode train --latent 64 --steps 2
//! cargo bench -p atomtune-models --bench sd15 -- --mode forward --latent 32 --steps 3
//! cargo bench -p atomtune-models --bench sd15 -- --mode train --method atoms --latent 32 --steps 3
//! cargo bench -p atomtune-models --bench sd15 -- --mode input-grad --latent 32 --steps 3
//! ```
//!
//! `graph` runs one forward to the loss and reports what it leaves alive for the backward
//! (`graph_gb`: every distinct storage of the graph's nodes, the activations the backward
//! needs) next to the UNet's weights (`weights_gb`); with `ATOMTUNE_KERNELS=portable` and
//! `--dtype f16`, that is what a GPU keeps.
//!
//! `input-grad` is a training step without adapters: the loss is differentiated with respect to
//! the noisy latent, so the backward runs through every layer as in training but no adapter
//! does any work. `train` minus `input-grad` is what the adapters cost in a step.
//!
//! One JSON line on stdout: the median seconds per step over `--steps` (after one warm-up step;
//! the mean of the middle two of an even count, as the peer's `statistics.median`), the fastest
//! step (`min_s`, as the peer's `min_step_s`: on a shared machine noise only adds time),
//! for `train` also per phase (forward to the loss, backward, update: `median_phase_s`, as the
//! PyTorch peer reports them), the build time and the process's peak RSS (VmHWM). Run one mode per process so peaks do not mix.
//! `--checkpointing` checkpoints every block, `--checkpointing-selective` the selected ones
//! ([`models::Checkpointing`]), `--dtype bf16` stores the weights in bf16 (and with
//! `ATOMTUNE_CPU_BF16=1`, f32 activations, conv and linear weights are bf16 as `atomtune` keeps them);
//! with `SD15_BENCH_MEM=1` the peak and current RSS go to stderr before each step and after each
//! forward; with `ATOMTUNE_OP_TIMES=1` each fused op's calls and seconds over the timed steps
//! ([`ops::op_times`]).

use std::time::Instant;

use atoms::{AdapterConfig, LayerAdapter, Method};
use candle_core::{DType, Device, Tensor};
use models::{Checkpointing, Layers, Preset, Targets, TextTime, Unet, UnetConfig, Weights};
use testutil::{peak_rss_gb, status_gb};

struct Args {
    model: Preset,
    mode: String,
    method: Method,
    latent: usize,
    steps: usize,
    batch: usize,
    checkpointing: Checkpointing,
    dtype: DType,
}

fn parse() -> Args {
    let mut a = Args {
        model: Preset::Sd15,
        mode: "forward".into(),
        method: Method::Atoms,
        latent: 32,
        steps: 3,
        batch: 1,
        checkpointing: Checkpointing::Off,
        dtype: DType::F32,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--mode" => a.mode = val,
            "--model" => {
                a.model = val
                    .parse()
                    .expect("--model: a preset (sd15-random, sdxl-random...)")
            }
            "--method" => a.method = val.parse().expect("--method atoms|atoms-rec|lora|full"),
            "--latent" => a.latent = val.parse().expect("--latent N"),
            "--steps" => a.steps = val.parse().expect("--steps N"),
            "--batch" => a.batch = val.parse().expect("--batch N"),
            "--dtype" => {
                a.dtype = match val.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    _ => panic!("--dtype f32|f16|bf16"),
                }
            }
            "--checkpointing" => {
                a.checkpointing = Checkpointing::All;
                i += 1;
                continue;
            }
            "--checkpointing-selective" => {
                a.checkpointing = Checkpointing::Selective;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// The median as Python's `statistics.median` takes it (the peer's): the mean of the middle two
/// of an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Bytes of every distinct storage in the graph behind `loss`: what the forward leaves alive for
/// the backward (activations; the frozen weights and untracked inputs are not graph nodes).
fn graph_bytes(loss: &Tensor) -> usize {
    use candle_core::{CpuStorage, Storage};
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for node in loss.sorted_nodes() {
        let (s, _) = node.storage_and_layout();
        if !seen.insert(&*s as *const Storage as usize) {
            continue;
        }
        total += match &*s {
            Storage::Cpu(CpuStorage::F32(v)) => 4 * v.len(),
            Storage::Cpu(CpuStorage::F16(v)) => 2 * v.len(),
            Storage::Cpu(CpuStorage::BF16(v)) => 2 * v.len(),
            Storage::Cpu(CpuStorage::F64(v)) => 8 * v.len(),
            _ => 0,
        };
    }
    total
}

/// `--mode graph`: one forward to the training loss, with `atoms` on every conv, and what it
/// leaves for the backward (`graph_gb`), next to the weights (`weights_gb`).
fn graph(
    unet: &Unet,
    x: &Tensor,
    noise: &Tensor,
    t: &Tensor,
    cond: &Cond,
    a: &Args,
) -> models::Result<()> {
    let layers = unet.layers();
    let mut weights = 0usize;
    for name in layers.names() {
        let w = layers.get(&name).expect("registered").weight;
        weights += w.elem_count() * w.dtype().size_in_bytes();
    }
    for name in layers.select(Targets::Conv) {
        let w = layers.get(&name).expect("registered").weight;
        layers.attach(
            &name,
            LayerAdapter::new(&AdapterConfig::new(a.method), &name, &w)?,
            1.0,
        )?;
    }
    let t0 = Instant::now();
    let pred = cond.forward(unet, x, t)?;
    let loss = (pred.to_dtype(DType::F32)? - noise.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()?;
    println!(
        "{{\"model\": \"{}\", \"mode\": \"graph\", \"latent\": {}, \"batch\": {}, \"dtype\": \"{:?}\", \"checkpointing\": \"{:?}\", \"kernels\": \"{}\", \"graph_gb\": {:.3}, \"weights_gb\": {:.3}, \"forward_s\": {:.1}}}",
        a.model,
        a.latent,
        a.batch,
        a.dtype,
        a.checkpointing,
        models::Kernels::current()?,
        graph_bytes(&loss) as f64 / 1e9,
        weights as f64 / 1e9,
        t0.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// The size of the delta file the attached adapters make (what `atomtune train` writes, less
/// the trainer's few metadata entries).
fn delta_bytes(unet: &Unet, a: &Args) -> models::Result<u64> {
    let layers = unet.layers();
    let attached: Vec<(String, std::sync::Arc<LayerAdapter>)> = layers
        .adapted()
        .into_iter()
        .filter_map(|n| layers.adapters(&n).into_iter().next().map(|(x, _)| (n, x)))
        .collect();
    let text = models::ClipConfig::parse(
        std::path::Path::new("text_encoder/config.json"),
        a.model.text_encoder_config(),
    )?;
    let unet_cfg = unet.config();
    let mut meta = atoms::DeltaMeta::new(AdapterConfig::new(a.method), a.model.name());
    meta.base_architecture = Some(models::Architecture::of(unet_cfg, &text).name().into());
    let delta = atoms::Delta::from_adapters(
        meta,
        attached.iter().map(|(n, x)| (n.as_str(), x.as_ref())),
        layers,
    )?;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("delta.safetensors");
    delta.write(&path)?;
    Ok(std::fs::metadata(&path).expect("just written").len())
}

/// The text conditioning of a step: random text states, and for SDXL random pooled embeddings
/// with the time ids of an image of the latent's size.
struct Cond {
    ctx: Tensor,
    text_time: Option<TextTime>,
}

impl Cond {
    fn new(cfg: &UnetConfig, a: &Args, dev: &Device) -> models::Result<Self> {
        let (b, side) = (a.batch, a.latent * 8);
        let ctx =
            Tensor::randn(0f32, 1.0, (b, 77, cfg.cross_attention_dim), dev)?.to_dtype(a.dtype)?;
        let text_time = match cfg.addition {
            None => None,
            Some(add) => Some(TextTime {
                text_embeds: Tensor::randn(0f32, 1.0, (b, add.pooled_dim()), dev)?
                    .to_dtype(a.dtype)?,
                time_ids: TextTime::time_ids((side, side), (0, 0), (side, side), dev)?
                    .repeat((b, 1))?,
            }),
        };
        Ok(Cond { ctx, text_time })
    }

    fn forward(&self, unet: &Unet, x: &Tensor, t: &Tensor) -> models::Result<Tensor> {
        unet.forward_with(x, t, &self.ctx, self.text_time.as_ref())
    }
}

fn main() -> models::Result<()> {
    models::tune_process();
    models::on_compute_thread(run)
}

fn run() -> models::Result<()> {
    let a = parse();
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let cfg = UnetConfig::parse(
        std::path::Path::new(&format!("<{}>/unet/config.json", a.model)),
        a.model.unet_config(),
    )?;
    let unet = Unet::new(
        // as `atomtune`: bf16's mixed precision keeps conv and linear weights in bf16
        &Weights::random(0, a.dtype, &dev)
            .with_bf16_weights(models::cpu_bf16::active())
            .pp("unet"),
        &cfg,
        &Layers::new(a.model.name()),
    )?;
    unet.layers().set_checkpointing(a.checkpointing);
    let build = t0.elapsed().as_secs_f64();
    let (b, l) = (a.batch, a.latent);
    let x = Tensor::randn(0f32, 1.0, (b, 4, l, l), &dev)?.to_dtype(a.dtype)?;
    let noise = Tensor::randn(0f32, 1.0, (b, 4, l, l), &dev)?.to_dtype(a.dtype)?;
    let cond = Cond::new(&cfg, &a, &dev)?;
    let t = Tensor::new(&[500u32], &dev)?;

    let mut vars = Vec::new();
    let mut adapt_s = 0.0;
    if a.mode == "train" {
        let t1 = Instant::now();
        let targets = if a.method == Method::Lora {
            Targets::Attn
        } else {
            Targets::Conv
        };
        let layers = unet.layers();
        for name in layers.select(targets) {
            let w = layers.base_weight(&name)?;
            let adapter = LayerAdapter::new(&AdapterConfig::new(a.method), &name, &w)?;
            vars.extend(atoms::Adapter::vars(&adapter));
            layers.attach(&name, adapter, 1.0)?;
        }
        adapt_s = t1.elapsed().as_secs_f64();
    }
    let mut times = Vec::new();
    // per training step: forward (to the loss), backward, update
    let mut phases: [Vec<f64>; 3] = Default::default();
    if !["train", "input-grad", "forward", "graph"].contains(&a.mode.as_str()) {
        panic!("--mode: forward, train, input-grad or graph");
    }
    if a.mode == "graph" {
        return graph(&unet, &x, &noise, &t, &cond, &a);
    }
    let mem = std::env::var_os("SD15_BENCH_MEM").is_some();
    for step in 0..=a.steps {
        if mem {
            eprintln!(
                "step {step}: peak {:.2} GB, now {:.2} GB",
                peak_rss_gb(),
                status_gb("VmRSS:")
            );
        }
        let t1 = Instant::now();
        if a.mode == "input-grad" {
            let xt = candle_core::Var::from_tensor(
                &((&x * 0.5f64.sqrt())? + (&noise * 0.5f64.sqrt())?)?,
            )?;
            let pred = cond.forward(&unet, &xt, &t)?;
            let loss = (pred - &noise)?.sqr()?.mean_all()?;
            let grads = loss.backward()?;
            assert!(grads.get(&xt).is_some());
        } else if a.mode == "train" {
            // x_t at alpha_bar = 0.5 stands in for the scheduler's noising; its cost is nil.
            let xt = ((&x * 0.5f64.sqrt())? + (&noise * 0.5f64.sqrt())?)?;
            let pred = cond.forward(&unet, &xt, &t)?;
            let loss = (pred - &noise)?.sqr()?.mean_all()?;
            let t_fwd = t1.elapsed().as_secs_f64();
            if mem {
                eprintln!(
                    "after forward: peak {:.2} GB, now {:.2} GB",
                    peak_rss_gb(),
                    status_gb("VmRSS:")
                );
            }
            let t2 = Instant::now();
            let grads = loss.backward()?;
            let t_bwd = t2.elapsed().as_secs_f64();
            let t3 = Instant::now();
            for v in &vars {
                if let Some(g) = grads.get(v) {
                    v.set(&(v.as_tensor() - (g * 1e-4)?)?)?;
                }
            }
            if step > 0 {
                for (p, t) in phases
                    .iter_mut()
                    .zip([t_fwd, t_bwd, t3.elapsed().as_secs_f64()])
                {
                    p.push(t);
                }
            }
        } else {
            let _ = cond.forward(&unet, &x, &t)?;
        }
        if step > 0 {
            times.push(t1.elapsed().as_secs_f64());
        } else {
            // scripts/profile.sh attaches perf at this line: after the model build and the
            // warm-up step, whose page faults would drown the steady state
            eprintln!("warmed up");
            ops::op_times::reset();
        }
    }
    // scripts/profile.sh ends its perf window here
    eprintln!("steps done");
    // ATOMTUNE_OP_TIMES=1: the fused ops' time over the timed steps
    eprint!("{}", ops::op_times::report());
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let delta = if a.mode == "train" {
        format!(", \"delta_bytes\": {}", delta_bytes(&unet, &a)?)
    } else {
        String::new()
    };
    let phase = match &phases {
        [f, b, o] if !f.is_empty() => format!(
            ", \"median_phase_s\": {{\"fwd\": {:.3}, \"bwd\": {:.3}, \"opt\": {:.4}}}",
            median(f.clone()),
            median(b.clone()),
            median(o.clone())
        ),
        _ => String::new(),
    };
    let each: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    println!(
        "{{\"model\": \"{}\", \"mode\": \"{}\", \"method\": \"{}\", \"latent\": {l}, \"batch\": {b}, \"median_s\": {:.3}, \"min_s\": {:.3}, \"steps\": {}, \"each_s\": [{}], \"build_s\": {build:.2}, \"adapters_s\": {adapt_s:.2}, \"trainable\": {params}, \"peak_rss_gb\": {:.2}, \"threads\": {}, \"dtype\": \"{:?}\", \"checkpointing\": \"{:?}\"{phase}{delta}}}",
        a.model,
        a.mode,
        if a.mode == "train" { a.method.name() } else { "-" },
        median(times.clone()),
        times.iter().copied().fold(f64::INFINITY, f64::min),
        a.steps,
        each.join(", "),
        peak_rss_gb(),
        candle_core::utils::get_num_threads(),
        a.dtype,
        a.checkpointing,
    );
    Ok(())
}
