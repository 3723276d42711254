//! Training images: a folder of photos in, RGB images of the training resolution out.
//!
//! Every format the `image` crate decodes is read (jpg, png, webp, bmp, gif, tiff); the EXIF
//! orientation is applied; grayscale, 16-bit and CMYK images become 8-bit RGB, and transparent
//! pixels are composited onto white. Each image is resized so its short side is the resolution
//! (Lanczos3), then center-cropped to a square, or kept whole for random crops (done on the
//! cached latents, see [`crate::cache`]). A caption in `name.txt` beside `name.jpg` replaces the
//! instance prompt for that image.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::{Error, Result};

const EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif",
];

/// How images are prepared.
#[derive(Clone, Copy, Debug)]
pub struct ImageOptions {
    /// The short side after resizing, in pixels.
    pub resolution: usize,
    /// Center-crop to a square (else keep the whole resized image for random crops).
    pub center_crop: bool,
    /// Warn about unreadable files and go on, instead of stopping.
    pub skip_bad: bool,
    /// Read each image's mask (masked loss).
    pub masks: bool,
    /// Keep each photo's aspect ratio: its training size is its bucket ([`crate::buckets`])
    /// instead of a `resolution` square.
    pub aspect_buckets: bool,
}

/// One prepared training image.
#[derive(Clone, Debug)]
pub struct TrainImage {
    /// Where it came from.
    pub path: PathBuf,
    /// Its caption file's text, if it has one.
    pub caption: Option<String>,
    /// The pixels, short side = resolution.
    pub rgb: RgbImage,
    /// The decoded image's size before resizing, (height, width): SDXL's "original size".
    pub original_size: (usize, usize),
    /// Where the center crop starts in the resized image, (top, left); (0, 0) when kept whole.
    pub crop: (usize, usize),
    /// The training size, (height, width) in pixels: the resolution square, or its bucket.
    pub size: (usize, usize),
    /// With masked loss: where to learn, 0..255 per pixel, prepared like `rgb` (from
    /// `name.mask.png` beside the photo, white = learn, or else the photo's alpha channel).
    pub mask: Option<RgbImage>,
}

/// The mask of the photo at `path`: `name.mask.png` beside it (its first channel; white =
/// learn), else the photo's alpha channel, as RGB with the value in every channel; `None` when
/// there is neither.
pub fn mask_of(path: &Path) -> Result<Option<RgbImage>> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let beside = path.with_file_name(format!("{stem}.mask.png"));
    if beside.is_file() {
        let m = decode(&beside)?;
        let mut out = m.clone();
        for p in out.pixels_mut() {
            *p = image::Rgb([p[0]; 3]);
        }
        return Ok(Some(out));
    }
    let img = decode_dynamic(path)?;
    if !img.color().has_alpha() {
        return Ok(None);
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        *o = image::Rgb([p[3]; 3]);
    }
    Ok(Some(out))
}

