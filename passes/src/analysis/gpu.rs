//! The machine model behind the roofline bound and the "fits on chip" decisions: the one
//! table of GPUs the project knows. The analysis, the schedulers' cost models, the SP
//! planner and the benchmarks all read a [`GpuModel`] from here; at run time the device's
//! own counts (SMs, shared memory) replace the table's ([`GpuModel::for_device`]).
//!
//! Four throughputs bound a kernel from below: tensor-core contraction FLOP/s, scalar
//! (CUDA-core fp32) FLOP/s, special-function (SFU: exp, log, tanh, sqrt) op/s, and memory
//! bandwidth. The units run concurrently, so the lower bound is the largest of the four
//! times, not their sum.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuModel {
    pub name: String,
    /// Dense bf16/f16 tensor-core throughput, FLOP/s (one multiply-add is 2 FLOPs).
    pub contraction_flops: f64,
    /// fp32 throughput of the CUDA cores for element-wise maps and reductions, FLOP/s.
    pub scalar_flops: f64,
    /// Special-function-unit throughput (exp, log, tanh, sqrt), op/s.
    pub transcendental_ops: f64,
    /// DRAM (HBM) bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    pub sm_count: u32,
    /// Shared memory one CTA may use, bytes.
    pub shared_memory_per_sm: u64,
    /// Register file of one SM, bytes.
    pub registers_per_sm: u64,
}

impl GpuModel {
    /// NVIDIA H100 SXM (datasheet): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, ~3.7 Tops/s
    /// SFU (132 SMs x 16 SFU lanes x ~1.75 GHz), 3.35 TB/s HBM3.
    pub fn h100() -> GpuModel {
        GpuModel {
            name: "H100".to_string(),
            contraction_flops: 989e12,
            scalar_flops: 67e12,
            transcendental_ops: 3.7e12,
            memory_bandwidth: 3.35e12,
            sm_count: 132,
            shared_memory_per_sm: 228 * 1024,
            registers_per_sm: 256 * 1024,
        }
    }

    /// NVIDIA H200: the H100's compute with 4.8 TB/s HBM3e.
    pub fn h200() -> GpuModel {
        GpuModel {
            name: "H200".to_string(),
            memory_bandwidth: 4.8e12,
            ..GpuModel::h100()
        }
    }

    /// NVIDIA A100 SXM: 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32, ~2.4 Tops/s SFU
    /// (108 SMs x 16 x 1.41 GHz), 2.0 TB/s HBM2e, 164 KiB shared memory per SM.
    pub fn a100() -> GpuModel {
        GpuModel {
            name: "A100".to_string(),
            contraction_flops: 312e12,
            scalar_flops: 19.5e12,
            transcendental_ops: 2.4e12,
            memory_bandwidth: 2.0e12,
            sm_count: 108,
            shared_memory_per_sm: 164 * 1024,
            registers_per_sm: 256 * 1024,
        }
    }

    /// The model of a device by its driver name (`NVIDIA H200`, `NVIDIA A100-SXM4-80GB`):
    /// the table entry it names, with the device's own SM count; `None` for a part the
    /// table does not know.
    pub fn for_device(device_name: &str, sm_count: Option<u32>) -> Option<GpuModel> {
        let upper = device_name.to_ascii_uppercase();
        let mut model = ["H200", "H100", "H800", "A100"]
            .iter()
            .find(|part| upper.contains(*part))
            .and_then(|part| GpuModel::by_name(if *part == "H800" { "h100" } else { part }))?;
        if let Some(sms) = sm_count.filter(|&n| n > 0) {
            model.sm_count = sms;
        }
        Some(model)
    }

    /// A preset by name (`h100`, `h200`, `a100`; case-insensitive).
    pub fn by_name(name: &str) -> Option<GpuModel> {
        match name.to_ascii_lowercase().as_str() {
            "h100" => Some(GpuModel::h100()),
            "h200" => Some(GpuModel::h200()),
            "a100" => Some(GpuModel::a100()),
            _ => None,
        }
    }

    /// The on-chip storage one CTA can keep live across a loop: shared memory plus the
    /// register file of its SM (FlashAttention keeps its accumulators in registers).
    pub fn on_chip_bytes(&self) -> u64 {
        self.shared_memory_per_sm + self.registers_per_sm
    }
}

impl Default for GpuModel {
    fn default() -> Self {
        GpuModel::h100()
    }
}
