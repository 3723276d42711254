//! Image preprocessing as a model's `preprocessor_config.json` says (transformers'
//! `CLIPImageProcessor` and `ViTImageProcessor`, and their older `*FeatureExtractor` names):
//! resize (the shortest edge, or to a fixed size), center crop, rescale, normalize.
//!
//! transformers resizes with PIL; we resize with the `image` crate's filters of the same kind
//! (PIL's bicubic is Catmull-Rom, a = -0.5; both widen the filter when shrinking), so pixel
//! values can differ by a rounding step of the 8-bit intermediate image.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use serde_json::Value;

use crate::{Error, Result};

/// How the image is resized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// The shortest edge to this many pixels, keeping the aspect ratio (CLIP).
    ShortestEdge(usize),
    /// To exactly this height and width (ViT).
    Exact(usize, usize),
}

/// A model's preprocessing.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    /// The resize, if any.
    pub resize: Option<Resize>,
    /// PIL's resampling filter code (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic).
    pub resample: u64,
    /// The center crop (height, width), if any.
    pub crop: Option<(usize, usize)>,
    /// Pixels are multiplied by this (1/255).
    pub rescale: Option<f64>,
    /// Per-channel mean and standard deviation, if normalizing.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

/// A size as configs write it.
enum Size {
    /// A bare integer: the shortest edge (CLIP) or a square (ViT), by the processor's kind.
    Int(usize),
    /// `{"shortest_edge": s}`.
    Shortest(usize),
    /// `{"height": h, "width": w}`.
    Exact(usize, usize),
}

fn size_of(v: &Value) -> Option<Size> {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    if let Some(x) = v.as_u64() {
        return Some(Size::Int(x as usize));
    }
    match (n("shortest_edge"), n("height"), n("width")) {
        (Some(s), _, _) => Some(Size::Shortest(s)),
        (None, Some(h), Some(w)) => Some(Size::Exact(h, w)),
        _ => None,
    }
}

impl Preprocessor {
    /// Reads `preprocessor_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let kind = v
            .get("image_processor_type")
            .or_else(|| v.get("feature_extractor_type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let clip = match kind {
            "CLIPImageProcessor" | "CLIPImageProcessorFast" | "CLIPFeatureExtractor" => true,
            "ViTImageProcessor" | "ViTImageProcessorFast" | "ViTFeatureExtractor" => false,
            other => {
                return Err(bad(format!(
                    "image processor `{other}` is not supported (CLIPImageProcessor, ViTImageProcessor)"
                )))
            }
        };
        let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
        let resize = if flag("do_resize", true) {
            let size = v
                .get("size")
                .ok_or_else(|| bad("`size` is missing".into()))?;
            Some(
                match size_of(size)
                    .ok_or_else(|| bad(format!("`size` {size} is not understood")))?
                {
                    Size::Int(s) if clip => Resize::ShortestEdge(s),
                    Size::Int(s) => Resize::Exact(s, s),
                    Size::Shortest(s) => Resize::ShortestEdge(s),
                    Size::Exact(h, w) => Resize::Exact(h, w),
                },
            )
        } else {
            None
        };
        let crop = if flag("do_center_crop", false) {
            let c = v
                .get("crop_size")
                .ok_or_else(|| bad("`crop_size` is missing".into()))?;
            match size_of(c) {
                Some(Size::Int(s)) => Some((s, s)),
                Some(Size::Exact(h, w)) => Some((h, w)),
                _ => return Err(bad(format!("`crop_size` {c} is not understood"))),
            }
        } else {
            None
        };
        let triple = |k: &str| -> Result<[f64; 3]> {
            let a = v
                .get(k)
                .and_then(Value::as_array)
                .filter(|a| a.len() == 3)
                .ok_or_else(|| bad(format!("`{k}` should be three numbers")))?;
            let x = |i: usize| {
                a[i].as_f64()
                    .ok_or_else(|| bad(format!("`{k}` should be three numbers")))
            };
            Ok([x(0)?, x(1)?, x(2)?])
        };
        let normalize = if flag("do_normalize", true) {
            Some((triple("image_mean")?, triple("image_std")?))
        } else {
            None
        };
        let resample = v
            .get("resample")
            .and_then(Value::as_u64)
            .unwrap_or(if clip { 3 } else { 2 });
        filter(resample)
            .ok_or_else(|| bad(format!("resample {resample} is not supported (0-3)")))?;
        Ok(Preprocessor {
            resize,
            resample,
            crop,
            rescale: flag("do_rescale", true).then(|| {
                v.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0 / 255.0)
            }),
            normalize,
        })
    }

    /// The model's input for `img`: `[3, h, w]` f32 on `device`.
    pub fn apply(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let mut img = img.clone();
        if let Some(r) = self.resize {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (nh, nw) = match r {
                Resize::Exact(h, w) => (h, w),
                // transformers: the short side to `s`, the long one to int(s * long / short)
                Resize::ShortestEdge(s) if w <= h => (s * h / w, s),
                Resize::ShortestEdge(s) => (s, s * w / h),
            };
            if (nw, nh) != (w, h) {
                let f = filter(self.resample).expect("checked at read");
                img = image::imageops::resize(&img, nw as u32, nh as u32, f);
            }
        }
        if let Some((ch, cw)) = self.crop {
            let (w, h) = (img.width() as usize, img.height() as usize);
            if ch > h || cw > w {
                return Err(Error::Input(format!(
                    "a {w}x{h} image is smaller than the {cw}x{ch} center crop"
                )));
            }
            let (top, left) = ((h - ch) / 2, (w - cw) / 2);
            img = image::imageops::crop_imm(&img, left as u32, top as u32, cw as u32, ch as u32)
                .to_image();
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let scale = self.rescale.unwrap_or(1.0);
        let (mean, std) = self.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
        let mut chw = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let v = (p[c] as f64 * scale - mean[c]) / std[c];
                chw[c * h * w + y as usize * w + x as usize] = v as f32;
            }
        }
        Ok(Tensor::from_vec(chw, (3, h, w), device)?)
    }
}

