//! The GPUs a run uses: opening one, the code-generation target that suits it, the machine
//! model of it (the project's one table with the device's own counts), and the storage of
//! values in device element types.

use crate::{ExecError, Result};
use einattn_backends::abi::Dtype;
use einattn_backends::Target;
use einattn_passes::analysis::GpuModel;
use einattn_runtime::Gpu;

/// GPU `ordinal` and its name.
pub fn open(ordinal: usize) -> Result<(Gpu, String)> {
    let gpu = Gpu::open(ordinal)?;
    let name = gpu.name()?;
    Ok((gpu, name))
}

/// The code-generation target that suits GPU 0: sm_90a on Hopper (compute capability 9.x,
/// where the linear kernels use wgmma), sm_80 elsewhere; `None` without a usable GPU (the
/// run itself then reports why).
pub fn target() -> Option<Target> {
    let gpu = Gpu::open(0).ok()?;
    let (major, _) = gpu.compute_capability().ok()?;
    Some(if major == 9 {
        Target::Sm90a
    } else {
        Target::Sm80
    })
}

/// The machine model of GPU 0: the table's entry for its name with its SM count, or `None`
/// when there is no GPU or the table does not know it.
pub fn model() -> Option<GpuModel> {
    let (gpu, name) = open(0).ok()?;
    model_of(&gpu, &name)
}

/// The machine model of an open GPU.
pub fn model_of(gpu: &Gpu, name: &str) -> Option<GpuModel> {
    let sms = gpu
        .multiprocessor_count()
        .ok()
        .and_then(|n| u32::try_from(n).ok());
    GpuModel::for_device(name, sms)
}

/// `x` rounded to a 16-bit storage type, as its bit pattern.
pub fn to_bits(dtype: Dtype, x: f64) -> u16 {
    match dtype {
        Dtype::F16 => half::f16::from_f64(x).to_bits(),
        _ => half::bf16::from_f64(x).to_bits(),
    }
}

/// A 16-bit storage value as f64.
pub fn from_bits(dtype: Dtype, b: u16) -> f64 {
    match dtype {
        Dtype::F16 => half::f16::from_bits(b).to_f64(),
        _ => half::bf16::from_bits(b).to_f64(),
    }
}

/// `x` rounded to a storage type, as f64.
pub fn round(dtype: Dtype, x: f64) -> f64 {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => from_bits(dtype, to_bits(dtype, x)),
        Dtype::F32 => x as f32 as f64,
        Dtype::U32 => x,
    }
}

/// A device array of a contract dtype: 16-bit floats as bits, f32, or u32 words.
pub enum DeviceArray {
    Half(einattn_runtime::DeviceBuffer<u16>),
    Float(einattn_runtime::DeviceBuffer<f32>),
    Word(einattn_runtime::DeviceBuffer<u32>),
}

impl DeviceArray {
    /// `values` stored as `dtype`.
    pub fn upload(gpu: &Gpu, dtype: Dtype, values: &[f64]) -> Result<DeviceArray> {
        Ok(match dtype {
            Dtype::Bf16 | Dtype::F16 => DeviceArray::Half(
                gpu.upload(
                    &values
                        .iter()
                        .map(|&x| to_bits(dtype, x))
                        .collect::<Vec<_>>(),
                )?,
            ),
            Dtype::F32 => DeviceArray::Float(
                gpu.upload(&values.iter().map(|&x| x as f32).collect::<Vec<_>>())?,
            ),
            Dtype::U32 => {
                let words: Option<Vec<u32>> = values
                    .iter()
                    .map(|&x| (x >= 0.0 && x <= f64::from(u32::MAX)).then_some(x as u32))
                    .collect();
                DeviceArray::Word(gpu.upload(&words.ok_or_else(|| {
                    ExecError::Input("a u32 array holds a value outside u32".into())
                })?)?)
            }
        })
    }

    /// `len` elements of `dtype`, each `value` (NaN poisons float arrays that a kernel must
    /// write before anything reads them).
    pub fn filled(gpu: &Gpu, dtype: Dtype, len: usize, value: f64) -> Result<DeviceArray> {
        Ok(match dtype {
            Dtype::Bf16 | Dtype::F16 => DeviceArray::Half(gpu.filled(len, to_bits(dtype, value))?),
            Dtype::F32 => DeviceArray::Float(gpu.filled(len, value as f32)?),
            Dtype::U32 => DeviceArray::Word(gpu.filled(len, 0u32)?),
        })
    }

    pub fn address(&self, gpu: &Gpu) -> u64 {
        match self {
            DeviceArray::Half(b) => b.device_address(gpu),
            DeviceArray::Float(b) => b.device_address(gpu),
            DeviceArray::Word(b) => b.device_address(gpu),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            DeviceArray::Half(b) => b.len(),
            DeviceArray::Float(b) => b.len(),
            DeviceArray::Word(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element.
    pub fn element_bytes(&self) -> u64 {
        match self {
            DeviceArray::Half(_) => 2,
            DeviceArray::Float(_) | DeviceArray::Word(_) => 4,
        }
    }

    pub fn zero(&mut self, gpu: &Gpu) -> Result<()> {
        match self {
            DeviceArray::Half(b) => gpu.zero(b)?,
            DeviceArray::Float(b) => gpu.zero(b)?,
            DeviceArray::Word(b) => gpu.zero(b)?,
        }
        Ok(())
    }

    /// The contents as f64 (after the stream's work so far).
    pub fn download(&self, gpu: &Gpu, dtype: Dtype) -> Result<Vec<f64>> {
        gpu.synchronize()?;
        Ok(match self {
            DeviceArray::Half(b) => gpu
                .download(b)?
                .iter()
                .map(|&x| from_bits(dtype, x))
                .collect(),
            DeviceArray::Float(b) => gpu.download(b)?.iter().map(|&x| f64::from(x)).collect(),
            DeviceArray::Word(b) => gpu.download(b)?.iter().map(|&x| f64::from(x)).collect(),
        })
    }
}
