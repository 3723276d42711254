//! Filter dictionaries: atoms `D0 [m, d]` and coefficients `alpha [N, m]` with `Wr ~ alpha @ D0`.
//!
//! Two ways to compute them from a frozen weight (seen as its filter matrix `Wr [N, d]`, see
//! [`crate::layout`]):
//!
//! - [`DictionaryKind::Svd`] (the default): the top-`m` eigenvectors of the Gram matrix
//!   `G = Wr^T Wr`, computed in `f64` and sign-fixed, and `alpha = Wr @ D0^T`. Exact for `m = d`;
//!   for `m < d` the best rank-`m` approximation, whose squared error is the discarded
//!   eigen-energy. Cost: one pass over the weight (`N d^2` flops for `G`), then a `d x d` eigen
//!   problem; about a second for all convolutions of SD 1.5.
//! - [`DictionaryKind::Lasso`]: the paper's sparse dictionary learning,
//!   `min 0.5 ||Wr - alpha D0||^2 + lambda ||alpha||_1` over unit-norm atoms, by alternating
//!   coordinate-descent sparse coding and block-coordinate atom updates, started from the SVD atoms.
//!   Cost: `iterations x (sweeps x N m^2 + N m d)` flops, tens of seconds for the SD 1.5 convs on
//!   two cores. Its coefficients are not a projection, so an adapter built on it keeps an explicit
//!   `alpha` (as large as the weight) and applying a delta re-runs the sparse coding (same cost as
//!   one iteration).
//!
//! Both are deterministic: the same weight gives bit-identical atoms and coefficients on every run
//! and any thread count (work is split in fixed-size chunks reduced in a fixed order).

mod lasso;
pub(crate) mod svd;

use std::fmt;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

pub use lasso::LassoOptions;

use crate::{Error, Layout, Result};

/// Rows per chunk of parallel work; fixed so results do not depend on the thread count.
const CHUNK_ROWS: usize = 4096;

/// How atoms are computed from a weight.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum DictionaryKind {
    /// Eigenvectors of the filters' Gram matrix (exact at `m = d`).
    #[default]
    Svd,
    /// Sparse dictionary learning, as in the paper's code.
    Lasso(LassoOptions),
}

impl DictionaryKind {
    /// The name written to delta files: `svd` or `lasso`.
    pub fn name(&self) -> &'static str {
        match self {
            DictionaryKind::Svd => "svd",
            DictionaryKind::Lasso(_) => "lasso",
        }
    }
}

impl fmt::Display for DictionaryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DictionaryKind::Svd => f.write_str("svd"),
            DictionaryKind::Lasso(o) => write!(f, "lasso (lambda {})", o.lambda),
        }
    }
}

/// Atoms `D0 [m, d]` of one layer, row-major `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dictionary {
    kind: DictionaryKind,
    m: usize,
    d: usize,
    atoms: Vec<f64>,
    /// Eigenvalues of `G`, all `d` of them, largest first (SVD only; empty for lasso).
    energy: Vec<f64>,
}

impl Dictionary {
    /// Learns `m` atoms (`None`: `m = d`) from a weight seen through `layout`.
    pub fn from_weight(
        weight: &Tensor,
        layout: &Layout,
        m: Option<usize>,
        kind: DictionaryKind,
    ) -> Result<Self> {
        let filters = layout.filters_f64(weight)?;
        Self::learn(&filters, layout.filter_dim(), m, kind)
    }

