//! The GPU check `scripts/gpu-check.sh` runs on a CUDA machine without a network: the
//! tiny-fixture parity the CPU tests check, on the GPU against the CPU and diffusers; SD 1.5
//! training steps (random weights, `atoms` on every conv) in f16 and bf16, batch 1 and 2, with
//! and without gradient checkpointing; and a sampling run at 512x512. One JSON line on stdout
//! with every part's numbers (seconds, peak device memory), each part's on stderr as it ends.
//!
//! ```text
//! cargo build --release --features cuda -p atomtune-train --example gpu_check
//! gpu_check --fixture DIR [--device cuda|cpu] [--parts parity,train,sample]
//!           [--latent 64] [--steps 3] [--sample-size 512] [--sample-steps 30] [--model sd15-random]
//! ```
//!
//! `--fixture` is a tiny-sd-2block diffusers folder with its `reference.safetensors` (the
//! parity part; the sampling part borrows its CLIP tokenizer, as random presets have none).
//! On the CPU (`--device cpu`, small `--latent` and `--sample-size`) the same program checks
//! itself. As `atomtune` does by default, the training and sampling parts let f32 products use
//! TF32 on CUDA; the parity part runs exact f32. Peak memory: on CUDA the device's used memory (total minus free, sampled every
//! 2 ms while the part runs, so it includes the context and what candle's allocator keeps),
//! on the CPU the process's peak RSS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use atoms::{Adapter, AdapterConfig, LayerAdapter, Method};
use candle_core::{DType, Device, Tensor};
use models::{
    Checkpointing, ClipTokenizer, Layers, LoadOptions, Preset, StableDiffusion, Targets, Unet,
};
use sample::{NoiseRng, Pipeline, Request, SchedulerKind};
use serde_json::{json, Value};
use train::{AdamW, AdamWConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    fixture: PathBuf,
    device: String,
    parts: Vec<String>,
    latent: usize,
    steps: usize,
    sample_size: usize,
    sample_steps: usize,
    model: String,
}

fn parse() -> Res<Args> {
    let mut a = Args {
        fixture: PathBuf::new(),
        device: "cuda".into(),
        parts: vec!["parity".into(), "train".into(), "sample".into()],
        latent: 64,
        steps: 3,
        sample_size: 512,
        sample_steps: 30,
        model: "sd15-random".into(),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let (flag, val) = (pair[0].as_str(), pair.get(1).cloned().unwrap_or_default());
        let num = || {
            val.parse::<usize>()
                .map_err(|_| format!("{flag} {val}: not a number"))
        };
        match flag {
            "--fixture" => a.fixture = val.clone().into(),
            "--device" => a.device = val.clone(),
            "--parts" => a.parts = val.split(',').map(String::from).collect(),
            "--latent" => a.latent = num()?,
            "--steps" => a.steps = num()?,
            "--sample-size" => a.sample_size = num()?,
            "--sample-steps" => a.sample_steps = num()?,
            "--model" => a.model = val.clone(),
            other => return Err(format!("unknown flag {other} (see the file's doc)").into()),
        }
    }
    if !a.fixture.join("reference.safetensors").is_file() {
        return Err(format!(
            "--fixture {}: no reference.safetensors there (give the tiny-sd-2block folder)",
            a.fixture.display()
        )
        .into());
    }
    Ok(a)
}

fn main() -> Res<()> {
    models::tune_process();
    models::on_compute_thread(|| run().map_err(|e| e.to_string()))?;
    Ok(())
}

fn run() -> Res<()> {
    let a = parse()?;
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("--device {other}: cpu or cuda").into()),
    };
    let mut all = serde_json::Map::new();
    all.insert("device".into(), format!("{device:?}").into());
    for part in &a.parts {
        // As `atomtune` runs by default: TF32 for f32 products on CUDA (attention runs in f32),
        // but exact f32 where results are held to the CPU's.
        candle_core::cuda::set_gemm_reduced_precision_f32(part != "parity");
        let value = match part.as_str() {
            "parity" => parity(&a.fixture, &device)?,
            "train" => train_steps(&a, &device)?,
            "sample" => sampling(&a, &device)?,
            other => return Err(format!("--parts: unknown part {other}").into()),
        };
        eprintln!("{part}: {value}");
        all.insert(part.clone(), value);
    }
    println!("{}", Value::Object(all));
    Ok(())
}

