//! Sparse dictionary learning: `min 0.5 ||Wr - A D||_F^2 + lambda ||A||_1` with unit-norm rows of
//! `D`, as in the paper's code (arXiv 2403.00269). Alternates a sparse-coding step (cyclic
//! coordinate descent per filter, started from zero so that coding is a pure function of the
//! filters and the atoms) with a block-coordinate update of each atom followed by renormalisation.

use rayon::prelude::*;

use super::{dot, CHUNK_ROWS};
use crate::{Error, Result};

/// Options of the lasso dictionary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LassoOptions {
    /// Weight of the L1 penalty (the paper uses 1e-3).
    pub lambda: f64,
    /// Alternations of sparse coding and atom updates.
    pub iterations: usize,
    /// Most coordinate-descent sweeps per filter in one coding step.
    pub sweeps: usize,
    /// A coding step stops early once no coefficient moves by more than this.
    pub tolerance: f64,
}

impl Default for LassoOptions {
    fn default() -> Self {
        LassoOptions {
            lambda: 1e-3,
            iterations: 20,
            sweeps: 100,
            tolerance: 1e-12,
        }
    }
}

impl LassoOptions {
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(Error::invalid(
                "lasso lambda",
                self.lambda,
                "must be finite and >= 0",
            ));
        }
        if self.sweeps == 0 {
            return Err(Error::invalid("lasso sweeps", 0, "must be at least 1"));
        }
        Ok(())
    }
}

fn soft_threshold(z: f64, t: f64) -> f64 {
    if z > t {
        z - t
    } else if z < -t {
        z + t
    } else {
        0.0
    }
}

/// Sparse codes `A [N, m]` of `filters [N, d]` over `atoms [m, d]`.
pub(super) fn code(
    filters: &[f64],
    atoms: &[f64],
    d: usize,
    m: usize,
    o: &LassoOptions,
) -> Vec<f64> {
    let mut q = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..m {
            q[i * m + j] = dot(&atoms[i * d..(i + 1) * d], &atoms[j * d..(j + 1) * d]);
        }
    }
    let n = filters.len() / d;
    let mut alpha = vec![0f64; n * m];
    alpha
        .par_chunks_mut(CHUNK_ROWS * m)
        .zip(filters.par_chunks(CHUNK_ROWS * d))
        .for_each(|(out, rows)| {
            let mut b = vec![0f64; m];
            for (a, r) in out.chunks_exact_mut(m).zip(rows.chunks_exact(d)) {
                for (k, bk) in b.iter_mut().enumerate() {
                    *bk = dot(r, &atoms[k * d..(k + 1) * d]);
                }
                for _ in 0..o.sweeps {
                    let mut moved = 0f64;
                    for k in 0..m {
                        if q[k * m + k] <= 0.0 {
                            continue;
                        }
                        let mut z = b[k];
                        for j in 0..m {
                            if j != k {
                                z -= q[k * m + j] * a[j];
                            }
                        }
                        let new = soft_threshold(z, o.lambda) / q[k * m + k];
                        moved = moved.max((new - a[k]).abs());
                        a[k] = new;
                    }
                    if moved <= o.tolerance {
                        break;
                    }
                }
            }
        });
    alpha
}