/// Decodes one image file with its EXIF orientation applied.
fn decode_dynamic(path: &Path) -> Result<DynamicImage> {
    let bad = |e: String| Error::BadImage {
        path: path.into(),
        reason: e,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut decoder = reader.into_decoder().map_err(|e| bad(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| bad(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| bad(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Decodes one image file to RGB with its EXIF orientation applied.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let img = decode_dynamic(path)?;
    Ok(if img.color().has_alpha() {
        // composite onto white: transparent backgrounds should not turn black
        let rgba = img.to_rgba8();
        let mut out = RgbImage::new(rgba.width(), rgba.height());
        for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
            let a = p[3] as u32;
            for c in 0..3 {
                o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
            }
        }
        out
    } else {
        img.to_rgb8()
    })
}

/// Resizes so the short side is `resolution`, then center-crops to a square if asked; returns
/// the image and where the crop starts, (top, left).
pub fn prepare(img: &RgbImage, resolution: usize, center_crop: bool) -> (RgbImage, (usize, usize)) {
    prepare_to(img, (resolution, resolution), center_crop)
}

/// Resizes so the image just covers `width x height`, then center-crops to that size if asked;
/// returns the image and where the crop starts, (top, left).
pub fn prepare_to(
    img: &RgbImage,
    (width, height): (usize, usize),
    center_crop: bool,
) -> (RgbImage, (usize, usize)) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
    let (nw, nh) = (
        ((w as f64 * scale).round() as usize).max(width),
        ((h as f64 * scale).round() as usize).max(height),
    );
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw as u32, nh as u32, FilterType::Lanczos3)
    };
    if !center_crop {
        return (resized, (0, 0));
    }
    let (x, y) = ((nw - width) / 2, (nh - height) / 2);
    let crop = image::imageops::crop_imm(&resized, x as u32, y as u32, width as u32, height as u32)
        .to_image();
    (crop, (y, x))
}

/// The image files of a folder, by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            // `name.mask.png` is the mask of `name.*`, not a photo
            let is_mask = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_ascii_lowercase().ends_with(".mask.png"));
            p.is_file()
                && !is_mask
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads and prepares every image of `dir`. Unreadable files stop the load with an error naming
/// them, or with `skip_bad` are reported through `warn` and left out.
pub fn load_folder(
    dir: &Path,
    opts: ImageOptions,
    warn: &mut dyn FnMut(String),
) -> Result<Vec<TrainImage>> {
    let mut out = Vec::new();
    let buckets = crate::buckets::buckets(opts.resolution);
    for path in image_files(dir)? {
        let rgb = match decode(&path) {
            Ok(img) => img,
            Err(e @ Error::BadImage { .. }) if opts.skip_bad => {
                warn(format!("skipping {e}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        let caption_path = path.with_extension("txt");
        let caption = match std::fs::read_to_string(&caption_path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&caption_path, e)),
        };
        let (width, height) = if opts.aspect_buckets {
            crate::buckets::bucket_for((rgb.width() as usize, rgb.height() as usize), &buckets)
        } else {
            (opts.resolution, opts.resolution)
        };
        let (prepared, crop) = prepare_to(&rgb, (width, height), opts.center_crop);
        let mask = if opts.masks {
            match mask_of(&path)? {
                Some(m) if m.dimensions() == rgb.dimensions() => {
                    Some(prepare_to(&m, (width, height), opts.center_crop).0)
                }
                Some(m) => {
                    return Err(Error::BadImage {
                        path: path.clone(),
                        reason: format!(
                            "its mask is {}x{}, the photo {}x{}",
                            m.width(),
                            m.height(),
                            rgb.width(),
                            rgb.height()
                        ),
                    })
                }
                None => None,
            }
        } else {
            None
        };
        out.push(TrainImage {
            mask,
            original_size: (rgb.height() as usize, rgb.width() as usize),
            crop,
            size: (height, width),
            rgb: prepared,
            caption,
            path,
        });
    }
    if out.is_empty() {
        return Err(Error::NoImages { path: dir.into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> PathBuf {
        testutil::data_path(&format!("images/{name}"))
    }

    #[test]
    fn exif_orientation_is_applied() {
        let img = decode(&data("exif-rotate-90.jpg")).unwrap();
        // stored 32x16 with the red half on the left; displayed 16x32 with red on top
        assert_eq!((img.width(), img.height()), (16, 32));
        let top = img.get_pixel(8, 4);
        let bottom = img.get_pixel(8, 28);
        assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");
    }

    #[test]
    fn cmyk_gray16_and_alpha_become_rgb() {
        let red = decode(&data("cmyk-red.jpg")).unwrap();
        let p = red.get_pixel(8, 8);
        assert!(
            p[0] > 200 && p[1] < 80 && p[2] < 80,
            "cmyk red decoded as {p:?}"
        );
        let g = decode(&data("gray16.png")).unwrap();
        let (a, b) = (g.get_pixel(0, 0), g.get_pixel(15, 0));
        assert!(a[0] == a[1] && a[1] == a[2] && b[0] == b[2], "{a:?} {b:?}");
        assert!(b[0] > a[0]);
        let rgba = decode(&data("rgba.png")).unwrap();
        assert_eq!(rgba.get_pixel(2, 2).0, [0, 255, 0]);
        assert_eq!(rgba.get_pixel(12, 2).0, [255, 255, 255]);
    }

    #[test]
    fn prepare_resizes_the_short_side_and_crops_the_center() {
        let img = decode(&data("exif-rotate-90.jpg")).unwrap(); // 16x32
        let (whole, at) = prepare(&img, 8, false);
        assert_eq!((whole.width(), whole.height(), at), (8, 16, (0, 0)));
        let (sq, at) = prepare(&img, 8, true);
        assert_eq!((sq.width(), sq.height()), (8, 8));
        assert_eq!(
            at,
            (4, 0),
            "the crop starts 4 rows down the 8x16 resized image"
        );
        // the middle of a red-over-blue image: red in the upper half of the crop
        assert!(sq.get_pixel(4, 1)[0] > 150 && sq.get_pixel(4, 6)[2] > 150);
    }

    #[test]
    fn bad_images_are_named_or_skipped_and_captions_are_read() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["exif-rotate-90.jpg", "corrupt.jpg", "rgba.png"] {
            std::fs::copy(data(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(dir.path().join("rgba.txt"), "  a green square  \n").unwrap();
        std::fs::write(dir.path().join("notes.md"), "not an image").unwrap();
        let opts = ImageOptions {
            resolution: 8,
            center_crop: true,
            skip_bad: false,
            masks: false,
            aspect_buckets: false,
        };
        let e = load_folder(dir.path(), opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("corrupt.jpg") && e.contains("--skip-bad-images"),
            "{e}"
        );
        let mut warnings = Vec::new();
        let imgs = load_folder(
            dir.path(),
            ImageOptions {
                skip_bad: true,
                masks: false,
                ..opts
            },
            &mut |w| warnings.push(w),
        )
        .unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("corrupt.jpg"));
        assert_eq!(imgs[1].caption.as_deref(), Some("a green square"));
        assert_eq!(imgs[0].caption, None);
        let empty = tempfile::tempdir().unwrap();
        let e = load_folder(empty.path(), opts, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::NoImages { .. }));
    }
}
