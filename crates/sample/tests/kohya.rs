//! Community adapter files in (kohya / LyCORIS LoRA, LoCon, diff): each module lands on the
//! layer it names (diffusers or original LDM names, UNet or text encoder) as
//! `W + weight * up @ down * alpha / rank`, or `W + weight * diff`.

use std::collections::HashMap;

use atoms::kohya::AnyDelta;
use candle_core::{Device, Tensor};
use models::{LoadOptions, StableDiffusion};
use sample::apply_deltas;

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let v = testutil::seeded_values(shape.iter().product(), seed);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn kohya_modules_apply_as_w_plus_up_down_alpha_over_rank() {
    let Some(dir) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let (unet, te) = (
        sd.unet.layers().clone(),
        sd.text.first.model.layers().clone(),
    );
    let conv = "down_blocks.0.resnets.0.conv1"; // [32, 32, 3, 3]
    let linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"; // [32, 32]
    let te_q = "text_model.encoder.layers.0.self_attn.q_proj";
    let diff_layer = "conv_out";
    let mut t: HashMap<String, Tensor> = HashMap::new();
    // a LoCon on a conv (diffusers name), rank 2, alpha 1
    t.insert(
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight".into(),
        seeded(&[2, 32, 3, 3], 1),
    );
    t.insert(
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight".into(),
        seeded(&[32, 2, 1, 1], 2),
    );
    t.insert(
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha".into(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    // a LoRA on a linear by its original LDM name, rank 4, no alpha (= rank)
    let ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q";
    t.insert(format!("{ldm}.lora_down.weight"), seeded(&[4, 32], 3));
    t.insert(format!("{ldm}.lora_up.weight"), seeded(&[32, 4], 4));
    // a text-encoder LoRA
    t.insert(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(),
        seeded(&[1, 32], 5),
    );
    t.insert(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".into(),
        seeded(&[32, 1], 6),
    );
    // a LyCORIS full diff
    t.insert("lora_unet_conv_out.diff".into(), seeded(&[4, 32, 3, 3], 7));
    // and a module of another model
    t.insert(
        "lora_unet_label_emb_0_0.lora_down.weight".into(),
        seeded(&[1, 8], 8),
    );
    t.insert(
        "lora_unet_label_emb_0_0.lora_up.weight".into(),
        seeded(&[8, 1], 9),
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("lora.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();

    let file = AnyDelta::read(&path).unwrap();
    assert!(file.atomtune().is_none());
    let base = |l: &models::Layers, n: &str| l.get(n).unwrap().weight;
    let (w_conv, w_lin, w_te, w_out) = (
        base(&unet, conv),
        base(&unet, linear),
        base(&te, te_q),
        base(&unet, diff_layer),
    );
    let warnings = apply_deltas(&sd, &[(file, 0.5)], false).unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].contains("lora_unet_label_emb_0_0"),
        "{warnings:?}"
    );

    let lora = |down: &Tensor, up: &Tensor, scale: f64| {
        up.flatten_from(1)
            .unwrap()
            .matmul(&down.flatten_from(1).unwrap())
            .unwrap()
            * scale
    };
    let d = |k: &str| &t[k];
    let got = unet.effective_weights().unwrap();
    let want_conv = (&w_conv
        + lora(
            d("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"),
            d("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"),
            0.5 * 1.0 / 2.0,
        )
        .unwrap()
        .reshape(w_conv.dims())
        .unwrap())
    .unwrap();
    assert!(max_diff(&got[conv], &want_conv) < 1e-6);
    let want_lin = (&w_lin
        + lora(
            &t[&format!("{ldm}.lora_down.weight")],
            &t[&format!("{ldm}.lora_up.weight")],
            0.5,
        )
        .unwrap())
    .unwrap();
    assert!(max_diff(&got[linear], &want_lin) < 1e-6);
    let want_out = (&w_out + (d("lora_unet_conv_out.diff") * 0.5).unwrap()).unwrap();
    assert!(max_diff(&got[diff_layer], &want_out) < 1e-6);
    let te_got = te.effective_weights().unwrap();
    let want_te = (&w_te
        + lora(
            d("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"),
            d("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"),
            0.5,
        )
        .unwrap())
    .unwrap();
    assert!(max_diff(&te_got[te_q], &want_te) < 1e-6);

    // a file of another model entirely
    let only: HashMap<String, Tensor> = t
        .into_iter()
        .filter(|(k, _)| k.contains("label_emb"))
        .collect();
    candle_core::safetensors::save(&only, &path).unwrap();
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = apply_deltas(&sd, &[(AnyDelta::read(&path).unwrap(), 1.0)], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none of the 1 modules"), "{e}");
}

/// A kohya LoRA / LoCon file (linear and conv modules of the UNet, four of the text encoder,
/// each with its own rank and alpha) at weight 0.7 gives what diffusers' `load_lora_weights`
/// and `fuse_lora(lora_scale=0.7)` give: the UNet's output on the fixture's reference inputs and
/// the text encoder's last hidden state, within 1e-4 of their scale
/// (`tests/data/kohya`, made by `scripts/make-kohya-reference.py`).
#[test]
fn a_kohya_file_applies_as_diffusers_load_lora_weights_does() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let data = testutil::data_path("kohya");
    let want =
        candle_core::safetensors::load(data.join("reference.safetensors"), &Device::Cpu).unwrap();
    let r = candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
    let sd = StableDiffusion::load(fx.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let file = AnyDelta::read(&data.join("lora.safetensors")).unwrap();
    let warnings = apply_deltas(&sd, &[(file, 0.7)], false).unwrap();
    assert!(
        warnings.is_empty(),
        "every module names a layer: {warnings:?}"
    );
    let rel = |a: &Tensor, b: &Tensor| {
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        max_diff(a, b) / s
    };
    let unet = sd
        .unet
        .forward(
            &r["unet.sample"],
            &r["unet.timestep"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap();
    let e = rel(&unet, &want["unet.out"]);
    assert!(e < 1e-4, "UNet output {e} from diffusers'");
    assert!(
        rel(&unet, &r["unet.out"]) > 1e-2,
        "the file changes the UNet"
    );
    let te = sd.text.first.model.forward(&r["text.input_ids"]).unwrap();
    let e = rel(&te.last_hidden_state, &want["text.last_hidden_state"]);
    assert!(e < 1e-4, "text encoder output {e} from diffusers'");
}