/// Learns `m` unit-norm atoms from `filters [N, d]`, starting from `init [m, d]`.
pub(super) fn learn(
    filters: &[f64],
    d: usize,
    m: usize,
    init: Vec<f64>,
    o: &LassoOptions,
) -> Result<Vec<f64>> {
    o.check()?;
    let mut atoms = init;
    for _ in 0..o.iterations {
        let alpha = code(filters, &atoms, d, m, o);
        // C = A^T A [m, m] and B = A^T Wr [m, d], reduced over fixed chunks in a fixed order.
        let partials: Vec<(Vec<f64>, Vec<f64>)> = alpha
            .par_chunks(CHUNK_ROWS * m)
            .zip(filters.par_chunks(CHUNK_ROWS * d))
            .map(|(a, w)| {
                let mut c = vec![0f64; m * m];
                let mut b = vec![0f64; m * d];
                for (ar, wr) in a.chunks_exact(m).zip(w.chunks_exact(d)) {
                    for k in 0..m {
                        if ar[k] == 0.0 {
                            continue;
                        }
                        for j in 0..m {
                            c[k * m + j] += ar[k] * ar[j];
                        }
                        for j in 0..d {
                            b[k * d + j] += ar[k] * wr[j];
                        }
                    }
                }
                (c, b)
            })
            .collect();
        let mut c = vec![0f64; m * m];
        let mut b = vec![0f64; m * d];
        for (pc, pb) in &partials {
            c.iter_mut().zip(pc).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(pb).for_each(|(x, y)| *x += y);
        }
        // One block-coordinate pass over the atoms, each renormalised to unit length.
        for k in 0..m {
            let ckk = c[k * m + k];
            if ckk <= 0.0 {
                continue; // unused atom: keep it
            }
            let mut row = atoms[k * d..(k + 1) * d].to_vec();
            for (j, x) in row.iter_mut().enumerate() {
                let mut grad = b[k * d + j];
                for l in 0..m {
                    grad -= c[k * m + l] * atoms[l * d + j];
                }
                *x += grad / ckk;
            }
            let norm = dot(&row, &row).sqrt();
            if norm > 1e-12 {
                for (dst, x) in atoms[k * d..(k + 1) * d].iter_mut().zip(&row) {
                    *dst = x / norm;
                }
            }
        }
    }
    Ok(atoms)
}

#[cfg(test)]
mod tests {
    use super::super::{tests::sample_filters, Dictionary, DictionaryKind};
    use super::*;

    fn objective(f: &[f64], atoms: &[f64], alpha: &[f64], d: usize, m: usize, lambda: f64) -> f64 {
        let mut loss = 0.0;
        for (r, a) in f.chunks_exact(d).zip(alpha.chunks_exact(m)) {
            for j in 0..d {
                let rec: f64 = (0..m).map(|l| a[l] * atoms[l * d + j]).sum();
                loss += 0.5 * (r[j] - rec).powi(2);
            }
        }
        loss + lambda * alpha.iter().map(|x| x.abs()).sum::<f64>()
    }

    #[test]
    fn lasso_lowers_the_objective_and_keeps_unit_atoms() {
        let (n, d, m) = (800, 9, 9);
        let f = sample_filters(n, d, 7);
        let lambda = 0.05;
        let svd = Dictionary::learn(&f, d, Some(m), DictionaryKind::Svd).unwrap();
        let o = LassoOptions {
            lambda,
            iterations: 10,
            ..Default::default()
        };
        let a0 = code(&f, svd.atoms(), d, m, &o);
        let before = objective(&f, svd.atoms(), &a0, d, m, lambda);
        let dict = Dictionary::learn(&f, d, Some(m), DictionaryKind::Lasso(o)).unwrap();
        let a1 = dict.coefficients(&f).unwrap();
        let after = objective(&f, dict.atoms(), &a1, d, m, lambda);
        assert!(after < before * 0.999, "objective {before} -> {after}");
        for k in 0..m {
            let row = &dict.atoms()[k * d..(k + 1) * d];
            assert!((dot(row, row) - 1.0).abs() < 1e-12);
        }
        assert!(!dict.is_projection());
    }

    #[test]
    fn larger_lambda_gives_sparser_codes() {
        let (d, m) = (9, 9);
        let f = sample_filters(400, d, 8);
        let zeros = |lambda: f64| {
            let o = LassoOptions {
                lambda,
                iterations: 2,
                ..Default::default()
            };
            let dict = Dictionary::learn(&f, d, Some(m), DictionaryKind::Lasso(o)).unwrap();
            dict.coefficients(&f)
                .unwrap()
                .iter()
                .filter(|x| **x == 0.0)
                .count()
        };
        let (z0, z1, z2) = (zeros(0.0), zeros(0.02), zeros(0.2));
        assert!(z0 < z1 && z1 < z2, "zero counts {z0} {z1} {z2}");
    }

    #[test]
    fn coding_with_zero_lambda_on_orthonormal_atoms_is_the_projection() {
        let (d, m) = (9, 9);
        let f = sample_filters(100, d, 9);
        let svd = Dictionary::learn(&f, d, Some(m), DictionaryKind::Svd).unwrap();
        let o = LassoOptions {
            lambda: 0.0,
            ..Default::default()
        };
        let a = code(&f, svd.atoms(), d, m, &o);
        let p = svd.coefficients(&f).unwrap();
        for (x, y) in a.iter().zip(&p) {
            assert!((x - y).abs() < 1e-10, "{x} vs {y}");
        }
    }
}
