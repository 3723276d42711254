//! An exported adapter file applied the way ComfyUI and A1111 apply it (`W + diff`, or
//! `W + up @ down * alpha / rank`) gives the UNet the delta gives it.

use std::collections::HashMap;

use atoms::export::{export, module_name, Format};
use atoms::{Adapter, AdapterConfig, LayerAdapter, Method};
use candle_core::{DType, Device, Tensor};
use models::{Layers, Targets, Unet, UnetConfig, Weights};

fn unet(dir: &std::path::Path) -> Unet {
    let cfg = UnetConfig::read(&dir.join("unet/config.json")).unwrap();
    let w = Weights::from_files(
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    Unet::new(&w, &cfg, &Layers::new("tiny")).unwrap()
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(77);
            (((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 0.1
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    n(&(a - b).unwrap()) / n(b)
}

/// Attaches `full` adapters holding `changes` (layer -> dW).
fn attach_full(u: &Unet, changes: &HashMap<String, Tensor>) {
    let layers = u.layers();
    layers.detach_all();
    for (name, dw) in changes {
        let base = layers.get(name).unwrap().weight;
        let a = LayerAdapter::new(&AdapterConfig::new(Method::Full), name, &base).unwrap();
        a.vars()[0].set(dw).unwrap();
        layers.attach(name, a, 1.0).unwrap();
    }
}

#[test]
fn diff_and_locon_exports_apply_as_the_delta_does() {
    let Some(dir) = testutil::fixture("tiny-sd15-shape", &["unet", "reference.safetensors"]) else {
        return;
    };
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let u = unet(&dir);
    let layers = u.layers();
    let mut changes = Vec::new();
    for (i, name) in layers.select(Targets::Conv).iter().enumerate() {
        let base = layers.get(name).unwrap().weight;
        let a = LayerAdapter::new(&AdapterConfig::new(Method::Atoms), name, &base).unwrap();
        for v in a.vars() {
            v.set(&seeded(v.dims(), i as u64)).unwrap();
        }
        changes.push((name.clone(), a.delta_weight(&base, 1.0).unwrap()));
        layers.attach(name, a, 1.0).unwrap();
    }
    let run = || {
        u.forward(
            &r["unet.sample"],
            &r["unet.timestep"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap()
    };
    let with_delta = run();
    let read = |format| -> HashMap<String, Tensor> {
        let bytes = export(&changes, format)
            .unwrap()
            .to_bytes(HashMap::new())
            .unwrap();
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap()
    };
    // diff: W + diff, as ComfyUI applies it
    let file = read(Format::Diff);
    let diffs: HashMap<String, Tensor> = changes
        .iter()
        .map(|(n, _)| (n.clone(), file[&format!("{}.diff", module_name(n))].clone()))
        .collect();
    attach_full(&u, &diffs);
    let e = rel(&run(), &with_delta);
    assert!(e < 1e-4, "diff: {e}");
    // locon at full rank: W + up @ down * alpha / rank
    let file = read(Format::Locon {
        rank: Some(usize::MAX), // capped at each layer's full rank
        max_error: 0.0,
    });
    let ups: HashMap<String, Tensor> = changes
        .iter()
        .map(|(n, dw)| {
            let m = module_name(n);
            let (up, down) = (
                &file[&format!("{m}.lora_up.weight")],
                &file[&format!("{m}.lora_down.weight")],
            );
            let rank = up.dim(1).unwrap();
            let alpha = file[&format!("{m}.alpha")].to_scalar::<f32>().unwrap();
            let prod = up
                .flatten_from(1)
                .unwrap()
                .matmul(&down.flatten_from(1).unwrap())
                .unwrap();
            let dw2 = (prod.reshape(dw.dims()).unwrap() * (alpha / rank as f32) as f64).unwrap();
            (n.clone(), dw2)
        })
        .collect();
    attach_full(&u, &ups);
    let e = rel(&run(), &with_delta);
    eprintln!("locon at full rank: output relative error {e:.2e}");
    assert!(e < 0.01, "locon full rank: {e}");
    // at rank 1 the reported error is the error of applying it
    let ex = export(
        &changes,
        Format::Locon {
            rank: Some(1),
            max_error: 0.0,
        },
    )
    .unwrap();
    let t: HashMap<&str, &Tensor> = ex.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    for ((name, dw), l) in changes.iter().zip(&ex.layers) {
        let m = module_name(name);
        let up = t[format!("{m}.lora_up.weight").as_str()]
            .flatten_from(1)
            .unwrap();
        let down = t[format!("{m}.lora_down.weight").as_str()]
            .flatten_from(1)
            .unwrap();
        let approx = up.matmul(&down).unwrap().reshape(dw.dims()).unwrap();
        let actual = rel(&approx, dw) as f64;
        assert!(
            (actual - l.rel_error).abs() < 1e-4,
            "{name}: {actual} vs {}",
            l.rel_error
        );
    }
}
