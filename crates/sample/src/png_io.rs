//! PNG files with a `parameters` text chunk: written atomically, read back.
//!
//! Latin-1 text goes in a `tEXt` chunk and anything else in `iTXt` (as Pillow does for A1111);
//! reading accepts `tEXt`, `zTXt` and `iTXt`.

use std::path::Path;

use crate::{Error, Result};

/// Encodes an 8-bit RGB image with a `parameters` text chunk.
pub fn encode_png(width: usize, height: usize, rgb: &[u8], parameters: &str) -> Result<Vec<u8>> {
    let err = |e: String| Error::Png {
        path: "<memory>".into(),
        reason: e,
    };
    if rgb.len() != width * height * 3 {
        return Err(err(format!(
            "{} bytes for a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())
                .map_err(|e| err(e.to_string()))?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())
                .map_err(|e| err(e.to_string()))?;
        }
        let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
        w.write_image_data(rgb).map_err(|e| err(e.to_string()))?;
        w.finish().map_err(|e| err(e.to_string()))?;
    }
    Ok(out)
}

/// Writes a PNG atomically (a temporary file renamed into place).
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    parameters: &str,
) -> Result<()> {
    let bytes = encode_png(width, height, rgb, parameters).map_err(|e| match e {
        Error::Png { reason, .. } => Error::Png {
            path: path.into(),
            reason,
        },
        e => e,
    })?;
    atoms::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// A PNG's size, RGB(A) pixels as written, and its `parameters` text if any.
pub struct PngContents {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// The image bytes as stored (RGB for atomtune's).
    pub pixels: Vec<u8>,
    /// The `parameters` text.
    pub parameters: Option<String>,
}

/// Reads a PNG and its `parameters` text.
pub fn read_png(path: &Path) -> Result<PngContents> {
    let err = |e: String| Error::Png {
        path: path.into(),
        reason: e,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_ignore_text_chunk(false);
    let mut reader = dec.read_info().map_err(|e| err(e.to_string()))?;
    let mut pixels = vec![
        0;
        reader
            .output_buffer_size()
            .ok_or_else(|| err("image too large".into()))?
    ];
    let frame = reader
        .next_frame(&mut pixels)
        .map_err(|e| err(e.to_string()))?;
    pixels.truncate(frame.buffer_size());
    let info = reader.info();
    let mut parameters = None;
    for t in &info.uncompressed_latin1_text {
        if t.keyword == "parameters" {
            parameters = Some(t.text.clone());
        }
    }
    for t in &info.compressed_latin1_text {
        if t.keyword == "parameters" {
            parameters = t.get_text().ok();
        }
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            parameters = t.get_text().ok();
        }
    }
    Ok(PngContents {
        width: info.width,
        height: info.height,
        pixels,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_a_png_in_latin1_and_unicode() {
        let dir = tempfile::tempdir().unwrap();
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        for text in [
            "a photo of sks dog\nSteps: 4, Seed: 1, Size: 4x3",
            "un chien \u{1F415}\nSteps: 4, Seed: 1, Size: 4x3",
        ] {
            let p = dir.path().join("x.png");
            write_png(&p, 4, 3, &rgb, text).unwrap();
            let back = read_png(&p).unwrap();
            assert_eq!((back.width, back.height), (4, 3));
            assert_eq!(back.pixels, rgb);
            assert_eq!(back.parameters.as_deref(), Some(text));
        }
        assert!(write_png(&dir.path().join("y.png"), 5, 3, &rgb, "").is_err());
    }
}