/// Peak memory while `f` runs: device memory in use on CUDA, peak RSS on the CPU; in GB.
fn with_peak<R>(device: &Device, f: impl FnOnce() -> Res<R>) -> Res<(R, f64)> {
    let Some(used) = device_used(device) else {
        let r = f()?;
        return Ok((r, testutil::peak_rss_gb()));
    };
    let peak = Arc::new(AtomicU64::new(used()?));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(u) = used() {
                    peak.fetch_max(u, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let r = f();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Ok((r?, peak.load(Ordering::Relaxed) as f64 / 1e9))
}

type UsedFn = Box<dyn Fn() -> Res<u64> + Send>;

/// Bytes of device memory in use, for a CUDA device.
#[cfg(feature = "cuda")]
fn device_used(device: &Device) -> Option<UsedFn> {
    let Device::Cuda(d) = device else {
        return None;
    };
    let ctx = d.cuda_stream().context().clone();
    Some(Box::new(move || {
        let (free, total) = ctx.mem_get_info()?;
        Ok((total - free) as u64)
    }))
}

#[cfg(not(feature = "cuda"))]
fn device_used(_: &Device) -> Option<UsedFn> {
    None
}

/// `max |a - b| / max |b|`, both moved to the CPU in f32.
fn rel(a: &Tensor, b: &Tensor) -> Res<f64> {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (a, b) = (cpu(a)?, cpu(b)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(d / (b.abs()?.max_all()?.to_scalar::<f32>()? as f64).max(1e-30))
}

/// The tiny fixture on `device` and on the CPU, in f32: the UNet output, the training loss and
/// seven weight gradients (through `full` adapters), and a DDIM image, against diffusers'
/// reference and the CPU's results.
fn parity(fixture: &Path, device: &Device) -> Res<Value> {
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture.join("reference.safetensors"), &Device::Cpu)?;
    let load = |dev: &Device| {
        let opts = LoadOptions {
            device: dev.clone(),
            ..Default::default()
        };
        StableDiffusion::load(fixture.to_str().unwrap_or_default(), &opts)
    };
    let on = |t: &Tensor, d: &Device| t.to_device(d);
    let (gpu, cpu) = (load(device)?, load(&Device::Cpu)?);
    let start = Instant::now();
    let unet_out = |sd: &StableDiffusion, d: &Device| {
        sd.unet.forward(
            &on(&r["unet.sample"], d)?,
            &on(&r["unet.timestep"], d)?,
            &on(&r["unet.encoder_hidden_states"], d)?,
        )
    };
    let out_gpu = unet_out(&gpu, device)?;
    let out_cpu = unet_out(&cpu, &Device::Cpu)?;
    let (loss_gpu, grads_gpu) = loss_and_grads(&gpu, &r, device)?;
    let (loss_cpu, grads_cpu) = loss_and_grads(&cpu, &r, &Device::Cpu)?;
    let want_loss = r["train.loss"].to_vec1::<f32>()?[0] as f64;
    let mut grad_vs_ref = 0f64;
    let mut grad_vs_cpu = 0f64;
    for (name, g) in &grads_gpu {
        grad_vs_ref = grad_vs_ref.max(rel(g, &r[&format!("train.grad.{name}.weight")])?);
        grad_vs_cpu = grad_vs_cpu.max(rel(g, &grads_cpu[name])?);
    }
    let img_ref = &r["pipe.ddim4.cfg7_5.image"];
    let size = img_ref.dim(3)?;
    let image = |sd: &StableDiffusion| -> Res<Tensor> {
        // the fixture's request (../shared/fixtures/build_fixtures.py)
        let req = Request {
            prompt: "a photo of sks dog".into(),
            negative_prompt: None,
            steps: 4,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            width: size,
            height: size,
            seed: 0,
            latents: Some(r["pipe.init_latents"].clone()),
        };
        Ok(Pipeline::new(sd)?.generate(&req, &mut |_| {})?.image)
    };
    let (img_gpu, img_cpu) = (image(&gpu)?, image(&cpu)?);
    let to_unit = |t: &Tensor| -> Res<Tensor> {
        Ok(((t.to_device(&Device::Cpu)? + 1.0)? * 0.5)?.clamp(0f32, 1f32)?)
    };
    let diff = |a: &Tensor, b: &Tensor| -> Res<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64 * 255.0)
    };
    Ok(json!({
        "unet_vs_diffusers": rel(&out_gpu, &r["unet.out"])?,
        "unet_vs_cpu": rel(&out_gpu, &out_cpu)?,
        "loss": loss_gpu,
        "loss_vs_diffusers": (loss_gpu - want_loss).abs() / want_loss,
        "loss_vs_cpu": (loss_gpu - loss_cpu).abs() / loss_cpu,
        "grads_vs_diffusers_max": grad_vs_ref,
        "grads_vs_cpu_max": grad_vs_cpu,
        "image_vs_diffusers_max_of_255": diff(&to_unit(&img_gpu)?, &to_unit(img_ref)?)?,
        "image_vs_cpu_max_of_255": diff(&to_unit(&img_gpu)?, &to_unit(&img_cpu)?)?,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

/// The fixture's training loss (epsilon MSE at the reference's noisy latents) and the gradients
/// of the seven weights the reference has, through `full` adapters.
fn loss_and_grads(
    sd: &StableDiffusion,
    r: &HashMap<String, Tensor>,
    dev: &Device,
) -> Res<(f64, HashMap<String, Tensor>)> {
    let layers = sd.unet.layers();
    let names: Vec<String> = r
        .keys()
        .filter_map(|k| k.strip_prefix("train.grad.")?.strip_suffix(".weight"))
        .map(String::from)
        .collect();
    let mut vars = Vec::new();
    for name in &names {
        let base = layers
            .get(name)
            .ok_or(format!("{name} is not a layer"))?
            .weight;
        let a = LayerAdapter::new(&AdapterConfig::new(Method::Full), name, &base)?;
        vars.push(a.vars()[0].clone());
        layers.attach(name, a, 1.0)?;
    }
    let pred = sd.unet.forward(
        &r["train.noisy"].to_device(dev)?,
        &r["train.t"].to_device(dev)?,
        &r["text.last_hidden_state"].to_device(dev)?,
    )?;
    let loss = (pred - r["train.noise"].to_device(dev)?)?
        .sqr()?
        .mean_all()?;
    let grads = loss.backward()?;
    let mut out = HashMap::new();
    for (name, v) in names.iter().zip(&vars) {
        let g = grads.get(v).ok_or(format!("no gradient reached {name}"))?;
        out.insert(name.clone(), g.clone());
    }
    layers.detach_all();
    Ok((loss.to_scalar::<f32>()? as f64, out))
}

/// SD 1.5 (random weights) training steps with `atoms` on every conv, AdamW, the loss scaled by
/// 2^16 in f16: median seconds per step after a warm-up step, and peak memory, for each dtype,
/// batch and checkpointing mode (in increasing order of memory, so that what an allocator keeps
/// from one run does not inflate the next one's peak).
fn train_steps(a: &Args, device: &Device) -> Res<Value> {
    let preset: Preset = a.model.parse()?;
    let mut rows = Vec::new();
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F16, DType::BF16]
    };
    for &dtype in dtypes {
        let opts = LoadOptions {
            dtype,
            device: device.clone(),
            ..Default::default()
        };
        let unet = StableDiffusion::random(preset, &opts)?.unet;
        for batch in [1, 2] {
            for ckpt in [
                Checkpointing::All,
                Checkpointing::Selective,
                Checkpointing::Off,
            ] {
                let ((step_s, loss), peak) =
                    with_peak(device, || train_run(&unet, a, batch, ckpt))?;
                rows.push(json!({
                    "dtype": format!("{dtype:?}").to_lowercase(),
                    "batch": batch,
                    "checkpointing": format!("{ckpt:?}").to_lowercase(),
                    "step_s": step_s,
                    "loss": loss,
                    "peak_gb": peak,
                }));
                eprintln!("{}", rows.last().map(Value::to_string).unwrap_or_default());
            }
        }
    }
    Ok(json!({
        "model": a.model,
        "latent": a.latent,
        "steps": a.steps,
        "rows": rows,
    }))
}

/// One configuration's steps: (median seconds per step, last loss).
fn train_run(unet: &Unet, a: &Args, batch: usize, ckpt: Checkpointing) -> Res<(f64, f64)> {
    let layers: &Layers = unet.layers();
    layers.detach_all();
    layers.set_checkpointing(ckpt);
    for name in layers.select(Targets::Conv) {
        let base = layers.get(&name).ok_or("layer")?.weight;
        let adapter = LayerAdapter::new(&AdapterConfig::new(Method::Atoms), &name, &base)?;
        layers.attach(&name, adapter, 1.0)?;
    }
    let mut opt = AdamW::new(layers.vars(), AdamWConfig::default())?;
    let device = unet.device();
    let dtype = unet.dtype();
    let scale = if dtype == DType::F16 { 65536.0 } else { 1.0 };
    let mut rng = NoiseRng::new(7);
    let ctx_dim = unet.config().cross_attention_dim;
    let (mut times, mut loss_v) = (Vec::new(), 0f64);
    for _ in 0..=a.steps {
        let x = rng.randn(&[batch, 4, a.latent, a.latent], DType::F32, device)?;
        let eps = rng.randn(&[batch, 4, a.latent, a.latent], DType::F32, device)?;
        let ctx = rng.randn(&[batch, 77, ctx_dim], DType::F32, device)?;
        let t = Tensor::new(vec![500u32; batch].as_slice(), device)?;
        device.synchronize()?;
        let start = Instant::now();
        let pred = unet.forward(&x.to_dtype(dtype)?, &t, &ctx.to_dtype(dtype)?)?;
        let loss = (pred.to_dtype(DType::F32)? - eps)?.sqr()?.mean_all()?;
        let grads = (&loss * scale)?.backward()?;
        let g: Vec<Option<Tensor>> = opt.vars().iter().map(|v| grads.get(v).cloned()).collect();
        opt.step(&g, 1e-4, 1.0 / scale)?;
        loss_v = loss.to_scalar::<f32>()? as f64;
        times.push(start.elapsed().as_secs_f64());
    }
    layers.detach_all();
    layers.set_checkpointing(Checkpointing::Off);
    let mut steady = times[1..].to_vec();
    steady.sort_by(f64::total_cmp);
    Ok((steady[steady.len() / 2], loss_v))
}

/// A text-to-image run (DDIM, guidance 7.5) with SD 1.5's architecture and random weights, the
/// fixture's CLIP tokenizer lent to it: seconds in all and per step, and peak memory.
fn sampling(a: &Args, device: &Device) -> Res<Value> {
    let preset: Preset = a.model.parse()?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    };
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        ..Default::default()
    };
    let mut sd = StableDiffusion::random(preset, &opts)?;
    sd.text.first.tokenizer = Some(ClipTokenizer::from_dir(&a.fixture.join("tokenizer"))?);
    let req = Request {
        prompt: "a photo of a dog on the beach".into(),
        negative_prompt: None,
        steps: a.sample_steps,
        guidance: 7.5,
        scheduler: SchedulerKind::Ddim,
        width: a.sample_size,
        height: a.sample_size,
        seed: 1,
        latents: None,
    };
    sd.unet.layers().bake()?;
    let pipe = Pipeline::new(&sd)?;
    let ((seconds, finite), peak) = with_peak(device, || {
        let start = Instant::now();
        let g = pipe.generate(&req, &mut |_| {})?;
        let sum = g.image.sum_all()?.to_scalar::<f32>()?;
        Ok((start.elapsed().as_secs_f64(), sum.is_finite()))
    })?;
    Ok(json!({
        "dtype": format!("{dtype:?}").to_lowercase(),
        "size": a.sample_size,
        "steps": a.sample_steps,
        "seconds": seconds,
        "step_s": seconds / a.sample_steps as f64,
        "finite": finite,
        "peak_gb": peak,
    }))
}
