//! The UNet against diffusers on the reference fixtures (`../shared/fixtures`, see its README):
//! outputs within 1e-4 of the output's scale, and the training loss and gradients.

use candle_core::{DType, Device, Tensor};
use models::{Kernels, Layers, Unet, UnetConfig, Weights};

const FIXTURES: [&str; 2] = ["tiny-sd-2block", "tiny-sd15-shape"];

mod common;
use common::{fixture, load_unet, reference, rel_err};

#[test]
fn time_embedding_matches_diffusers() {
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = reference(&dir);
        let unet = load_unet(&dir);
        let proj = unet.time_proj(&r["unet.timestep"]).unwrap();
        assert!(
            rel_err(&proj, &r["unet.time_proj"]) < 1e-5,
            "{name} time_proj"
        );
        let emb = unet.time_embedding(&proj).unwrap();
        assert!(rel_err(&emb, &r["unet.time_emb"]) < 1e-5, "{name} time_emb");
    }
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn unet_output_matches_diffusers_at_batch_1_and_2() {
    for kernels in Kernels::ALL {
        kernels.scope(unet_output_matches_diffusers);
    }
}

fn unet_output_matches_diffusers() {
    let kernels = Kernels::current().unwrap();
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = reference(&dir);
        let unet = load_unet(&dir);
        let out = unet
            .forward(
                &r["unet.sample"],
                &r["unet.timestep"],
                &r["unet.encoder_hidden_states"],
            )
            .unwrap();
        let e = rel_err(&out, &r["unet.out"]);
        eprintln!("{name} ({kernels}): unet batch 1 relative error {e:.2e}");
        assert!(e < 1e-4, "{name} ({kernels}) batch 1: relative error {e}");
        let out = unet
            .forward(
                &r["unet.b2.sample"],
                &r["unet.b2.timestep"],
                &r["unet.b2.encoder_hidden_states"],
            )
            .unwrap();
        let e = rel_err(&out, &r["unet.b2.out"]);
        assert!(e < 1e-4, "{name} ({kernels}) batch 2: relative error {e}");
    }
}

/// The training step of the fixture: epsilon-MSE at t=321 and the gradients of 7 weights,
/// through `full` adapters on those layers (the gradient of `dW` is the gradient of `W`), with
/// each kernel choice.
#[test]
fn training_loss_and_gradients_match_diffusers() {
    for kernels in Kernels::ALL {
        kernels.scope(training_loss_and_gradients_match);
    }
}

fn training_loss_and_gradients_match() {
    use atoms::{AdapterConfig, LayerAdapter, Method};
    let kernels = Kernels::current().unwrap();
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = reference(&dir);
        let unet = load_unet(&dir);
        let layers = unet.layers();
        let grads_ref: Vec<(String, &Tensor)> = r
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("train.grad.")
                    .map(|p| (p.strip_suffix(".weight").unwrap().to_string(), v))
            })
            .collect();
        assert_eq!(grads_ref.len(), 7);
        let mut vars = Vec::new();
        for (layer, _) in &grads_ref {
            let base = layers
                .get(layer)
                .unwrap_or_else(|| panic!("{layer} not registered"))
                .weight;
            let a = LayerAdapter::new(&AdapterConfig::new(Method::Full), layer, &base).unwrap();
            vars.push(atoms::Adapter::vars(&a)[0].clone());
            layers.attach(layer, a, 1.0).unwrap();
        }
        let pred = unet
            .forward(
                &r["train.noisy"],
                &r["train.t"],
                &r["text.last_hidden_state"],
            )
            .unwrap();
        let loss = (pred - &r["train.noise"])
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        let want = r["train.loss"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (l - want).abs() / want < 1e-5,
            "{name} ({kernels}): loss {l} vs {want}"
        );
        let grads = loss.backward().unwrap();
        for ((layer, g_ref), v) in grads_ref.iter().zip(&vars) {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient reached {layer}"));
            let e = rel_err(g, g_ref);
            assert!(
                e < 1e-3,
                "{name} ({kernels}) {layer}: gradient relative error {e}"
            );
        }
        layers.detach_all();
    }
}

/// Each batch element gets its own timestep: a batch of two at (500, 999) equals two batches
/// of one.
#[test]
fn one_timestep_per_batch_element() {
    let Some(dir) = fixture("tiny-sd-2block") else {
        return;
    };
    let r = reference(&dir);
    let unet = load_unet(&dir);
    let (x, c) = (&r["unet.b2.sample"], &r["unet.b2.encoder_hidden_states"]);
    let both = unet
        .forward(x, &Tensor::new(&[500i64, 999], &Device::Cpu).unwrap(), c)
        .unwrap();
    for (i, t) in [500i64, 999].into_iter().enumerate() {
        let one = unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &Tensor::new(&[t], &Device::Cpu).unwrap(),
                &c.narrow(0, i, 1).unwrap(),
            )
            .unwrap();
        let e = rel_err(&both.narrow(0, i, 1).unwrap(), &one);
        assert!(e < 1e-5, "element {i}: {e}");
    }
}

/// SD 2.x's linear `proj_in`/`proj_out` compute what SD 1.x's 1x1 convs do with the same
/// weights: the fixture's UNet with its conv projections reshaped to linear ones, under
/// `use_linear_projection = true`, gives the fixture's output.
#[test]
fn linear_projections_equal_conv_projections() {
    let Some(dir) = fixture("tiny-sd15-shape") else {
        return;
    };
    let r = reference(&dir);
    let mut tensors = candle_core::safetensors::load(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (k, v) in tensors.iter_mut() {
        if (k.contains("proj_in.weight") || k.contains("proj_out.weight")) && v.rank() == 4 {
            *v = v.squeeze(3).unwrap().squeeze(2).unwrap();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("unet.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let text = std::fs::read_to_string(dir.join("unet/config.json")).unwrap();
    let text = text.replace(
        "\"use_linear_projection\": false",
        "\"use_linear_projection\": true",
    );
    let cfg = UnetConfig::parse(&dir.join("unet/config.json"), &text).unwrap();
    assert!(cfg.use_linear_projection);
    let w = Weights::from_files(&[file], DType::F32, &Device::Cpu).unwrap();
    let unet = Unet::new(&w, &cfg, &Layers::new("linear")).unwrap();
    let out = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timestep"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap();
    let e = rel_err(&out, &r["unet.out"]);
    assert!(e < 1e-4, "relative error {e}");
}

/// Half-precision weights run (norms and attention scores in f32) and stay close to f32.
#[test]
fn half_precision_forward_stays_close() {
    let Some(dir) = fixture("tiny-sd15-shape") else {
        return;
    };
    let r = reference(&dir);
    let cfg = UnetConfig::read(&dir.join("unet/config.json")).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let w = Weights::from_files(
            &[dir.join("unet/diffusion_pytorch_model.safetensors")],
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        let unet = Unet::new(&w, &cfg, &Layers::new("half")).unwrap();
        let x = r["unet.sample"].to_dtype(dtype).unwrap();
        let c = r["unet.encoder_hidden_states"].to_dtype(dtype).unwrap();
        let out = unet.forward(&x, &r["unet.timestep"], &c).unwrap();
        assert_eq!(out.dtype(), dtype);
        let e = rel_err(&out, &r["unet.out"]);
        let tol = if dtype == DType::F16 { 1e-2 } else { 5e-2 };
        assert!(e < tol, "{dtype:?}: relative error {e}");
        eprintln!("{dtype:?}: relative error {e:.2e}");
    }
}
