//! Writes one valid delta per method into `fuzz/seeds/`, made on the fuzz target's base, as the
//! starting corpus: `cargo run --release --example make_seeds` (in `fuzz/`).

use atoms::{AdapterConfig, Delta, DeltaMeta, DictionaryKind, LassoOptions, LayerAdapter, Method, TensorBase};
use candle_core::{Device, Tensor};

fn main() {
    let layer = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0).collect();
        (name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
    };
    let base = TensorBase::new(
        "fuzz/base",
        [
            layer("down.conv1", &[8, 4, 3, 3]),
            layer("down.shortcut", &[8, 4, 1, 1]),
            layer("attn.to_q", &[8, 12]),
        ],
    );
    let mut configs: Vec<(String, AdapterConfig)> = Method::ALL
        .into_iter()
        .map(|m| (m.to_string(), AdapterConfig { rank: 2, ..AdapterConfig::new(m) }))
        .collect();
    configs.push((
        "atoms-lasso".into(),
        AdapterConfig {
            atoms: Some(4),
            dictionary: DictionaryKind::Lasso(LassoOptions { iterations: 2, ..Default::default() }),
            ..AdapterConfig::new(Method::Atoms)
        },
    ));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, cfg) in configs {
        let adapters: Vec<(String, LayerAdapter)> = base
            .weights()
            .iter()
            .map(|(k, w)| (k.clone(), LayerAdapter::new(&cfg, k, w).unwrap()))
            .collect();
        let mut meta = DeltaMeta::new(cfg, "fuzz/base");
        meta.trigger = Some("sks".into());
        let delta = Delta::from_adapters(meta, adapters.iter().map(|(k, a)| (k.as_str(), a)), &base).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        delta.write(&path).unwrap();
        println!("{} ({} bytes)", path.display(), std::fs::metadata(&path).unwrap().len());
    }
}
