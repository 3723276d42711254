//! The DreamBooth protocol's three numbers from embeddings (Ruiz et al. 2023):
//! DINO and CLIP-I = the mean cosine similarity over every (generated, real) pair of image
//! features; CLIP-T = the mean cosine similarity of each generated image and its prompt.

use candle_core::{DType, Tensor};

use crate::vit::l2_normalize;
use crate::Result;

/// One generated image's scores.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    /// Mean DINO similarity to the real photos.
    pub dino: f64,
    /// Mean CLIP image similarity to the real photos.
    pub clip_i: f64,
    /// CLIP similarity to its prompt.
    pub clip_t: f64,
}

/// The means over a set of generated images, and each image's scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// Subject fidelity, DINO.
    pub dino: f64,
    /// Subject fidelity, CLIP-I.
    pub clip_i: f64,
    /// Prompt fidelity, CLIP-T.
    pub clip_t: f64,
    /// Per generated image, in order.
    pub per_image: Vec<ImageScore>,
}

/// Cosine similarities of every row of `a [n, d]` with every row of `b [m, d]`: `n x m`.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Vec<Vec<f64>>> {
    let (a, b) = (
        l2_normalize(&a.to_dtype(DType::F64)?)?,
        l2_normalize(&b.to_dtype(DType::F64)?)?,
    );
    Ok(a.matmul(&b.t()?)?.to_vec2::<f64>()?)
}

/// The scores of generated images given their features and the real photos': DINO features
/// `gen_dino [n, d]` and `real_dino [m, d]`, CLIP image embeddings `gen_clip [n, p]` and
/// `real_clip [m, p]`, and the CLIP text embedding of each generated image's prompt
/// `text [n, p]`.
pub fn score(
    gen_dino: &Tensor,
    real_dino: &Tensor,
    gen_clip: &Tensor,
    real_clip: &Tensor,
    text: &Tensor,
) -> Result<Scores> {
    let dino = cosine_matrix(gen_dino, real_dino)?;
    let clip = cosine_matrix(gen_clip, real_clip)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let per_image: Vec<ImageScore> = (0..dino.len())
        .map(|i| {
            let t = cosine_matrix(&gen_clip.narrow(0, i, 1)?, &text.narrow(0, i, 1)?)?;
            Ok(ImageScore {
                dino: mean(&dino[i]),
                clip_i: mean(&clip[i]),
                clip_t: t[0][0],
            })
        })
        .collect::<Result<_>>()?;
    // Every image has as many pairs, so the mean of the per-image means is the mean over pairs.
    let avg = |f: fn(&ImageScore) -> f64| mean(&per_image.iter().map(f).collect::<Vec<_>>());
    Ok(Scores {
        dino: avg(|s| s.dino),
        clip_i: avg(|s| s.clip_i),
        clip_t: avg(|s| s.clip_t),
        per_image,
    })
}
