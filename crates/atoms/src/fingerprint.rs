//! Fingerprints of base weights, so a delta can tell whether it meets the base it was trained on.
//!
//! A fingerprint is the 64-bit XXH3 hash of a weight's shape and of its values rounded to f16,
//! written as 16 hex digits. Rounding to f16 first makes the `fp16` variant of a checkpoint
//! fingerprint like its f32 original (the variant is made by that very rounding), while any real
//! change of the weights (a fine-tuned or merged checkpoint) gives another fingerprint. It is
//! not a security feature: it catches mistakes, not forgeries.

use candle_core::{DType, Tensor};
use xxhash_rust::xxh3::Xxh3;

use crate::Result;

/// The fingerprint of one weight.
pub fn fingerprint(weight: &Tensor) -> Result<String> {
    let mut h = Xxh3::new();
    for &d in weight.dims() {
        h.update(&(d as u64).to_le_bytes());
    }
    let values = weight
        .to_dtype(DType::F16)?
        .flatten_all()?
        .to_vec1::<half::f16>()?;
    let mut buf = Vec::with_capacity(values.len().min(1 << 16) * 2);
    for chunk in values.chunks(1 << 16) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_bits().to_le_bytes()));
        h.update(&buf);
    }
    Ok(format!("{:016x}", h.digest()))
}

/// One fingerprint for a set of layer fingerprints (name order), to show a base at a glance.
pub fn combine<'a>(layers: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Xxh3::new();
    for (name, fp) in layers {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(fp.as_bytes());
        h.update(&[0]);
    }
    format!("{:016x}", h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fingerprints_see_values_and_shape_but_not_the_f16_rounding() {
        let w = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .affine(0.013, 0.1)
            .unwrap();
        let a = w.reshape((4, 6)).unwrap();
        let fp = fingerprint(&a).unwrap();
        assert_eq!(fp.len(), 16);
        assert_eq!(fp, fingerprint(&a.to_dtype(DType::F16).unwrap()).unwrap());
        assert_ne!(fp, fingerprint(&w.reshape((6, 4)).unwrap()).unwrap());
        let b = a.affine(1.0, 0.01).unwrap();
        assert_ne!(fp, fingerprint(&b).unwrap());
        assert_ne!(
            combine([("a", "1"), ("b", "2")]),
            combine([("a", "2"), ("b", "1")])
        );
    }
}
