//! Prior preservation's class images: the ones in `--class-images`, topped up to
//! `--num-class-images` with images the base model generates from the class prompt (and saved
//! there, so a rerun reuses them).

use std::path::{Path, PathBuf};

use models::StableDiffusion;
use sample::pipeline::to_rgb8;
use sample::{png_io, Infotext, Pipeline, Request};

use crate::dataset::image_files;
use crate::{Error, Result};

/// How class images are made when some are missing.
#[derive(Clone, Debug)]
pub struct ClassImageOptions {
    /// The class prompt (`a photo of dog`).
    pub prompt: String,
    /// How many class images there should be.
    pub count: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Image side in pixels.
    pub resolution: usize,
    /// Seeds are `seed + index` (wrapping).
    pub seed: u64,
}

/// Makes sure `dir` holds at least `o.count` images, generating the missing ones with the base
/// model (no adapters must be attached yet). Returns the paths it wrote.
pub fn ensure_class_images(
    sd: &StableDiffusion,
    dir: &Path,
    o: &ClassImageOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let have = image_files(dir)?.len();
    if have >= o.count {
        return Ok(Vec::new());
    }
    if !sd.unet.layers().vars().is_empty() {
        return Err(Error::Config("class images must come from the base model: generate them before adapters are attached".into()));
    }
    let pipe = Pipeline::new(sd)?;
    // (the trainer warns once when the model's scheduler is not one we have)
    let (scheduler, _) = pipe.default_scheduler();
    let missing = o.count - have;
    let mut written = Vec::new();
    let mut index = have;
    for k in 0..missing {
        // the first free name
        let path = loop {
            let p = dir.join(format!("class-{index:05}.png"));
            index += 1;
            if !p.exists() {
                break p;
            }
        };
        let seed = o.seed.wrapping_add((index - 1) as u64);
        let req = Request {
            prompt: o.prompt.clone(),
            negative_prompt: None,
            steps: o.steps,
            guidance: o.guidance,
            scheduler,
            width: o.resolution,
            height: o.resolution,
            seed,
            latents: None,
        };
        let out = pipe.generate(&req, &mut |_| {})?;
        let (w, h, rgb) = to_rgb8(&out.image)?.remove(0);
        let info = Infotext::of_request(&req, &sd.id, []);
        png_io::write_png(&path, w, h, &rgb, &info.render())?;
        written.push(path);
        progress(k + 1, missing);
    }
    Ok(written)
}
