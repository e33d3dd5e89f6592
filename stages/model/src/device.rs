//! Where tensors live and in which precision they compute.
//!
//! Every model path asks this one struct for its device and dtype, so the CUDA path runs the same
//! code as the CPU path: CPU computes in f32 (candle's CPU bf16 matmul widens and narrows on every
//! call, so it is slower); CUDA computes in bf16 while trainable weights stay f32 master copies
//! (cast inside the forward pass, so gradients and optimizer state are f32).

use anyhow::{Context, Result};
use candle_core::{DType, Device};

/// The device and compute precision shared by a model and everything that runs it.
#[derive(Clone, Debug)]
pub struct DeviceSetup {
    pub device: Device,
    /// Precision of activations and frozen weights: F32 on CPU, BF16 on CUDA.
    pub compute_dtype: DType,
}

/// `None` selects the CPU. `Some(ordinal)` selects that CUDA device and needs a build with the
/// `cuda` feature.
pub fn setup(cuda_ordinal: Option<usize>) -> Result<DeviceSetup> {
    match cuda_ordinal {
        None => Ok(DeviceSetup::cpu()),
        Some(ordinal) => cuda(ordinal),
    }
}

impl DeviceSetup {
    pub fn cpu() -> Self {
        DeviceSetup {
            device: Device::Cpu,
            compute_dtype: DType::F32,
        }
    }

    pub fn is_cuda(&self) -> bool {
        self.device.is_cuda()
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<DeviceSetup> {
    let device = Device::new_cuda(ordinal).with_context(|| {
        format!("opening CUDA device {ordinal} (is a GPU visible and the driver loaded?)")
    })?;
    Ok(DeviceSetup {
        device,
        compute_dtype: DType::BF16,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<DeviceSetup> {
    Err(anyhow::anyhow!("this emflow was built without CUDA support"))
        .with_context(|| {
            format!("CUDA device {ordinal} was requested: rebuild with `cargo build --release --features cuda`, or run on the CPU")
        })
}
