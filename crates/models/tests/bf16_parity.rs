//! Mixed precision on the CPU (`ops::cpu_bf16`: matrix products with bf16 operands and f32
//! sums) against diffusers' f32 outputs on the reference fixtures, within bf16's tolerance: the
//! UNet's output, and the training loss and gradients. One test in its own binary: the switch is
//! process-wide.

use std::path::Path;

use atoms::{AdapterConfig, LayerAdapter, Method};
use candle_core::{DType, Tensor};

mod common;
use common::{fixture, load_unet_with, reference, rel_err};

/// The UNet's output, the loss and the 7 gradients of the fixture's training step, with conv
/// and linear weights kept in bf16 when `bf16_weights`.
fn run(dir: &Path, bf16_weights: bool) -> (Tensor, f32, Vec<(String, Tensor)>) {
    let r = reference(dir);
    let unet = load_unet_with(dir, bf16_weights);
    // what callers feed it: f32, also when its conv and linear weights are kept in bf16
    assert_eq!(unet.dtype(), DType::F32);
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
        let kept = layers.get(&layer).unwrap().weight;
        let want = if bf16_weights {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(kept.dtype(), want, "{layer}");
        // adapters start from the weight as loaded, whatever the layer keeps
        let base = layers.base_weight(&layer).unwrap();
        assert_eq!(base.dtype(), DType::F32);
        let rounded = base.to_dtype(want).unwrap().to_dtype(DType::F32).unwrap();
        let diff = (rounded - kept.to_dtype(DType::F32).unwrap()).unwrap();
        let diff = diff.abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{layer}");
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
/// gradient's; 10% with weights kept in bf16, which rounds the weights of every product, also
/// of those too small for the bf16 kernels (most of the tiny fixtures', which otherwise run in
/// f32; autocast rounds them all). The f32 run is 100x closer, so the bf16 run is seen to
/// differ. Last, the bf16 run again with its left operands tiled for AMX, on the emulated tile
/// unit (`cpu_bf16::amx::set_emulated`; the CPU's tiles are not yet trusted by default), within
/// the same tolerances: its output is ~2e-3 from the untiled run's, as far as the untiled run
/// moves for a 1e-6 change of its input (bf16 roundings flip on this tiny random model), where
/// each op's tiled products are 1e-7 to 1e-5 from its untiled ones.
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
        let (out32, _, _) = run(&dir, false);
        models::cpu_bf16::set_enabled(true);
        // bf16 products on f32 weights, then on weights kept in bf16 (what `atomtune` runs), then
        // that on tiles
        for (bf16_weights, tiles) in [(false, false), (true, false), (true, true)] {
            models::cpu_bf16::amx::set_emulated(tiles);
            let runs = models::cpu_bf16::amx::tiled_runs();
            let (out, loss, grads) = run(&dir, bf16_weights);
            let tiled = models::cpu_bf16::amx::tiled_runs() - runs;
            // (all on the CPU's tiles where they were asked for: `ATOMTUNE_CPU_AMX=1`)
            let on_cpu_tiles = models::cpu_bf16::amx::active();
            assert_eq!(
                tiled > 0,
                tiles || on_cpu_tiles,
                "{name}: {tiled} blocks on tiles"
            );
            let (e32, e) = (
                rel_err(&out32, &r["unet.out"]),
                rel_err(&out, &r["unet.out"]),
            );
            let what = format!("{name}, bf16 weights {bf16_weights}, tiles {tiles}");
            eprintln!("{what}: UNet output relative error f32 {e32:.2e}, bf16 products {e:.2e}");
            assert!(e < 2e-2, "{what}: bf16 output error {e}");
            assert!(
                e > 10.0 * e32,
                "{what}: bf16 ({e}) no further than f32 ({e32}): did it run?"
            );
            let want = r["train.loss"].to_vec1::<f32>().unwrap()[0];
            let le = (loss - want).abs() / want;
            assert!(le < 1e-2, "{what}: loss {loss} vs {want}");
            for (layer, g) in grads {
                let ge = rel_err(&g, &r[&format!("train.grad.{layer}.weight")]);
                eprintln!("{what}: {layer} gradient relative error {ge:.2e}");
                let tol = if bf16_weights { 1e-1 } else { 5e-2 };
                assert!(ge < tol, "{what} {layer}: gradient error {ge}");
            }
        }
        models::cpu_bf16::amx::set_emulated(false);
        models::cpu_bf16::set_enabled(false);
    }
}
