//! The top eigenvectors of a small symmetric matrix, in a canonical order and sign.

use nalgebra::{DMatrix, SymmetricEigen};

use crate::{Error, Result};

/// Eigenvectors of the symmetric `g [d, d]` (row-major) for its `m` largest eigenvalues, as rows
/// of a row-major `[m, d]` matrix, and all `d` eigenvalues, largest first.
///
/// The order is canonical: eigenvalues descending, ties broken by the solver's index. Each row's
/// sign is fixed so that its largest-magnitude entry (the first one on ties) is positive; this
/// makes the atoms a function of the weight, not of the solver's internals.
pub(crate) fn top_eigenvectors(g: &[f64], d: usize, m: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mat = DMatrix::from_row_slice(d, d, g);
    // Symmetric QR with a bounded number of sweeps: never loops forever on a pathological input.
    let eig = SymmetricEigen::try_new(mat, f64::EPSILON, 10_000).ok_or_else(|| {
        Error::invalid("weight", "Gram matrix", "the eigen-solver did not converge")
    })?;
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| {
        eig.eigenvalues[b]
            .total_cmp(&eig.eigenvalues[a])
            .then(a.cmp(&b))
    });

    let mut atoms = Vec::with_capacity(m * d);
    for &k in order.iter().take(m) {
        let col = eig.eigenvectors.column(k);
        let mut pivot = 0;
        for j in 1..d {
            if col[j].abs() > col[pivot].abs() {
                pivot = j;
            }
        }
        let sign = if col[pivot] < 0.0 { -1.0 } else { 1.0 };
        atoms.extend(col.iter().map(|x| sign * x));
    }
    let energy = order.iter().map(|&k| eig.eigenvalues[k]).collect();
    Ok((atoms, energy))
}
