//! The one device and precision selection of every command (`--device`, `--devices`,
//! `--dtype` of `serve`, `generate`, `train`, `bench`, `probe`).
use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::ValueEnum;

/// Weight precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    /// The dtype, checked against the device it will run on (`--dtype` is named in errors).
    pub fn for_device(self, device: &Device) -> anyhow::Result<DType> {
        let dtype = self.dtype();
        crate::models::check_precision(dtype, device)
            .map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
        Ok(dtype)
    }
}

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when compiled in and present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The device of `--device` (CUDA device 0): the one device selection of `generate`,
    /// `train`, `bench` and `serve`.
    pub fn select(self) -> anyhow::Result<Device> {
        Ok(select_devices(self, &[])?.remove(0))
    }
}

/// The devices to serve on: `ordinals` (from `--devices`, CUDA device numbers) when given,
/// else the one device of `device`. An ordinal that is repeated, or a CUDA device that cannot
/// be opened, is an error naming it.
pub fn select_devices(device: DeviceArg, ordinals: &[usize]) -> anyhow::Result<Vec<Device>> {
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).with_context(|| {
            format!("CUDA device {ordinal} (was afa built with --features cuda? is it present?)")
        })
    };
    if ordinals.is_empty() {
        return Ok(vec![match device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => cuda(0).context("--device cuda")?,
            DeviceArg::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
        }]);
    }
    if device == DeviceArg::Cpu {
        bail!("--devices lists CUDA devices; it cannot be combined with --device cpu");
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = ordinals.iter().find(|&&o| !seen.insert(o)) {
        bail!("--devices names CUDA device {twice} twice");
    }
    ordinals
        .iter()
        .map(|&ordinal| cuda(ordinal).context("--devices"))
        .collect()
}
