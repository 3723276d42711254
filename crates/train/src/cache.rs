//! Latents and text embeddings, computed once per training run (DESIGN.md section 2: the VAE and
//! text encoder are frozen).
//!
//! Each image is encoded as it is and mirrored (when flips are on), keeping the latent
//! distribution's mean and standard deviation; a training step samples `mean + std * noise` and,
//! for images kept whole, crops a random window of the training size (the resolution square or
//! the photo's aspect bucket) out of the latents (a random crop of the image, done in latent
//! space so it needs no VAE pass per step). Each drawn example carries
//! SDXL's time ids: the photo's original size, where the crop starts (in the resized, possibly
//! mirrored image, as diffusers' SDXL DreamBooth script records it), and the training size.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use models::{PromptEmbeds, StableDiffusion, TextTime};
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
    /// The photo's size before resizing, (height, width).
    pub original_size: (usize, usize),
    /// Where its center crop starts in the resized image, (top, left); (0, 0) when kept whole.
    pub crop: (usize, usize),
    /// Its mask on the latent grid `[1, 1, h, w]` in 0..1, as is and mirrored (empty: none).
    pub mask: Vec<Tensor>,
    /// The latent size of its examples, (height, width): the training size over the VAE's
    /// downscale factor.
    pub target: (usize, usize),
}

/// One training example drawn from the cache.
#[derive(Clone, Debug)]
pub struct Drawn {
    /// The latent, `[1, c, h, w]` (the image's target), times the VAE's scaling factor.
    pub latent: Tensor,
    /// SDXL's time ids of the example, `[1, 6]`: original size, crop top-left, target size.
    pub time_ids: Tensor,
    /// Where the loss counts, `[1, 1, h, w]` in 0..1, for an image with a mask.
    pub mask: Option<Tensor>,
}

/// Cached latents of a set of images and embeddings of their captions.
pub struct LatentCache {
    /// The images.
    pub images: Vec<CachedImage>,
    /// Text embeddings (batch of one), one per distinct caption.
    pub embeddings: Vec<PromptEmbeds>,
    /// The distinct captions, in the order of `embeddings`.
    pub captions: Vec<String>,
    scaling: f64,
    /// Pixels per latent cell (the VAE's downscale factor).
    factor: usize,
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

/// A mask image (its first channel, 0..255) on an `lh x lw` latent grid: each cell the mean of
/// the pixels it covers (area downsampling, as kohya's masked loss), in 0..1.
fn latent_mask(m: &RgbImage, lh: usize, lw: usize, device: &Device) -> Result<Tensor> {
    let (w, h) = (m.width() as usize, m.height() as usize);
    let mut v = vec![0f32; lh * lw];
    for (i, cell) in v.iter_mut().enumerate() {
        let (cy, cx) = (i / lw, i % lw);
        let (y0, y1) = (cy * h / lh, ((cy + 1) * h / lh).max(cy * h / lh + 1));
        let (x0, x1) = (cx * w / lw, ((cx + 1) * w / lw).max(cx * w / lw + 1));
        let mut sum = 0f32;
        for y in y0..y1.min(h) {
            for x in x0..x1.min(w) {
                sum += m.get_pixel(x as u32, y as u32)[0] as f32 / 255.0;
            }
        }
        *cell = sum / ((y1.min(h) - y0) * (x1.min(w) - x0)).max(1) as f32;
    }
    Ok(Tensor::from_vec(v, (1, 1, lh, lw), device)?)
}

impl LatentCache {
    /// Encodes `images` (and their mirrors when `flip`) and the text of `captions[i]` for
    /// each image `i`; `progress(done, total)` after each image.
    pub fn build(
        sd: &StableDiffusion,
        images: &[TrainImage],
        captions: &[String],
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
            let mut mask = Vec::new();
            if let Some(m) = &img.mask {
                let (_, _, lh, lw) = mean[0].dims4()?;
                mask.push(latent_mask(m, lh, lw, &device)?);
                if flip {
                    let mirrored = image::imageops::flip_horizontal(m);
                    mask.push(latent_mask(&mirrored, lh, lw, &device)?);
                }
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
                original_size: img.original_size,
                crop: img.crop,
                mask,
                target: (
                    img.size.0 / sd.vae.downscale(),
                    img.size.1 / sd.vae.downscale(),
                ),
            });
            progress(i + 1, images.len());
        }
        let mut embeddings = Vec::new();
        for c in &distinct {
            embeddings.push(sd.encode(&[c.as_str()])?.0);
        }
        Ok(LatentCache {
            images: cached,
            embeddings,
            captions: distinct,
            scaling: sd.vae.scaling_factor(),
            factor: sd.vae.downscale(),
        })
    }

    /// Whether mirrored latents are there.
    pub fn has_flips(&self) -> bool {
        self.images.first().is_some_and(|i| i.mean.len() == 2)
    }

    /// A training example of image `i`: its latent mirrored if `flipped`, sampled with `rng`,
    /// cropped at a random offset when the image was kept whole, times the VAE's scaling factor;
    /// and its time ids.
    pub fn draw(&self, i: usize, flipped: bool, rng: &mut NoiseRng) -> Result<Drawn> {
        let img = &self.images[i];
        let k = usize::from(flipped && img.mean.len() == 2);
        let (mean, std) = (&img.mean[k], &img.std[k]);
        let noise = rng.randn(mean.dims(), DType::F32, mean.device())?;
        let z = ((mean + (std * noise)?)? * self.scaling)?;
        let (_, _, h, w) = z.dims4()?;
        let (th, tw) = img.target;
        let (dy, dx) = (
            if h > th {
                rng.below((h - th + 1) as u64) as usize
            } else {
                0
            },
            if w > tw {
                rng.below((w - tw + 1) as u64) as usize
            } else {
                0
            },
        );
        self.example(i, &z, (dy, dx), k)
    }

    /// The center crop of image `i`'s mean latent (not mirrored, not sampled): the fixed
    /// examples learning is measured on.
    pub fn center(&self, i: usize) -> Result<Drawn> {
        let m = &self.images[i].mean[0];
        let (_, _, h, w) = m.dims4()?;
        let (th, tw) = self.images[i].target;
        let (dy, dx) = ((h - th.min(h)) / 2, (w - tw.min(w)) / 2);
        self.example(i, &(m * self.scaling)?, (dy, dx), 0)
    }

    /// Image `i`'s example cut from latents `z` (variant `k`: as is or mirrored) at latent
    /// offset `(dy, dx)`.
    fn example(&self, i: usize, z: &Tensor, (dy, dx): (usize, usize), k: usize) -> Result<Drawn> {
        let (_, _, h, w) = z.dims4()?;
        let img = &self.images[i];
        let (sh, sw) = (img.target.0.min(h), img.target.1.min(w));
        let f = self.factor;
        let crop = (img.crop.0 + dy * f, img.crop.1 + dx * f);
        let mask = match img.mask.get(k) {
            Some(m) => Some(m.narrow(2, dy, sh)?.narrow(3, dx, sw)?),
            None => None,
        };
        Ok(Drawn {
            mask,
            latent: z.narrow(2, dy, sh)?.narrow(3, dx, sw)?,
            time_ids: TextTime::time_ids(img.original_size, crop, (sh * f, sw * f), z.device())?,
        })
    }
}
