//! `--device` and `--dtype`.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

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
    /// f16 on a GPU, f32 on the CPU.
    Auto,
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (matmuls and convs run in f32 on the CPU).
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
        DTypeArg::Auto if device.is_cpu() => DType::F32,
        DTypeArg::Auto => DType::F16,
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
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
