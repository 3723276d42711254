//! The protocol's models by hub id resolve through the Hugging Face cache when the hub cannot
//! be reached (its own test binary: it sets process environment).

use candle_core::Device;
use eval::Evaluator;

#[test]
fn hub_ids_load_from_the_cache_without_network() {
    let Some(fx) = testutil::shared_path("fixtures/eval-tiny") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    for (id, src) in [
        ("facebook--dino-vits16", "dino-vits-tiny"),
        ("openai--clip-vit-base-patch32", "clip-vit-tiny"),
    ] {
        let repo = home.path().join(format!("hub/models--{id}"));
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(fx.join(src)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
    }
    // SAFETY: this test binary has this one test; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let ev = Evaluator::load(eval::DEFAULT_DINO, eval::DEFAULT_CLIP, &Device::Cpu).unwrap();
    let t = ev.clip_text(&["a photo of a dog"]).unwrap();
    assert_eq!(t.dims(), &[1, 24]);
    // a model that is neither cached nor reachable: the error names it
    let e = Evaluator::load("someone/not-cached", eval::DEFAULT_CLIP, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("someone/not-cached"), "{e}");
}