/// PIL's resampling code as the `image` crate's filter.
fn filter(code: u64) -> Option<FilterType> {
    match code {
        0 => Some(FilterType::Nearest),
        1 => Some(FilterType::Lanczos3),
        2 => Some(FilterType::Triangle),
        3 => Some(FilterType::CatmullRom),
        _ => None,
    }
}

/// Decodes an image file to RGB (alpha dropped, as transformers' `convert_rgb`).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::Image {
            path: path.into(),
            reason: e.to_string(),
        })?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Preprocessor> {
        let dir = std::env::temp_dir().join(format!("atomtune-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{:x}.json", text.len()));
        std::fs::write(&p, text).unwrap();
        Preprocessor::read(&p)
    }

    /// The hub repos' own files use the older feature-extractor form with bare integer sizes.
    #[test]
    fn legacy_feature_extractor_configs_read_as_their_processors() {
        let clip = parse(r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#).unwrap();
        assert_eq!(clip.resize, Some(Resize::ShortestEdge(224)));
        assert_eq!((clip.crop, clip.resample), (Some((224, 224)), 3));
        let dino = parse(r#"{"do_normalize": true, "do_resize": true, "feature_extractor_type": "ViTFeatureExtractor",
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}"#).unwrap();
        assert_eq!(dino.resize, Some(Resize::Exact(224, 224)));
        assert_eq!(dino.crop, None);
        let e = parse(r#"{"image_processor_type": "SiglipImageProcessor"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SiglipImageProcessor"), "{e}");
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_and_the_crop_is_centered() {
        let pre = Preprocessor {
            resize: Some(Resize::ShortestEdge(4)),
            resample: 2,
            crop: Some((4, 4)),
            rescale: Some(1.0),
            normalize: None,
        };
        // 8 wide, 16 high: resized to 4 x 8, then the middle 4 rows kept
        let img = RgbImage::from_fn(8, 16, |_, y| image::Rgb([(y * 10) as u8, 0, 0]));
        let t = pre.apply(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 4, 4]);
        let top = t
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            top > 30.0 && top < 60.0,
            "the crop starts at row 2 of 8: {top}"
        );
    }
}
