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
