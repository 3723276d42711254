//! `--device` and `--dtype`.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

use crate::cli::ModelArgs;

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA if this build has it and a GPU is there, else Metal likewise, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (builds with `--features cuda`).
    Cuda,
    /// The Apple GPU (builds with `--features metal`).
    Metal,
}

/// Number format of the model weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// On a GPU: bf16 where it runs bf16 (NVIDIA Ampere or later, Apple M2 or later), else f16
    /// (trained with a dynamic loss scale). On the CPU: bf16's mixed precision where the CPU has
    /// AVX512-BF16 (unless `ATOMTUNE_CPU_BF16=0`), else f32.
    Auto,
    /// 32-bit floats, matrix products included.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16. On the CPU, mixed precision as PyTorch's CPU autocast: conv and linear
    /// weights kept in bf16, activations, norms, the loss and gradients in f32, matrix products
    /// and convolutions with bf16 operands and f32 sums on AVX512-BF16 (Zen 4, Sapphire Rapids
    /// and later); plain f32 on CPUs without it.
    Bf16,
}

/// The device `arg` names.
pub fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda: this atomtune was built without CUDA (rebuild with `--features cuda`)");
            }
            Device::new_cuda(0)?
        }
        DeviceArg::Metal => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this atomtune was built without Metal (rebuild with `--features metal` on macOS)");
            }
            Device::new_metal(0)?
        }
        DeviceArg::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Device::Cpu
        }
    })
}

/// The dtype `arg` names on `device`.
pub fn dtype(arg: DTypeArg, device: &Device) -> DType {
    match arg {
        // bf16's mixed precision keeps f32 tensors on the CPU (`device_and_dtype`)
        DTypeArg::Auto if device.is_cpu() => DType::F32,
        DTypeArg::Auto if runs_bf16(device) => DType::BF16,
        DTypeArg::Auto => DType::F16,
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    }
}

/// Whether `device` runs bf16 work: a small product, an exponential and a conversion, tried
/// once. GPUs before NVIDIA Ampere and Apple M2 lack bf16 arithmetic (candle's kernels and
/// cuBLAS refuse it there), which is what this finds out without a table of models.
fn runs_bf16(device: &Device) -> bool {
    let probe = || -> candle_core::Result<f32> {
        let a = candle_core::Tensor::ones((8, 8), DType::BF16, device)?;
        a.matmul(&a)?
            .exp()?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()
    };
    probe().is_ok_and(f32::is_finite)
}

/// The device and dtype `--device`, `--dtype` and `--exact-f32` ask for, the device set up:
/// on CUDA, f32 matrix products (f32 models, and attention, which runs in f32 for every model)
/// may use TF32 tensor cores unless `--exact-f32` is given.
pub fn device_and_dtype(a: &ModelArgs) -> Result<(Device, DType)> {
    let dev = device(a.device)?;
    if dev.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(!a.exact_f32);
    }
    if dev.is_cpu() && matches!(a.dtype, DTypeArg::Auto | DTypeArg::Bf16 | DTypeArg::F32) {
        let bf16 = match a.dtype {
            DTypeArg::Auto => models::cpu_bf16::auto(),
            DTypeArg::Bf16 if !models::cpu_bf16::supported() => {
                eprintln!(
                    "warning: --dtype bf16: this CPU has no AVX512-BF16 instructions; running in f32"
                );
                false
            }
            DTypeArg::Bf16 => true,
            _ => false,
        };
        models::cpu_bf16::set_enabled(bf16);
        return Ok((dev, DType::F32));
    }
    let dt = dtype(a.dtype, &dev);
    Ok((dev, dt))
}

/// The number format a run computes in, for messages: the dtype, and whether the CPU's matrix
/// products run with bf16 operands.
pub fn precision(dt: DType) -> String {
    if models::cpu_bf16::active() && dt == DType::F32 {
        let tiles = if models::cpu_bf16::amx::active() {
            " on AMX tiles"
        } else {
            ""
        };
        format!("f32 activations, bf16 weights and matrix products{tiles}")
    } else {
        format!("{dt:?}").to_lowercase()
    }
}

/// A short name of a device for messages.
pub fn describe(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}
