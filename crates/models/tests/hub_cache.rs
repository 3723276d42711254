//! A hub repo id resolves through the user's Hugging Face cache ($HF_HOME/hub, the layout Python
//! uses) when the hub cannot be reached. Its own test binary: it sets process environment.

use models::{LoadOptions, StableDiffusion};

#[test]
fn a_hub_id_loads_from_the_cache_without_network() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd-2block") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--atomtune--tiny-sd");
    let snap = repo.join("snapshots").join(commit);
    for dir in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(snap.join(dir)).unwrap();
        for e in std::fs::read_dir(fx.join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), snap.join(dir).join(e.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // SAFETY: this test binary has this one test; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        // A closed local port: the listing fails at once and the cache is used.
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let sd = StableDiffusion::load("atomtune/tiny-sd", &LoadOptions::default()).unwrap();
    assert_eq!(sd.id, "atomtune/tiny-sd");
    assert!(sd.unet.layers().get("conv_in").is_some());

    // SDXL base's layout: text_encoder_2/ and tokenizer_2/, fp16 variant weight files.
    if let Some(xl) = testutil::shared_path("fixtures/tiny-sdxl-shape") {
        let repo = home
            .path()
            .join("hub/models--stabilityai--stable-diffusion-xl-base-1.0");
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::copy(xl.join("model_index.json"), snap.join("model_index.json")).unwrap();
        for dir in [
            "unet",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "scheduler",
        ] {
            std::fs::create_dir_all(snap.join(dir)).unwrap();
            for e in std::fs::read_dir(xl.join(dir)).unwrap() {
                let e = e.unwrap();
                let name = e
                    .file_name()
                    .to_string_lossy()
                    .replace(".safetensors", ".fp16.safetensors");
                std::fs::copy(e.path(), snap.join(dir).join(name)).unwrap();
            }
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let opts = LoadOptions {
            variant: Some("fp16".into()),
            ..LoadOptions::default()
        };
        let sd = StableDiffusion::load("stabilityai/stable-diffusion-xl-base-1.0", &opts).unwrap();
        assert_eq!(sd.architecture, models::Architecture::Sdxl);
        assert!(sd
            .text
            .second
            .as_ref()
            .is_some_and(|t| t.tokenizer.is_some()));
        assert!(sd.force_zeros_for_empty_prompt);
    }

    // A repo that is neither cached nor reachable: the error names it and says why.
    let e = StableDiffusion::load("atomtune/not-cached", &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("atomtune/not-cached") && e.contains("unreachable"),
        "{e}"
    );
}
