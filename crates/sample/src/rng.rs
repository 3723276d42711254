//! Seeded noise drawn on the host, so that runs repeat exactly on every device: candle's CPU
//! generator cannot be seeded and CUDA's draws other numbers (DESIGN.md, candle facts).
//!
//! A [`NoiseRng`] is ChaCha8 from a 64-bit seed; its position can be saved and restored (training
//! checkpoints resume bit-identically).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::Result;

/// A seeded source of standard normal and uniform numbers.
#[derive(Clone, Debug)]
pub struct NoiseRng {
    seed: u64,
    rng: ChaCha8Rng,
}

/// Where a [`NoiseRng`] stands: its seed and word position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngState {
    /// The seed it started from.
    pub seed: u64,
    /// How many 32-bit words it has produced.
    pub word_pos: u128,
}

impl NoiseRng {
    /// A generator at the start of `seed`'s stream.
    pub fn new(seed: u64) -> Self {
        NoiseRng {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Its position.
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// A generator at a saved position.
    pub fn from_state(s: RngState) -> Self {
        let mut g = Self::new(s.seed);
        g.rng.set_word_pos(s.word_pos);
        g
    }

    /// Standard normal noise of `shape` (drawn in f32, row-major), as `dtype` on `device`.
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }

    /// A uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.random_range(0..n)
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_continues_the_same_stream() {
        let mut a = NoiseRng::new(7);
        let _ = a.randn(&[5], DType::F32, &Device::Cpu).unwrap();
        let s = a.state();
        let x = a
            .randn(&[3, 2], DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut b = NoiseRng::from_state(s);
        let y = b
            .randn(&[3, 2], DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y);
        let mut c = NoiseRng::new(8);
        let z = c
            .randn(&[3, 2], DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(x, z);
    }
}
