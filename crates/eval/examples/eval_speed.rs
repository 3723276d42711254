//! Seconds per generated image for `atomtune eval` at the protocol's real model sizes (random
//! weights of `facebook/dino-vits16`'s and `openai/clip-vit-base-patch32`'s configs), on this
//! machine: DINO features and CLIP image embeddings of 224x224 images, and CLIP text embeddings
//! of their prompts. The tokenizer is eval-tiny's (CLIP's vocabulary).
//!
//! ```text
//! cargo run --release -p atomtune-eval --example eval_speed -- [IMAGES]
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eval::clip::{ClipModel, ClipModelConfig};
use eval::vit::{VitConfig, VitModel};

// https://huggingface.co/facebook/dino-vits16/blob/main/config.json (the keys that matter)
const DINO: &str = r#"{"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
  "num_attention_heads": 6, "patch_size": 16, "image_size": 224, "num_channels": 3,
  "layer_norm_eps": 1e-12, "qkv_bias": true, "hidden_act": "gelu"}"#;

// https://huggingface.co/openai/clip-vit-base-patch32/blob/main/config.json (the keys that matter)
const CLIP: &str = r#"{"projection_dim": 512,
  "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408,
    "hidden_act": "quick_gelu", "eos_token_id": 2},
  "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"}}"#;

fn main() -> eval::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let dev = Device::Cpu;
    let tmp = std::env::temp_dir().join(format!("atomtune-eval-speed-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| eval::Error::Input(e.to_string()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(tmp.join(name), text).map_err(|e| eval::Error::Input(e.to_string()))
    };
    write("dino.json", DINO)?;
    write("clip.json", CLIP)?;
    let tok = testutil::shared_path("fixtures/eval-tiny/clip-vit-tiny")
        .ok_or_else(|| eval::Error::Input("needs ../shared/fixtures/eval-tiny".into()))?;
    let w = models::Weights::random(0, DType::F32, &dev);
    let vit = VitModel::new(&w.pp("dino"), &VitConfig::read(&tmp.join("dino.json"))?)?;
    let clip = ClipModel::new(
        &w.pp("clip"),
        &ClipModelConfig::read(&tmp.join("clip.json"))?,
        &tok,
    )?;
    let px = Tensor::randn(0f32, 1.0, (n, 3, 224, 224), &dev)?;
    let prompts = vec!["a photo of a dog in the jungle"; n];
    let time = |f: &dyn Fn() -> eval::Result<Tensor>| -> eval::Result<f64> {
        f()?; // warm-up
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64() / n as f64)
    };
    let dino = time(&|| vit.cls(&px))?;
    let image = time(&|| clip.image_embeds(&px))?;
    let text = time(&|| clip.text_embeds(&prompts, &dev))?;
    println!(
        "{{\"images\": {n}, \"dino_s\": {dino:.4}, \"clip_image_s\": {image:.4}, \"clip_text_s\": {text:.4}, \"per_image_s\": {:.4}, \"threads\": {}}}",
        dino + image + text,
        candle_core::utils::get_num_threads()
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
