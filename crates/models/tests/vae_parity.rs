//! The VAE against diffusers on the reference fixtures.

use candle_core::{DType, Device, Tensor};
use models::{Vae, VaeConfig, Weights};

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn vae_encode_and_decode_match_diffusers() {
    for kernels in models::Kernels::ALL {
        kernels.scope(vae_matches);
    }
}

fn vae_matches() {
    // tiny-sdxl-shape: SDXL's scaling factor 0.13025 and force_upcast
    for name in ["tiny-sd-2block", "tiny-sd15-shape", "tiny-sdxl-shape"] {
        let Some(fx) = testutil::shared_path(&format!("fixtures/{name}")) else {
            return;
        };
        let r =
            candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
        let cfg = VaeConfig::read(&fx.join("vae/config.json")).unwrap();
        let w = Weights::from_files(
            &[fx.join("vae/diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let vae = Vae::new(&w, &cfg).unwrap();
        w.check_all_used().unwrap();
        let sf = r["vae.scaling_factor"].to_vec1::<f32>().unwrap()[0];
        assert_eq!(vae.scaling_factor() as f32, sf);
        let dec = vae.decode(&r["vae.latent"]).unwrap();
        let e = rel_err(&dec, &r["vae.decoded"]);
        assert!(e < 1e-4, "{name}: decode error {e}");
        let dist = vae.encode(&r["vae.enc_input"]).unwrap();
        let e = rel_err(&dist.mean, &r["vae.enc_mean"]);
        assert!(e < 1e-4, "{name}: mean error {e}");
        let e = rel_err(&dist.logvar, &r["vae.enc_logvar"]);
        assert!(e < 1e-4, "{name}: logvar error {e}");
        // sampling with zero noise is the mean
        let z = dist.sample(&dist.mean.zeros_like().unwrap()).unwrap();
        assert_eq!(rel_err(&z, &dist.mean), 0.0);
    }
}

/// In a half-precision model the VAE computes in f32 when its config says `force_upcast`
/// (diffusers' default), and a half-precision VAE that overflows (inputs far out of range here)
/// redoes the work in f32 instead of returning NaN.
#[test]
fn half_precision_vaes_fall_back_to_f32() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let r = candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
    let mut cfg = VaeConfig::read(&fx.join("vae/config.json")).unwrap();
    let w = Weights::from_files(
        &[fx.join("vae/diffusion_pytorch_model.safetensors")],
        DType::F16,
        &Device::Cpu,
    )
    .unwrap();
    assert!(cfg.force_upcast, "diffusers' default");
    let vae = Vae::new(&w, &cfg).unwrap();
    w.check_all_used().unwrap();
    assert_eq!(vae.dtype(), DType::F32);
    let dist = vae.encode(&r["vae.enc_input"]).unwrap();
    assert!(rel_err(&dist.mean, &r["vae.enc_mean"]) < 1e-4);

    cfg.force_upcast = false;
    let vae = Vae::new(&w, &cfg).unwrap();
    assert_eq!(vae.dtype(), DType::F16);
    let dist = vae.encode(&r["vae.enc_input"]).unwrap();
    assert_eq!(dist.mean.dtype(), DType::F16);
    assert!(rel_err(&dist.mean.to_dtype(DType::F32).unwrap(), &r["vae.enc_mean"]) < 1e-2);
    let huge = (&r["vae.enc_input"] * 1e6).unwrap();
    let sum = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // f16 cannot hold this input, so the f16 pass overflows...
    assert!(!sum(&huge.to_dtype(DType::F16).unwrap()).is_finite());
    // ...and the VAE answers in f32, finite.
    let dist = vae.encode(&huge).unwrap();
    assert_eq!(dist.mean.dtype(), DType::F32);
    assert!(sum(&dist.mean).is_finite());
}
