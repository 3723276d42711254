//! Latents and text embeddings, computed once per training run (DESIGN.md section 2: the VAE and
//! text encoder are frozen).
//!
//! Each image is encoded as it is and mirrored (when flips are on), keeping the latent
//! distribution's mean and standard deviation; a training step samples `mean + std * noise` and,
//! for images kept whole, crops a random `resolution / 8` square of the latents (a random crop of
//! the image, done in latent space so it needs no VAE pass per step).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use models::StableDiffusion;
use sample::NoiseRng;

use crate::dataset::TrainImage;
use crate::Result;

/// An image's latent distribution, as is and mirrored.
#[derive(Clone, Debug)]
pub struct CachedImage {
    /// Means `[1, c, h, w]`: as is, and mirrored (when flips are on).
    pub mean: Vec<Tensor>,
    /// Standard deviations, alike.
    pub std: Vec<Tensor>,
    /// Index of its caption's embedding.
    pub caption: usize,
}

/// Cached latents of a set of images and embeddings of their captions.
pub struct LatentCache {
    /// The images.
    pub images: Vec<CachedImage>,
    /// Text embeddings `[77, d]`, one per distinct caption.
    pub embeddings: Vec<Tensor>,
    /// The distinct captions, in the order of `embeddings`.
    pub captions: Vec<String>,
    /// The latent side a training example has (`resolution / 8`).
    pub side: usize,
    scaling: f64,
}

/// `[1, 3, h, w]` in `[-1, 1]`.
fn to_tensor(img: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let t = Tensor::from_vec(img.as_raw().clone(), (h, w, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    let t = ((t / 127.5)? - 1.0)?.unsqueeze(0)?;
    Ok(t.to_device(device)?.to_dtype(dtype)?)
}

impl LatentCache {
    /// Encodes `images` (and their mirrors when `flip`) and the text of `captions[i]` for
    /// each image `i`; `progress(done, total)` after each image.
    pub fn build(
        sd: &StableDiffusion,
        images: &[TrainImage],
        captions: &[String],
        resolution: usize,
        flip: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let device = sd.unet.device().clone();
        // The VAE's own dtype: f32 when its config says force_upcast (it then computes in f32
        // inside a half-precision model, and redoes an image in f32 if half precision gave NaN).
        let dtype = sd.vae.dtype();
        let mut distinct: Vec<String> = Vec::new();
        let mut cached = Vec::new();
        for (i, (img, caption)) in images.iter().zip(captions).enumerate() {
            let mut variants = vec![img.rgb.clone()];
            if flip {
                variants.push(image::imageops::flip_horizontal(&img.rgb));
            }
            let (mut mean, mut std) = (Vec::new(), Vec::new());
            for v in &variants {
                let dist = sd.vae.encode(&to_tensor(v, &device, dtype)?)?;
                mean.push(dist.mean.to_dtype(DType::F32)?);
                std.push(dist.logvar.to_dtype(DType::F32)?.affine(0.5, 0.0)?.exp()?);
            }
            let idx = match distinct.iter().position(|c| c == caption) {
                Some(k) => k,
                None => {
                    distinct.push(caption.clone());
                    distinct.len() - 1
                }
            };
            cached.push(CachedImage {
                mean,
                std,
                caption: idx,
            });
            progress(i + 1, images.len());
        }
        let mut embeddings = Vec::new();
        let tok = sd.tokenizer.as_ref().ok_or_else(|| {
            crate::Error::Config(format!(
                "model `{}` has no tokenizer; train on a real model folder or hub id",
                sd.id
            ))
        })?;
        for c in &distinct {
            let ids = tok.encode(c, true)?.ids;
            let ids = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
            embeddings.push(
                sd.text_encoder
                    .forward(&ids)?
                    .last_hidden_state
                    .squeeze(0)?,
            );
        }
        Ok(LatentCache {
            images: cached,
            embeddings,
            captions: distinct,
            side: resolution / sd.vae.downscale(),
            scaling: sd.vae.scaling_factor(),
        })
    }

    /// Whether mirrored latents are there.
    pub fn has_flips(&self) -> bool {
        self.images.first().is_some_and(|i| i.mean.len() == 2)
    }

    /// A training latent of image `i`: mirrored if `flipped`, sampled with `rng`, cropped at a
    /// random offset when the image was kept whole; times the VAE's scaling factor.
    pub fn draw(&self, i: usize, flipped: bool, rng: &mut NoiseRng) -> Result<Tensor> {
        let img = &self.images[i];
        let k = usize::from(flipped && img.mean.len() == 2);
        let (mean, std) = (&img.mean[k], &img.std[k]);
        let noise = rng.randn(mean.dims(), DType::F32, mean.device())?;
        let z = ((mean + (std * noise)?)? * self.scaling)?;
        let (_, _, h, w) = z.dims4()?;
        let (dy, dx) = (
            if h > self.side {
                rng.below((h - self.side + 1) as u64) as usize
            } else {
                0
            },
            if w > self.side {
                rng.below((w - self.side + 1) as u64) as usize
            } else {
                0
            },
        );
        Ok(z.narrow(2, dy, self.side.min(h))?
            .narrow(3, dx, self.side.min(w))?)
    }
}
