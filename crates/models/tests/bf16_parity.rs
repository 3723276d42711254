//! Mixed precision on the CPU (`ops::cpu_bf16`: matrix products with bf16 operands and f32
//! sums) against diffusers' f32 outputs on the reference fixtures, within bf16's tolerance: the
//! UNet's output, and the training loss and gradients. One test in its own binary: the switch is
//! process-wide.

use std::path::Path;

use atoms::{AdapterConfig, LayerAdapter, Method};
use candle_core::Tensor;

mod common;
use common::{fixture, load_unet, reference, rel_err};

/// The UNet's output, the loss and the 7 gradients of the fixture's training step.
fn run(dir: &Path) -> (Tensor, f32, Vec<(String, Tensor)>) {
    let r = reference(dir);
    let unet = load_unet(dir);
    let out = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timestep"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap();
    let layers = unet.layers();
    let mut vars = Vec::new();
    for k in r.keys().filter_map(|k| k.strip_prefix("train.grad.")) {
        let layer = k.strip_suffix(".weight").unwrap().to_string();
        let base = layers.get(&layer).unwrap().weight;
        let a = LayerAdapter::new(&AdapterConfig::new(Method::Full), &layer, &base).unwrap();
        vars.push((layer.clone(), atoms::Adapter::vars(&a)[0].clone()));
        layers.attach(&layer, a, 1.0).unwrap();
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
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|(l, v)| (l.clone(), grads.get(v).unwrap().clone()))
        .collect();
    (out, loss.to_scalar::<f32>().unwrap(), g)
}

/// bf16's unit roundoff is 2^-9 = 0.2%; each product rounds both operands once, and the errors
/// of a few dozen layers add up: 2% of the output's scale, 1% of the loss, 5% of each
/// gradient's. The f32 run is 100x closer, so the bf16 run is seen to differ.
#[test]
fn bf16_products_stay_within_bf16_tolerance_of_diffusers() {
    if !models::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    for name in ["tiny-sd-2block", "tiny-sd15-shape"] {
        let Some(dir) = fixture(name) else { return };
        let r = reference(&dir);
        models::cpu_bf16::set_enabled(false);
        let (out32, _, _) = run(&dir);
        models::cpu_bf16::set_enabled(true);
        let (out, loss, grads) = run(&dir);
        models::cpu_bf16::set_enabled(false);
        let (e32, e) = (
            rel_err(&out32, &r["unet.out"]),
            rel_err(&out, &r["unet.out"]),
        );
        eprintln!("{name}: UNet output relative error f32 {e32:.2e}, bf16 products {e:.2e}");
        assert!(e < 2e-2, "{name}: bf16 output error {e}");
        assert!(
            e > 10.0 * e32,
            "{name}: bf16 ({e}) no further than f32 ({e32}): did it run?"
        );
        let want = r["train.loss"].to_vec1::<f32>().unwrap()[0];
        let le = (loss - want).abs() / want;
        assert!(le < 1e-2, "{name}: loss {loss} vs {want}");
        for (layer, g) in grads {
            let ge = rel_err(&g, &r[&format!("train.grad.{layer}.weight")]);
            eprintln!("{name}: {layer} gradient relative error {ge:.2e}");
            assert!(ge < 5e-2, "{name} {layer}: gradient error {ge}");
        }
    }
}