    /// Learns `m` atoms from the row-major filter matrix `filters [N, d]`.
    pub fn learn(
        filters: &[f64],
        d: usize,
        m: Option<usize>,
        kind: DictionaryKind,
    ) -> Result<Self> {
        let m = m.unwrap_or(d);
        check_m(m, d)?;
        if d == 0 || filters.is_empty() || !filters.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "filters",
                filters.len(),
                format!("need a non-empty multiple of d = {d} numbers"),
            ));
        }
        if let Some(bad) = filters.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid(
                "weight",
                filters[bad],
                "weights must be finite (the base checkpoint holds NaN or infinity)",
            ));
        }
        let (atoms, energy) = svd::top_eigenvectors(&gram(filters, d), d, m)?;
        let svd = Dictionary {
            kind: DictionaryKind::Svd,
            m,
            d,
            atoms,
            energy,
        };
        match kind {
            DictionaryKind::Svd => Ok(svd),
            DictionaryKind::Lasso(opts) => {
                let atoms = lasso::learn(filters, d, m, svd.atoms, &opts)?;
                Ok(Dictionary {
                    kind,
                    m,
                    d,
                    atoms,
                    energy: Vec::new(),
                })
            }
        }
    }

    /// A dictionary from stored atoms (as read from a delta file), row-major `[m, d]`.
    pub fn from_atoms(atoms: Vec<f64>, m: usize, d: usize, kind: DictionaryKind) -> Result<Self> {
        check_m(m, d)?;
        if atoms.len() != m * d || atoms.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid(
                "atoms",
                format!("{} numbers", atoms.len()),
                format!("need {m} x {d} finite numbers"),
            ));
        }
        Ok(Dictionary {
            kind,
            m,
            d,
            atoms,
            energy: Vec::new(),
        })
    }

    /// The same dictionary with its atoms rounded to `f32`, the precision delta files store.
    /// Adapters are built on rounded atoms so that a delta rebuilds them bit for bit (lasso
    /// coefficients are recomputed from the stored atoms at load time).
    pub fn rounded_to_f32(&self) -> Self {
        Dictionary {
            atoms: self.atoms.iter().map(|&x| x as f32 as f64).collect(),
            ..self.clone()
        }
    }

    /// How the atoms were computed.
    pub fn kind(&self) -> DictionaryKind {
        self.kind
    }

    /// Number of atoms, `m`.
    pub fn num_atoms(&self) -> usize {
        self.m
    }

    /// Numbers per atom, `d`.
    pub fn atom_dim(&self) -> usize {
        self.d
    }

    /// The atoms, row-major `[m, d]`.
    pub fn atoms(&self) -> &[f64] {
        &self.atoms
    }

    /// Eigenvalues of the Gram matrix `Wr^T Wr`, largest first (SVD dictionaries learned from a
    /// weight; empty otherwise). The squared reconstruction error at `m < d` is the sum of the
    /// `d - m` smallest.
    pub fn energy(&self) -> &[f64] {
        &self.energy
    }

    /// Whether the coefficients are the projection `alpha = Wr @ D0^T` (SVD), which lets adapters
    /// build `W'` without storing `alpha` (see [`crate::adapter`]).
    pub fn is_projection(&self) -> bool {
        self.kind == DictionaryKind::Svd
    }

    /// The atoms as a tensor `[m, d]`.
    pub fn atoms_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        // Converted on the host: Metal has no f64.
        Ok(
            Tensor::from_slice(&self.atoms, (self.m, self.d), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?,
        )
    }

    /// The coefficients `alpha [N, m]` of the filter matrix `filters [N, d]`, row-major: the
    /// projection `Wr @ D0^T` for SVD atoms, the sparse code for lasso atoms.
    pub fn coefficients(&self, filters: &[f64]) -> Result<Vec<f64>> {
        if !filters.len().is_multiple_of(self.d) {
            return Err(Error::invalid(
                "filters",
                filters.len(),
                format!("need a multiple of d = {}", self.d),
            ));
        }
        match self.kind {
            DictionaryKind::Svd => Ok(project(filters, &self.atoms, self.d, self.m)),
            DictionaryKind::Lasso(opts) => {
                Ok(lasso::code(filters, &self.atoms, self.d, self.m, &opts))
            }
        }
    }

    /// The coefficients of a weight seen through `layout`, as a tensor `[N, m]`.
    pub fn coefficients_tensor(&self, weight: &Tensor, layout: &Layout) -> Result<Tensor> {
        let alpha = self.coefficients(&layout.filters_f64(weight)?)?;
        let n = layout.num_filters();
        // Converted on the host: Metal has no f64.
        Ok(Tensor::from_vec(alpha, (n, self.m), &Device::Cpu)?
            .to_dtype(weight.dtype())?
            .to_device(weight.device())?)
    }
}

