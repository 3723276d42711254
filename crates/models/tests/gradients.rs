//! Gradients through the whole UNet reach every adapter parameter, and equal finite differences.

use atoms::{Adapter, AdapterConfig, LayerAdapter, Method};
use candle_core::{DType, Device, Tensor, Var};
use models::{Checkpointing, Kernels, Layers, Targets, Unet, UnetConfig, Weights};

fn unet(name: &str, dtype: DType) -> Option<Unet> {
    let fx = testutil::fixture(name, &["unet"])?;
    let cfg = UnetConfig::read(&fx.join("unet/config.json")).unwrap();
    let w = Weights::from_files(
        &[fx.join("unet/diffusion_pytorch_model.safetensors")],
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    Some(Unet::new(&w, &cfg, &Layers::new(name)).unwrap())
}

fn seeded(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| {
            let x = (i as u64)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed.wrapping_mul(1442695040888963407));
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn attach(unet: &Unet, layer: &str, cfg: &AdapterConfig, seed: u64) -> Vec<Var> {
    let layers = unet.layers();
    let a = LayerAdapter::new(cfg, layer, &layers.get(layer).unwrap().weight).unwrap();
    let vars = a.vars();
    for (i, v) in vars.iter().enumerate() {
        v.set(&seeded(v.dims(), seed + i as u64, 0.05, v.dtype()))
            .unwrap();
    }
    layers.attach(layer, a, 1.0).unwrap();
    vars
}

/// `atoms` on every conv and rank-2 LoRA on every attention projection, with non-zero
/// parameters; their variables, layers in order.
fn attach_atoms_and_lora(unet: &Unet) -> Vec<Var> {
    let layers = unet.layers();
    let mut vars = Vec::new();
    for (i, l) in layers.select(Targets::Conv).iter().enumerate() {
        vars.extend(attach(
            unet,
            l,
            &AdapterConfig::new(Method::Atoms),
            i as u64,
        ));
    }
    let lora = AdapterConfig {
        rank: 2,
        ..AdapterConfig::new(Method::Lora)
    };
    for (i, l) in layers.select(Targets::Attn).iter().enumerate() {
        vars.extend(attach(unet, l, &lora, 1000 + i as u64));
    }
    vars
}

/// Inputs of a fixed, made-up training example.
fn inputs(dtype: DType, b: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let x = seeded(&[b, 4, 16, 16], 1, 1.0, dtype);
    let t = Tensor::new(&[321u32], &Device::Cpu).unwrap();
    let ctx = seeded(&[b, 77, 32], 2, 1.0, dtype);
    let r = seeded(&[b, 4, 16, 16], 3, 1.0, dtype);
    (x, t, ctx, r)
}

#[test]
fn every_adapter_parameter_gets_a_gradient() {
    for kernels in Kernels::ALL {
        kernels.scope(every_parameter_gets_a_gradient);
    }
}

fn every_parameter_gets_a_gradient() {
    let Some(unet) = unet("tiny-sd15-shape", DType::F32) else {
        return;
    };
    let vars = attach_atoms_and_lora(&unet);
    // 97 convs (SD 1.5 has 98: one conv_shortcut is not needed at these widths), 128 projections.
    assert_eq!(vars.len(), 97 + 2 * 128);
    let (x, t, ctx, r) = inputs(DType::F32, 2);
    let loss = (unet.forward(&x, &t, &ctx).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let kernels = Kernels::current().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{kernels}: parameter {i}: no gradient"));
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.0, "{kernels}: parameter {i}: zero gradient");
    }
}

#[test]
fn adapter_gradients_through_the_unet_equal_central_differences_in_f64() {
    for kernels in Kernels::ALL {
        kernels.scope(gradients_equal_central_differences);
    }
}

fn gradients_equal_central_differences() {
    let Some(unet) = unet("tiny-sd-2block", DType::F64) else {
        return;
    };
    let conv = "down_blocks.0.resnets.0.conv1";
    let to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let rec = "up_blocks.1.resnets.1.conv2";
    let mut vars = attach(&unet, conv, &AdapterConfig::new(Method::Atoms), 10);
    vars.extend(attach(&unet, to_k, &AdapterConfig::new(Method::Atoms), 20));
    vars.extend(attach(
        &unet,
        rec,
        &AdapterConfig::new(Method::AtomsRec),
        30,
    ));
    let (x, t, ctx, r) = inputs(DType::F64, 1);
    let loss = || {
        (unet.forward(&x, &t, &ctx).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss().backward().unwrap();
    let h = 1e-5;
    for (k, v) in vars.iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let v0 = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // A spread of entries of each parameter tensor.
        let idx: Vec<usize> = (0..8).map(|i| i * v0.len() / 8).collect();
        let (mut err, mut norm) = (0f64, 0f64);
        for &i in &idx {
            let at = |d: f64| {
                let mut w = v0.clone();
                w[i] += d;
                v.set(&Tensor::from_vec(w, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            err += (fd - g[i]).powi(2);
            norm += fd.powi(2);
        }
        v.set(&Tensor::from_vec(v0, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = (err / norm).sqrt();
        assert!(
            norm > 0.0 && rel < 1e-6,
            "{}: parameter {k}: relative error {rel}",
            Kernels::current().unwrap()
        );
    }
}

/// With the selected blocks or every resnet and transformer checkpointed, the loss is the plain
/// one bit for bit and every adapter gradient equals the plain backward's to float rounding (the
/// blocks are recomputed with the same kernels; a tensor used by several blocks sums its
/// gradients in another order); with each kernel choice.
#[test]
fn checkpointed_blocks_give_the_same_gradients() {
    for kernels in Kernels::ALL {
        kernels.scope(checkpointed_gradients_equal_plain_ones);
    }
}

fn checkpointed_gradients_equal_plain_ones() {
    let Some(unet) = unet("tiny-sd-2block", DType::F32) else {
        return;
    };
    let layers = unet.layers();
    let vars = attach_atoms_and_lora(&unet);
    let cfg_ctx = unet.config().cross_attention_dim;
    let x = seeded(&[2, 4, 16, 16], 1, 1.0, DType::F32);
    let t = Tensor::new(&[321u32], &Device::Cpu).unwrap();
    let ctx = seeded(&[2, 77, cfg_ctx], 2, 1.0, DType::F32);
    let r = seeded(&[2, 4, 16, 16], 3, 1.0, DType::F32);
    let run = |mode: Checkpointing| {
        layers.set_checkpointing(mode);
        let loss = (unet.forward(&x, &t, &ctx).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| {
                let g = grads.get(v).expect("a gradient for every parameter");
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), gs)
    };
    let (plain_loss, plain) = run(Checkpointing::Off);
    assert!(vars.len() > 10);
    for mode in [Checkpointing::Selective, Checkpointing::All] {
        let (ckpt_loss, ckpt) = run(mode);
        assert_eq!(plain_loss, ckpt_loss, "{mode:?}");
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.0 && err <= 1e-5 * scale,
                "{} {mode:?} parameter {i}: {err} of {scale}",
                Kernels::current().unwrap()
            );
        }
    }
    layers.set_checkpointing(Checkpointing::Off);
}

/// The relative L2 error of the gradients `got` against `want`, every parameter together, and
/// the median over parameters of each one's own relative error.
fn grad_errors(got: &[Vec<f32>], want: &[Vec<f32>]) -> (f64, f64) {
    let (mut d, mut n) = (0f64, 0f64);
    let mut each: Vec<f64> = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            let (mut dp, mut np) = (0f64, 0f64);
            for (&a, &b) in g.iter().zip(w) {
                dp += ((a - b) as f64).powi(2);
                np += (b as f64).powi(2);
            }
            d += dp;
            n += np;
            (dp / np.max(1e-300)).sqrt()
        })
        .collect();
    each.sort_by(f64::total_cmp);
    ((d / n).sqrt(), each[each.len() / 2])
}

/// An f16 model's backward loses precision in small gradients unless the loss is scaled first.
/// The training loss is a mean over the latent, so at SD's latent size (64x64) its gradient at
/// the UNet's output is about `2 / 16384`, at the bottom of f16's normal range; inside the UNet
/// many gradients are smaller still and fall into f16's subnormals (fewer significant bits) or
/// to zero. With the tiny fixture in f16 and atoms on every conv: unscaled gradients are
/// measurably further from the f32 ones than with the trainer's default scale (2^16, undone in
/// f32 afterwards), which leaves only f16's rounding of the forward.
#[test]
fn f16_gradients_need_a_loss_scale() {
    let Some(u32m) = unet("tiny-sd15-shape", DType::F32) else {
        return;
    };
    let u16m = unet("tiny-sd15-shape", DType::F16).unwrap();
    let side = 64;
    let x = seeded(&[1, 4, side, side], 1, 1.0, DType::F32);
    let t = Tensor::new(&[321u32], &Device::Cpu).unwrap();
    let ctx = seeded(&[1, 77, 32], 2, 1.0, DType::F32);
    let target = seeded(&[1, 4, side, side], 3, 1.0, DType::F32);
    let grads = |u: &Unet, scale: f64| -> Vec<Vec<f32>> {
        let layers = u.layers();
        let mut vars = Vec::new();
        for (i, l) in layers.select(Targets::Conv).iter().enumerate() {
            vars.extend(attach(u, l, &AdapterConfig::new(Method::Atoms), i as u64));
        }
        let dt = u.dtype();
        let pred = u
            .forward(&x.to_dtype(dt).unwrap(), &t, &ctx.to_dtype(dt).unwrap())
            .unwrap();
        let loss = (pred.to_dtype(DType::F32).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let g = (loss * scale).unwrap().backward().unwrap();
        let out = vars
            .iter()
            .map(|v| {
                (g.get(v).unwrap() / scale)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        layers.detach_all();
        out
    };
    let want = grads(&u32m, 1.0);
    let unscaled = grad_errors(&grads(&u16m, 1.0), &want);
    let scaled = grad_errors(&grads(&u16m, 65536.0), &want);
    eprintln!(
        "f16 gradient error (all, median parameter): unscaled {unscaled:?}, scaled {scaled:?}"
    );
    assert!(scaled.0 < 0.02 && scaled.1 < 0.02, "scaled {scaled:?}");
    assert!(
        unscaled.0 > 1.5 * scaled.0 && unscaled.1 > 1.5 * scaled.1,
        "unscaled {unscaled:?} vs scaled {scaled:?}"
    );
}

/// The portable kernels (the code a GPU runs) give the fused CPU kernels' loss and gradients, to
/// f32 rounding, for atoms on every conv and LoRA on every attention projection.
#[test]
fn portable_and_fused_kernels_give_the_same_gradients() {
    let Some(unet) = unet("tiny-sd15-shape", DType::F32) else {
        return;
    };
    let vars = attach_atoms_and_lora(&unet);
    let (x, t, ctx, r) = inputs(DType::F32, 2);
    let run = || {
        let loss = (unet.forward(&x, &t, &ctx).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gs: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        (loss.to_scalar::<f32>().unwrap(), gs)
    };
    let (lf, gf) = Kernels::Fused.scope(run);
    let (lp, gp) = Kernels::Portable.scope(run);
    assert!((lf - lp).abs() <= 1e-5 * lf.abs(), "loss {lf} vs {lp}");
    let (all, median) = grad_errors(&gp, &gf);
    eprintln!("portable vs fused gradients: all {all:.2e}, median parameter {median:.2e}");
    assert!(all < 1e-4 && median < 1e-4, "{all} {median}");
}
