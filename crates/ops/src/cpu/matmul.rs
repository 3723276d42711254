//! Matrix products on the `gemm` crate over views of slices: [`Mat`] (dense or with strided
//! rows, read transposed or not) into a [`Dst`], the one place the workspace calls `gemm::gemm`;
//! [`dense`] and [`dense_serial`] for the common case of dense row-major matrices.
//!
//! An operand's numbers ([`Data`]) are the kernel's type or bf16 (a frozen weight kept in bf16
//! beside f32 activations): the bf16 kernel packs bf16 numbers as they are; the `gemm` crate
//! gets them widened, one operand at a time, into a buffer the thread reuses.

use std::borrow::Cow;

use half::bf16;

use super::Float;

/// The numbers an operand reads: of the kernel's type `T`, or bf16.
#[derive(Clone, Copy)]
pub(crate) enum Data<'a, T> {
    /// Numbers of the kernel's type.
    Plain(&'a [T]),
    /// bf16 numbers (a weight kept in bf16), exact in `T`.
    Bf16(&'a [bf16]),
}

impl<'a, T> From<&'a [T]> for Data<'a, T> {
    fn from(x: &'a [T]) -> Self {
        Data::Plain(x)
    }
}

impl<'a, T> From<&'a Vec<T>> for Data<'a, T> {
    fn from(x: &'a Vec<T>) -> Self {
        Data::Plain(x)
    }
}

impl<'a, T: Float> Data<'a, T> {
    /// How many numbers.
    pub(crate) fn len(&self) -> usize {
        match self {
            Data::Plain(x) => x.len(),
            Data::Bf16(x) => x.len(),
        }
    }

    /// The same numbers when `T` is f32 (see [`super::as_f32`]).
    pub(crate) fn as_f32(self) -> Option<Data<'a, f32>> {
        match self {
            Data::Plain(x) => super::as_f32(x).map(Data::Plain),
            Data::Bf16(x) => Some(Data::Bf16(x)),
        }
    }

    /// The numbers `s..` of it.
    fn skip(self, s: usize) -> Self {
        match self {
            Data::Plain(x) => Data::Plain(&x[s..]),
            Data::Bf16(x) => Data::Bf16(&x[s..]),
        }
    }

    /// The numbers as `T`: borrowed, or widened from bf16 (in parallel) into the thread's
    /// reused buffer, which goes back when the result drops.
    pub(crate) fn widened(self) -> Widened<'a, T> {
        use rayon::prelude::*;
        let all = match self {
            Data::Plain(x) => return Widened(Cow::Borrowed(x)),
            Data::Bf16(all) => all,
        };
        let mut out = T::take_buffer();
        // every number is written below: only a grown part needs initialising
        if out.len() < all.len() {
            out.resize(all.len(), T::zero());
        }
        out.truncate(all.len());
        out.par_chunks_mut(1 << 14)
            .zip(all.par_chunks(1 << 14))
            .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, &v)| *o = T::from_bf16(v)));
        Widened(Cow::Owned(out))
    }
}

/// [`Data::widened`]'s numbers: borrowed, or in the thread's buffer until dropped.
pub(crate) struct Widened<'a, T: Float>(Cow<'a, [T]>);

impl<T: Float> std::ops::Deref for Widened<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Float> Drop for Widened<'_, T> {
    fn drop(&mut self) {
        if let Cow::Owned(v) = std::mem::take(&mut self.0) {
            T::put_buffer(v);
        }
    }
}

/// A matrix view for [`gemm()`]: `rows x cols` numbers from `data`, row `i` starting at `i * rs`
/// (attention's heads sit side by side in a row, so a head's rows are strided), read transposed
/// or not.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub(crate) data: Data<'a, T>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense `rows x cols` matrix.
    pub(crate) fn new(data: impl Into<Data<'a, T>>, rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `rows x cols` with rows `rs` apart.
    pub(crate) fn strided(
        data: impl Into<Data<'a, T>>,
        rows: usize,
        cols: usize,
        rs: usize,
    ) -> Self {
        Mat {
            data: data.into(),
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
}

impl<'a, T: Float> Mat<'a, T> {
    /// Element `(i, j)` as seen.
    #[cfg(test)]
    pub(crate) fn at(&self, i: usize, j: usize) -> T {
        let (_, _, cs, rs) = self.view();
        let at = i * rs as usize + j * cs as usize;
        match self.data {
            Data::Plain(x) => x[at],
            Data::Bf16(x) => T::from_bf16(x[at]),
        }
    }

    /// The same matrix of f32 numbers when `T` is f32.
    pub(crate) fn as_f32(self) -> Option<Mat<'a, f32>> {
        Some(Mat {
            data: self.data.as_f32()?,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            transposed: self.transposed,
        })
    }

    /// Whether every element lies within `data`.
    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + self.cols <= self.data.len()
    }

    /// Rows `s..s + c`.
    pub(crate) fn rows(self, s: usize, c: usize) -> Self {
        Mat::strided(self.data.skip(s * self.rs), c, self.cols, self.rs)
    }

    /// Row `i` of a matrix of `T` numbers (attention's).
    pub(crate) fn row(&self, i: usize) -> &'a [T] {
        let Data::Plain(x) = self.data else {
            unreachable!("rows are read from activations, never from a bf16 weight")
        };
        &x[i * self.rs..i * self.rs + self.cols]
    }
}

/// Where [`gemm()`] writes: `ptr`, rows `rs` apart.
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
    // the `gemm` crate reads `T`: a bf16 operand is widened for it
    let (a_data, b_data) = (a.data.widened(), b.data.widened());
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
            a_data.as_ptr(),
            a_cs,
            a_rs,
            b_data.as_ptr(),
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
pub(crate) unsafe fn dense<'a, T: Float>(
    dst: &mut [T],
    a: impl Into<Data<'a, T>>,
    b: impl Into<Data<'a, T>>,
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
pub(crate) unsafe fn dense_serial<'a, T: Float>(
    dst: &mut [T],
    a: impl Into<Data<'a, T>>,
    b: impl Into<Data<'a, T>>,
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
unsafe fn dense_on<'a, T: Float>(
    par: gemm::Parallelism,
    dst: &mut [T],
    a: impl Into<Data<'a, T>>,
    b: impl Into<Data<'a, T>>,
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