fn check_m(m: usize, d: usize) -> Result<()> {
    if m == 0 || m > d {
        return Err(Error::invalid(
            "atoms per layer (m)",
            m,
            format!("must be between 1 and the filter size d = {d}"),
        ));
    }
    Ok(())
}

/// `G = Wr^T Wr` in `f64`, row-major `[d, d]`, reduced over fixed chunks in a fixed order.
fn gram(filters: &[f64], d: usize) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = filters
        .par_chunks(CHUNK_ROWS * d)
        .map(|chunk| {
            let mut g = vec![0f64; d * d];
            for row in chunk.chunks_exact(d) {
                for a in 0..d {
                    let ra = row[a];
                    for b in a..d {
                        g[a * d + b] += ra * row[b];
                    }
                }
            }
            g
        })
        .collect();
    let mut g = vec![0f64; d * d];
    for p in &partials {
        for (x, y) in g.iter_mut().zip(p) {
            *x += y;
        }
    }
    for a in 0..d {
        for b in 0..a {
            g[a * d + b] = g[b * d + a];
        }
    }
    g
}

/// `alpha = Wr @ D0^T`, row-major `[N, m]`.
fn project(filters: &[f64], atoms: &[f64], d: usize, m: usize) -> Vec<f64> {
    let n = filters.len() / d;
    let mut alpha = vec![0f64; n * m];
    alpha
        .par_chunks_mut(CHUNK_ROWS * m)
        .zip(filters.par_chunks(CHUNK_ROWS * d))
        .for_each(|(out, rows)| {
            for (o, r) in out.chunks_exact_mut(m).zip(rows.chunks_exact(d)) {
                for (l, ol) in o.iter_mut().enumerate() {
                    *ol = dot(r, &atoms[l * d..(l + 1) * d]);
                }
            }
        });
    alpha
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Filters with a decaying spectrum, like trained conv kernels.
    pub(crate) fn sample_filters(n: usize, d: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut f = vec![0f64; n * d];
        for row in f.chunks_exact_mut(d) {
            for (j, x) in row.iter_mut().enumerate() {
                *x = rng.random_range(-1.0..1.0) / (1.0 + j as f64);
            }
            // correlate neighbours so the Gram matrix is far from diagonal
            for j in 1..d {
                row[j] += 0.5 * row[j - 1];
            }
        }
        f
    }

    fn reconstruct(alpha: &[f64], atoms: &[f64], n: usize, m: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * d];
        for i in 0..n {
            for l in 0..m {
                for j in 0..d {
                    out[i * d + j] += alpha[i * m + l] * atoms[l * d + j];
                }
            }
        }
        out
    }

    fn sq_norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum()
    }

    #[test]
    fn svd_is_exact_at_full_rank_in_f64() {
        for (n, d) in [(300, 9), (64, 1), (200, 16), (50, 6)] {
            let f = sample_filters(n, d, 1);
            let dict = Dictionary::learn(&f, d, None, DictionaryKind::Svd).unwrap();
            let alpha = dict.coefficients(&f).unwrap();
            let r = reconstruct(&alpha, dict.atoms(), n, d, d);
            let err: Vec<f64> = r.iter().zip(&f).map(|(a, b)| a - b).collect();
            let rel = (sq_norm(&err) / sq_norm(&f)).sqrt();
            assert!(rel < 1e-12, "n={n} d={d}: relative error {rel}");
        }
    }

    #[test]
    fn truncated_svd_error_is_the_discarded_energy() {
        let (n, d) = (500, 9);
        let f = sample_filters(n, d, 2);
        for m in [1, 4, 8] {
            let dict = Dictionary::learn(&f, d, Some(m), DictionaryKind::Svd).unwrap();
            let alpha = dict.coefficients(&f).unwrap();
            let r = reconstruct(&alpha, dict.atoms(), n, m, d);
            let err: f64 = r.iter().zip(&f).map(|(a, b)| (a - b) * (a - b)).sum();
            let discarded: f64 = dict.energy()[m..].iter().sum();
            assert!(discarded > 0.0);
            let rel = (err - discarded).abs() / discarded;
            assert!(
                rel < 1e-9,
                "m={m}: error {err} vs discarded energy {discarded}"
            );
        }
    }

    #[test]
    fn atoms_are_orthonormal_sign_fixed_and_sorted() {
        let d = 9;
        let f = sample_filters(400, d, 3);
        let dict = Dictionary::learn(&f, d, None, DictionaryKind::Svd).unwrap();
        let a = dict.atoms();
        for i in 0..d {
            for j in 0..d {
                let ip = dot(&a[i * d..(i + 1) * d], &a[j * d..(j + 1) * d]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((ip - want).abs() < 1e-13, "<{i},{j}> = {ip}");
            }
            let row = &a[i * d..(i + 1) * d];
            let big = row
                .iter()
                .cloned()
                .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            assert!(big > 0.0, "row {i} largest entry is negative");
        }
        assert!(dict.energy().windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn same_weight_gives_bit_identical_dictionaries_on_any_thread_count() {
        let d = 9;
        let f = sample_filters(3 * CHUNK_ROWS + 17, d, 4);
        let run = |threads: usize, kind: DictionaryKind| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let dict = Dictionary::learn(&f, d, None, kind).unwrap();
                let alpha = dict.coefficients(&f).unwrap();
                (dict.atoms().to_vec(), alpha)
            })
        };
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let lasso = DictionaryKind::Lasso(LassoOptions {
            iterations: 3,
            ..Default::default()
        });
        for kind in [DictionaryKind::Svd, lasso] {
            let (a1, c1) = run(1, kind);
            let (a2, c2) = run(2, kind);
            let (a3, c3) = run(2, kind);
            assert_eq!(
                bits(&a1),
                bits(&a2),
                "{kind}: atoms differ across thread counts"
            );
            assert_eq!(
                bits(&c1),
                bits(&c2),
                "{kind}: coefficients differ across thread counts"
            );
            assert_eq!(bits(&a2), bits(&a3), "{kind}: atoms differ between runs");
            assert_eq!(
                bits(&c2),
                bits(&c3),
                "{kind}: coefficients differ between runs"
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = sample_filters(10, 9, 5);
        assert!(Dictionary::learn(&f, 9, Some(0), DictionaryKind::Svd).is_err());
        assert!(Dictionary::learn(&f, 9, Some(10), DictionaryKind::Svd).is_err());
        assert!(Dictionary::learn(&f[..17], 9, None, DictionaryKind::Svd).is_err());
        let mut nan = f.clone();
        nan[3] = f64::NAN;
        let e = Dictionary::learn(&nan, 9, None, DictionaryKind::Svd).unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
        assert!(Dictionary::from_atoms(vec![0.0; 8], 3, 3, DictionaryKind::Svd).is_err());
    }

    #[test]
    fn f32_weights_reconstruct_within_f32_precision() {
        let layout = Layout::from_shape(&[16, 8, 3, 3], Default::default()).unwrap();
        let vals: Vec<f32> = sample_filters(128, 9, 6)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let w = Tensor::from_vec(vals, layout.shape(), &Device::Cpu).unwrap();
        let dict = Dictionary::from_weight(&w, &layout, None, DictionaryKind::Svd).unwrap();
        let alpha = dict.coefficients_tensor(&w, &layout).unwrap();
        let atoms = dict.atoms_tensor(DType::F32, &Device::Cpu).unwrap();
        let back = layout.from_filters(&alpha.matmul(&atoms).unwrap()).unwrap();
        let err = (back - &w)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let norm = w
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = (err / norm).sqrt();
        assert!(rel < 1e-5, "relative error {rel}");
    }
}
