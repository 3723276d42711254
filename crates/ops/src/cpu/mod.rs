//! What the fused CPU kernels share: their element types ([`Float`], [`float_op!`]), reading
//! candle's CPU storage ([`slices`]), how finely they split work over threads ([`task_len`]),
//! the one wrapper around the `gemm` crate ([`matmul`]) and vectorised f32 math ([`fastmath`]).

use candle_core::{CpuStorage, Layout, Tensor};

pub mod bf16;
pub(crate) mod fastmath;
pub(crate) mod matmul;
pub(crate) mod switch;

/// `CpuStorage::F32(body)` or `CpuStorage::F64(body)` by `dtype`, with `$t` naming the element
/// type inside `body`; any other dtype is an error naming the op.
macro_rules! float_op {
    ($dtype:expr, $name:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::DType::F64 => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $name),
        }
    };
}
pub(crate) use float_op;

/// The element types the CPU kernels run in (f32, f64).
pub(crate) trait Float: num_traits::Float + Send + Sync + 'static {
    /// `x` in this type (rounded for f32).
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        <Self as num_traits::NumCast>::from(x).unwrap_or_else(Self::nan)
    }

    /// `x` in this type (exact: bf16 numbers are f32 numbers with a shorter mantissa).
    fn from_bf16(x: half::bf16) -> Self;

    /// A buffer for [`matmul::Data::widened`] to widen a bf16 weight into: the last one on this
    /// thread (f32), so that a layer's weight costs one pass instead of a zeroing pass, page
    /// faults and a pass; a fresh one for other types.
    fn take_buffer() -> Vec<Self> {
        Vec::new()
    }

    /// Gives [`Float::take_buffer`]'s buffer back for the next op.
    fn put_buffer(_: Vec<Self>) {}

    /// `1 / (1 + e^-x)`.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).exp())
    }

    /// Runs [`matmul::gemm`]'s product in bf16 ([`bf16`]) where that is on for this type;
    /// `false` when it is not (the caller then runs it as it is).
    fn bf16_gemm(
        _par: gemm::Parallelism,
        _dst: matmul::Dst<Self>,
        _a: matmul::Mat<'_, Self>,
        _b: matmul::Mat<'_, Self>,
        _scale: Self,
        _accumulate: bool,
    ) -> bool {
        false
    }
}

impl Float for f32 {
    #[inline(always)]
    fn from_bf16(x: half::bf16) -> f32 {
        x.to_f32()
    }

    fn take_buffer() -> Vec<f32> {
        WIDENED.with(std::cell::Cell::take)
    }

    fn put_buffer(v: Vec<f32>) {
        WIDENED.with(|w| w.set(v));
    }

    #[inline(always)]
    fn sigmoid(self) -> f32 {
        fastmath::sigmoid(self)
    }

    fn bf16_gemm(
        par: gemm::Parallelism,
        dst: matmul::Dst<f32>,
        a: matmul::Mat<'_, f32>,
        b: matmul::Mat<'_, f32>,
        scale: f32,
        accumulate: bool,
    ) -> bool {
        if !bf16::active() || !bf16::worth_it(a.shape(), b.shape()) {
            return false;
        }
        let threads = match par {
            gemm::Parallelism::Rayon(n) => n,
            _ => 1,
        };
        // SAFETY: `matmul::gemm`'s caller vouches for `dst`; the inputs are checked there.
        unsafe { bf16::gemm(threads, dst, a, b, scale, accumulate) }
    }
}

impl Float for f64 {
    #[inline(always)]
    fn from_bf16(x: half::bf16) -> f64 {
        x.to_f64()
    }
}

/// `x` as f32 numbers when `T` is f32: for the kernels whose f32 case may take the bf16
/// products' own path.
pub(crate) fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: `T` is f32 itself.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// f32 numbers as `T`'s when `T` is f32 (the way back from [`as_f32`]).
pub(crate) fn from_f32<T: Float>(x: &[f32]) -> Option<&[T]> {
    // SAFETY: `T` is f32 itself.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// [`as_f32`] for a buffer to write.
pub(crate) fn as_f32_mut<T: Float>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: `T` is f32 itself.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// The numbers of a contiguous CPU tensor, as the slice its layout covers.
pub(crate) fn slices<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("atomtune's CPU kernels need contiguous inputs");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..z])
}

thread_local! {
    /// [`Float::take_buffer`]'s buffer for f32.
    static WIDENED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The numbers of a contiguous CPU tensor as a kernel's operand: of type `T`, or bf16, which is
/// how a frozen weight kept in bf16 beside f32 activations reaches a kernel. The bf16 products
/// pack it as it is; what reads it as `T` widens it ([`matmul::Data::widened`]), a layer at a
/// time, into a buffer the thread reuses.
pub(crate) fn weights<'a, T: Float + candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<matmul::Data<'a, T>> {
    let CpuStorage::BF16(all) = s else {
        return Ok(matmul::Data::Plain(slices::<T>(s, l)?));
    };
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("atomtune's CPU kernels need contiguous inputs");
    };
    Ok(matmul::Data::Bf16(&all[a..z]))
}

/// How many items of `item` numbers each a parallel task takes, so that a task holds at least
/// 16K numbers: below that, waking threads costs more than the work (the tiny models' steps
/// spent a third of their time in thread hand-offs).
pub(crate) fn task_len(item: usize) -> usize {
    ((1 << 14) / item.max(1)).max(1)
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: users hand each task a disjoint part of the buffer (each use says which).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer; a method, so closures capture the `Send` wrapper and not its field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// The gradients of `x`, `gamma` and `beta`, each only when tracked.
pub(crate) type NormGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Splits the norm kernels' packed backward output `[dx, dgamma, dbeta]` (group norm and layer
/// norm) into the gradients of the tracked inputs.
pub(crate) fn unpack_norm_grads(
    packed: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> candle_core::Result<NormGrads> {
    let (n, c) = (x.elem_count(), gamma.elem_count());
    let part = |t: &Tensor, start: usize, len: usize| -> candle_core::Result<Option<Tensor>> {
        t.track_op()
            .then(|| packed.narrow(0, start, len)?.reshape(t.dims()))
            .transpose()
    };
    Ok((part(x, 0, n)?, part(gamma, n, c)?, part(beta, n + c, c)?))
}
