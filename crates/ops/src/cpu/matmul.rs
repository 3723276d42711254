//! Matrix products on the `gemm` crate over views of slices: [`Mat`] (dense or with strided
//! rows, read transposed or not) into a [`Dst`], the one place the workspace calls `gemm::gemm`;
//! [`dense`] and [`dense_serial`] for the common case of dense row-major matrices.

use super::Float;

/// A matrix view for [`gemm`]: `rows x cols` numbers from `data`, row `i` starting at `i * rs`
/// (attention's heads sit side by side in a row, so a head's rows are strided), read transposed
/// or not.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense `rows x cols` matrix.
    pub(crate) fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `rows x cols` with rows `rs` apart.
    pub(crate) fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            transposed: false,
        }
    }

    /// The same matrix read transposed.
    pub(crate) fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    /// `(rows, cols, column stride, row stride)` as seen.
    fn view(&self) -> (usize, usize, isize, isize) {
        if self.transposed {
            (self.cols, self.rows, self.rs as isize, 1)
        } else {
            (self.rows, self.cols, 1, self.rs as isize)
        }
    }

    /// `(rows, cols)` as seen.
    pub(crate) fn shape(&self) -> (usize, usize) {
        let (r, c, _, _) = self.view();
        (r, c)
    }

    /// `(column stride, row stride)` as seen: element `(i, j)` is at `i * rs + j * cs`.
    pub(crate) fn strides(&self) -> (usize, usize) {
        let (_, _, cs, rs) = self.view();
        (cs as usize, rs as usize)
    }

    /// Element `(i, j)` as seen.
    #[cfg(test)]
    pub(crate) fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        let (_, _, cs, rs) = self.view();
        self.data[i * rs as usize + j * cs as usize]
    }

    /// Whether every element lies within `data`.
    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + self.cols <= self.data.len()
    }

    /// Rows `s..s + c`.
    pub(crate) fn rows(self, s: usize, c: usize) -> Self {
        Mat::strided(&self.data[s * self.rs..], c, self.cols, self.rs)
    }

    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.rs..i * self.rs + self.cols]
    }
}

/// Where [`gemm`] writes: `ptr`, rows `rs` apart.
#[derive(Clone, Copy)]
pub(crate) struct Dst<T> {
    pub(crate) ptr: *mut T,
    pub(crate) rs: usize,
}

impl<T> Dst<T> {
    /// `x` as a dense destination.
    pub(crate) fn dense(x: &mut [T]) -> Self {
        Dst {
            ptr: x.as_mut_ptr(),
            rs: 0,
        }
    }
}

/// `dst [m, n] (+)= scale a @ b` on `par` (attention runs it single-threaded inside its own
/// parallel tasks; the convs and linears let large products use the pool). A dense destination
/// (`rs` 0) has rows `n` apart.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `n` numbers, `rs` apart, that no other thread
/// reads or writes meanwhile.
pub(crate) unsafe fn gemm<T: Float>(
    par: gemm::Parallelism,
    dst: Dst<T>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    scale: T,
    accumulate: bool,
) {
    let (m, k, a_cs, a_rs) = a.view();
    let (k2, n, b_cs, b_rs) = b.view();
    assert!(k == k2 && a.fits() && b.fits());
    let rs = if dst.rs == 0 { n } else { dst.rs };
    // SAFETY: as below; bf16 products where they are on and the CPU has them.
    if T::bf16_gemm(par, dst, a, b, scale, accumulate) {
        return;
    }
    // SAFETY: the assert checks the inputs lie within their slices, the caller the output.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Threads for a gemm of `m x n x k` multiply-adds: one below 256K of them.
fn parallelism((m, n, k): (usize, usize, usize)) -> gemm::Parallelism {
    let n_threads = rayon::current_num_threads();
    if n_threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(n_threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst [m, n] (+)= a @ b` for dense row-major matrices, with `a` `[m, k]` or, when `a_t`,
/// `[k, m]` read transposed, and `b` `[k, n]` or, when `b_t`, `[n, k]` read transposed; large
/// products use the thread pool.
///
/// # Safety
/// The slices must hold the matrices.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dense<T: Float>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    mnk: (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    // SAFETY: the caller's promise.
    unsafe { dense_on(parallelism(mnk), dst, a, b, mnk, a_t, b_t, accumulate) }
}

/// [`dense`] on one thread: for small products inside tasks that already run in parallel.
///
/// # Safety
/// As [`dense`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dense_serial<T: Float>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    mnk: (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    // SAFETY: the caller's promise.
    unsafe {
        dense_on(
            gemm::Parallelism::None,
            dst,
            a,
            b,
            mnk,
            a_t,
            b_t,
            accumulate,
        )
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn dense_on<T: Float>(
    par: gemm::Parallelism,
    dst: &mut [T],
    a: &[T],
    b: &[T],
    (m, n, k): (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    debug_assert!(dst.len() >= m * n);
    let a = if a_t {
        Mat::new(a, k, m).t()
    } else {
        Mat::new(a, m, k)
    };
    let b = if b_t {
        Mat::new(b, n, k).t()
    } else {
        Mat::new(b, k, n)
    };
    // SAFETY: `dst` holds the `m x n` product (the caller's promise).
    unsafe { gemm(par, Dst::dense(dst), a, b, T::one(), accumulate) }
}
