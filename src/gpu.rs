//! `einattn check` and `einattn bench`: run a compiled cascade on the GPU.

use crate::cli::{CliError, ReportFormat};
use einattn_backends::compile::CompiledKernel;
use einattn_backends::reference::relative_error;
use einattn_backends::schedule::Layout;
use einattn_backends::tile::{AbiRole, Elem};
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::topological_order;
use einattn_runtime::{DeviceBuffer, Gpu, KernelArg, LaunchDims, RuntimeError};
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write;

/// Above this many multiply-adds the tree-walking interpreter takes longer than a check
/// should; the direct f64 formula of the recognized computation (checked against the
/// interpreter by the test suite) stands in for it.
const INTERPRETER_MAC_LIMIT: u64 = 40_000_000;

/// Exit code when the GPU result does not match.
pub const MISMATCH_EXIT: i32 = 1;
/// Exit code when there is no GPU to run on.
pub const NO_GPU_EXIT: i32 = 3;

pub(crate) fn gpu_error(e: RuntimeError) -> CliError {
    match e {
        RuntimeError::GpuUnavailable { reason } => CliError {
            message: format!("error: no GPU to run on: {reason}"),
            exit_code: NO_GPU_EXIT,
        },
        other => CliError::input(format!("error: {other}")),
    }
}

pub(crate) fn to_bits(elem: Elem, x: f64) -> u16 {
    match elem {
        Elem::F16 => half::f16::from_f64(x).to_bits(),
        _ => half::bf16::from_f64(x).to_bits(),
    }
}

pub(crate) fn from_bits(elem: Elem, b: u16) -> f64 {
    match elem {
        Elem::F16 => half::f16::from_bits(b).to_f64(),
        _ => half::bf16::from_bits(b).to_f64(),
    }
}

/// Device copies of the kernel's tensors and arrays, and the argument list.
struct Launch {
    dims: LaunchDims,
    args: Vec<KernelArg>,
    out: DeviceBuffer<u16>,
    _keep: Vec<DeviceBuffer<u16>>,
    _keep_f32: Vec<DeviceBuffer<f32>>,
    /// A look-back kernel's ticket counter and flags, zeroed before every launch.
    flags: Option<std::cell::RefCell<DeviceBuffer<u32>>>,
}

fn prepare(
    gpu: &Gpu,
    k: &CompiledKernel,
    inputs: &HashMap<einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>, TensorData>,
) -> Result<Launch, CliError> {
    let m = &k.schedule.matched;
    let elem = m.spec.elem;
    let upload = |l: &Layout| -> Result<DeviceBuffer<u16>, CliError> {
        let bits: Vec<u16> = match inputs.get(&l.tensor) {
            Some(t) => t.stored().iter().map(|&x| to_bits(elem, x)).collect(),
            None => vec![to_bits(elem, f64::NAN); l.elements as usize],
        };
        gpu.upload(&bits).map_err(gpu_error)
    };
    let layouts = [&m.q, &m.k, &m.v, &m.o];
    let mut bufs = Vec::new();
    for l in layouts {
        bufs.push(upload(l)?);
    }
    let mut arrays = Vec::new();
    for &t in &m.head_params {
        let vals: Vec<f32> = inputs[&t].stored().iter().map(|&x| x as f32).collect();
        arrays.push(gpu.upload(&vals).map_err(gpu_error)?);
    }
    let mut args = Vec::new();
    for p in &k.ptx.abi {
        args.push(match &p.role {
            AbiRole::TensorPtr(t) => bufs[t.index()].arg(gpu),
            AbiRole::HeadParamPtr(h) => arrays[h.index()].arg(gpu),
            AbiRole::QueryOffset => KernelArg::U32(0),
            AbiRole::RowOutputPtr(_)
            | AbiRole::StatePtr(_)
            | AbiRole::LookBackFlags
            | AbiRole::ChunkBase
            | AbiRole::ChunkTotal
            | AbiRole::TokenPtr(_)
            | AbiRole::TokenStrideBatch(_)
            | AbiRole::TokenStrideSeq(_)
            | AbiRole::TokenStrideHead(_) => {
                return Err(CliError::input(
                    "error: row outputs and states are not bound by the attention launcher".to_string(),
                ))
            }
            AbiRole::QueryLen => KernelArg::U32(m.n_q as u32),
            AbiRole::KeyLen => KernelArg::U32(m.n_k as u32),
            AbiRole::Heads => KernelArg::U32(m.heads as u32),
            AbiRole::KvGroup => KernelArg::U32(1),
            AbiRole::StrideBatch(t) => KernelArg::U64(layouts[t.index()].stride_batch),
            AbiRole::StrideSeq(t) => KernelArg::U64(layouts[t.index()].stride_seq),
            AbiRole::StrideHead(t) => KernelArg::U64(layouts[t.index()].stride_head),
            AbiRole::Scalar(s) => {
                let v = inputs[&m.scalar_params[s.index()]].stored()[0];
                if s.index() == 0 && m.spec.score.scaled_dot().is_some() && v <= 0.0 {
                    return Err(CliError::input(format!(
                        "error: this kernel folds the scale into the max and needs scale > 0 (got {v})"
                    )));
                }
                KernelArg::F32(v as f32)
            }
        });
    }
    let out = bufs
        .pop()
        .ok_or_else(|| CliError::input("error: no output buffer"))?;
    Ok(Launch {
        dims: LaunchDims {
            grid: k.ptx.grid(m.batch as u32, m.heads as u32, m.n_q as u32),
            block: (k.ptx.threads, 1, 1),
            dynamic_smem_bytes: k.ptx.dynamic_smem_bytes,
        },
        args,
        out,
        _keep: bufs,
        _keep_f32: arrays,
        flags: None,
    })
}

/// Draws inputs as the interpreter does, with Q, K and V rounded to the kernel's storage
/// type so both sides see the same numbers.
fn rounded_inputs(cascade: &Cascade, qkv: [&Layout; 3], elem: Elem, seed: u64) -> Inputs {
    let mut inputs = random_inputs(cascade, seed);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    for l in qkv {
        if let Some(t) = inputs.get_mut(&l.tensor) {
            let per_thread = t.values.len().div_ceil(threads).max(1);
            std::thread::scope(|scope| {
                for chunk in t.values.chunks_mut(per_thread) {
                    scope.spawn(move || chunk.iter_mut().for_each(|x| *x = elem.round(*x)));
                }
            });
        }
    }
    inputs
}

/// The cascade interpreter's output tensor on `inputs`.
fn interpreter_output(
    cascade: &Cascade,
    inputs: &Inputs,
    out: einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>,
) -> Result<Vec<f64>, CliError> {
    let values = evaluate_in_order(cascade, inputs, &topological_order(cascade))
        .map_err(|e| CliError::input(format!("error: the interpreter failed: {e}")))?;
    Ok(values
        .get(out)
        .ok_or_else(|| CliError::input("error: the interpreter produced no output"))?
        .stored()
        .into_owned())
}

/// The f64 reference of a check and its name: the cascade interpreter when `interpreter`
/// (the problem is within its limit), else the recognized computation's direct formula
/// when one is given.
fn f64_reference(
    cascade: &Cascade,
    inputs: &Inputs,
    out: einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>,
    interpreter: bool,
    formula: Option<(&str, &dyn Fn() -> Vec<f64>)>,
) -> Result<Option<(Vec<f64>, String)>, CliError> {
    if interpreter {
        let values = interpreter_output(cascade, inputs, out)?;
        return Ok(Some((values, "the cascade interpreter (f64)".to_string())));
    }
    Ok(formula.map(|(name, f)| (f(), name.to_string())))
}

/// A 16-bit output buffer as f64 values.
fn download_values(gpu: &Gpu, out: &DeviceBuffer<u16>, elem: Elem) -> Result<Vec<f64>, CliError> {
    gpu.synchronize().map_err(gpu_error)?;
    Ok(gpu
        .download(out)
        .map_err(gpu_error)?
        .iter()
        .map(|&b| from_bits(elem, b))
        .collect())
}

/// The lines `check` prints and whether the error passes (NaN never does).
fn check_report(
    device: &str,
    kernel: &einattn_backends::PtxKernel,
    resources: einattn_runtime::KernelResources,
    problem: &str,
    err: f64,
) -> (String, bool) {
    let tolerance = 2e-2;
    let pass = err < tolerance;
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(
        s,
        "kernel: {} ({} registers, {} B local, {} B shared)",
        kernel.entry, resources.registers, resources.local_bytes, kernel.dynamic_smem_bytes
    );
    let _ = writeln!(s, "problem: {problem}");
    let _ = writeln!(
        s,
        "{}: ||out - ref|| / ||ref|| = {err:.3e} (tolerance {tolerance:.0e})",
        if pass { "PASS" } else { "FAIL" }
    );
    (s, pass)
}

fn open_gpu() -> Result<(Gpu, String), CliError> {
    open_gpu_at(0)
}

fn open_gpu_at(ordinal: usize) -> Result<(Gpu, String), CliError> {
    let gpu = Gpu::open(ordinal).map_err(gpu_error)?;
    let name = gpu.name().map_err(gpu_error)?;
    Ok((gpu, name))
}

/// The code-generation target that suits GPU 0: sm_90a on Hopper (compute capability
/// 9.x, where the linear kernels use wgmma), sm_80 elsewhere; `None` without a usable GPU
/// (the run itself then reports why).
pub fn device_target() -> Option<einattn_backends::Target> {
    let gpu = Gpu::open(0).ok()?;
    let (major, _) = gpu.compute_capability().ok()?;
    Some(if major == 9 {
        einattn_backends::Target::Sm90a
    } else {
        einattn_backends::Target::Sm80
    })
}

/// `einattn check`: GPU output against the reference on fresh random inputs.
pub fn check(cascade: &Cascade, k: &CompiledKernel, seed: u64) -> Result<(String, bool), CliError> {
    let m = &k.schedule.matched;
    let inputs = rounded_inputs(
        cascade,
        [
            &k.schedule.matched.q,
            &k.schedule.matched.k,
            &k.schedule.matched.v,
        ],
        k.schedule.matched.spec.elem,
        seed,
    );
    let (gpu, device) = open_gpu()?;
    let kernel = gpu.load_ptx(&k.ptx.text, &k.ptx.entry).map_err(gpu_error)?;
    let launch = prepare(&gpu, k, &inputs)?;
    gpu.launch(&kernel, launch.dims, &launch.args)
        .map_err(gpu_error)?;
    let got = download_values(&gpu, &launch.out, m.spec.elem)?;
    let d = m.spec.head_dim as u64;
    let macs = m.batch * m.heads * m.n_q * m.n_k * d * 2;
    let formula = || m.reference_output(&inputs);
    let (want, reference_name) = f64_reference(
        cascade,
        &inputs,
        m.o.tensor,
        macs <= INTERPRETER_MAC_LIMIT,
        Some((
            "the f64 attention formula (size above the interpreter's limit)",
            &formula,
        )),
    )?
    .ok_or_else(|| CliError::input("error: no reference for this check"))?;
    let problem = format!(
        "B={} H={} N_q={} N_k={} d={} {}; seed {seed}; reference: {reference_name}",
        m.batch,
        m.heads,
        m.n_q,
        m.n_k,
        d,
        m.spec.elem.name()
    );
    let resources = kernel.resources().map_err(gpu_error)?;
    let (s, pass) = check_report(
        &device,
        &k.ptx,
        resources,
        &problem,
        relative_error(&got, &want),
    );
    Ok((s, pass))
}

/// Dense bf16/f16 tensor-core peak of known parts, FLOP/s.
fn peak_flops(device: &str) -> Option<f64> {
    if device.contains("H100") || device.contains("H200") || device.contains("H800") {
        Some(989e12)
    } else if device.contains("A100") {
        Some(312e12)
    } else {
        None
    }
}

/// `einattn bench`: median time, TFLOP/s (counting only visible query-key pairs) and the
/// fraction of the tensor-core peak.
pub fn bench(
    cascade: &Cascade,
    k: &CompiledKernel,
    reps: usize,
    format: ReportFormat,
) -> Result<String, CliError> {
    let m = &k.schedule.matched;
    let inputs = rounded_inputs(
        cascade,
        [
            &k.schedule.matched.q,
            &k.schedule.matched.k,
            &k.schedule.matched.v,
        ],
        k.schedule.matched.spec.elem,
        0,
    );
    let (gpu, device) = open_gpu()?;
    let kernel = gpu.load_ptx(&k.ptx.text, &k.ptx.entry).map_err(gpu_error)?;
    let launch = prepare(&gpu, k, &inputs)?;
    let t = gpu
        .time(reps.div_ceil(4).max(3), reps, || {
            gpu.launch(&kernel, launch.dims, &launch.args)
        })
        .map_err(gpu_error)?;
    let masks = m.spec.masks();
    let mut visible = 0u64;
    for p in 0..m.n_q as i64 {
        // Visible keys of row p form one interval under band masks.
        let (mut lo, mut hi) = (0i64, m.n_k as i64 - 1);
        for b in &masks {
            match b.direction {
                einattn_backends::tile::BandDirection::KeyMinusQuery => hi = hi.min(p + b.bound),
                einattn_backends::tile::BandDirection::QueryMinusKey => lo = lo.max(p - b.bound),
            }
        }
        visible += (hi - lo + 1).max(0) as u64;
    }
    let flops = 4.0 * (m.batch * m.heads * visible * m.spec.head_dim as u64) as f64;
    let tflops = flops / (t.median_ms * 1e-3) / 1e12;
    let peak = peak_flops(&device);
    let resources = kernel.resources().map_err(gpu_error)?;
    let value = json!({
        "device": device,
        "kernel": k.ptx.entry,
        "cascade": cascade.name,
        "problem": {"batch": m.batch, "heads": m.heads, "n_q": m.n_q, "n_k": m.n_k,
                    "head_dim": m.spec.head_dim, "elem": m.spec.elem.name(),
                    "causal": m.spec.causal, "window": m.spec.window},
        "schedule": {"block_m": k.schedule.kernel.block_m, "block_n": k.schedule.kernel.block_n,
                     "warps": k.schedule.kernel.warps, "stages": k.schedule.kernel.stages},
        "registers": resources.registers,
        "local_bytes": resources.local_bytes,
        "median_ms": t.median_ms,
        "min_ms": t.min_ms,
        "max_ms": t.max_ms,
        "reps": t.reps,
        "flops": flops,
        "tflops": tflops,
        "peak_tflops": peak.map(|p| p / 1e12),
        "percent_of_peak": peak.map(|p| 100.0 * tflops * 1e12 / p),
        "predicted_ms": k.schedule.estimate.seconds * 1e3,
    });
    let mut rate = format!("{tflops:.1} TFLOP/s");
    if let Some(p) = peak {
        let _ = write!(
            rate,
            " = {:.1}% of the {:.0} TFLOP/s tensor-core peak",
            100.0 * tflops * 1e12 / p,
            p / 1e12
        );
    }
    let timing = format!(
        "{}; predicted {:.4} ms",
        timing_line(&t),
        k.schedule.estimate.seconds * 1e3
    );
    bench_report(
        format,
        &value,
        &device,
        &k.ptx.entry,
        resources.registers,
        &timing,
        &rate,
    )
}

fn timing_line(t: &einattn_runtime::Timing) -> String {
    format!(
        "median {:.4} ms (min {:.4}, max {:.4}, {} reps)",
        t.median_ms, t.min_ms, t.max_ms, t.reps
    )
}

/// A kernel benchmark's report: `value` as JSON, or the device, the kernel, the timing and
/// the rate as text.
fn bench_report(
    format: ReportFormat,
    value: &serde_json::Value,
    device: &str,
    kernel: &str,
    registers: i32,
    timing: &str,
    rate: &str,
) -> Result<String, CliError> {
    Ok(match format {
        ReportFormat::Json => serde_json::to_string_pretty(value)
            .map_err(|e| CliError::input(format!("error: {e}")))?,
        ReportFormat::Text => {
            format!(
                "device: {device}\nkernel: {kernel} ({registers} registers)\n{timing}\n{rate}\n"
            )
        }
    })
}

/// Device buffers and arguments of a linear-attention launch.
fn prepare_linear(
    gpu: &Gpu,
    k: &einattn_backends::compile::CompiledLinear,
    inputs: &Inputs,
) -> Result<Launch, CliError> {
    let m = &k.matched;
    let elem = m.spec.elem;
    let layouts = [&m.q, &m.k, &m.v, &m.o];
    let mut bufs = Vec::new();
    for l in layouts {
        let bits: Vec<u16> = match inputs.get(&l.tensor) {
            Some(t) => t.stored().iter().map(|&x| to_bits(elem, x)).collect(),
            None => vec![to_bits(elem, f64::NAN); l.elements as usize],
        };
        bufs.push(gpu.upload(&bits).map_err(gpu_error)?);
    }
    let mut arrays = Vec::new();
    if let Some(p) = m.decay_param {
        let vals: Vec<f32> = inputs[&p].stored().iter().map(|&x| x as f32).collect();
        arrays.push(gpu.upload(&vals).map_err(gpu_error)?);
    }
    let gate_index = arrays.len();
    if let Some(g) = &m.gate {
        let vals: Vec<f32> = inputs[&g.tensor]
            .stored()
            .iter()
            .map(|&x| x as f32)
            .collect();
        arrays.push(gpu.upload(&vals).map_err(gpu_error)?);
    }
    let grid = k.ptx.grid(m.batch as u32, m.heads as u32, m.n as u32);
    let state_index = arrays.len();
    let cells = (m.batch * m.heads) as usize * grid.2 as usize;
    for _ in &k.program.states {
        let len = cells * (m.spec.head_dim * m.spec.value_dim) as usize;
        arrays.push(gpu.filled(len, 0f32).map_err(gpu_error)?);
    }
    let flags = if k.program.look_back {
        let words = 1 + cells * grid.0 as usize;
        Some(gpu.filled(words, 0u32).map_err(gpu_error)?)
    } else {
        None
    };
    let mut args = Vec::new();
    for p in &k.ptx.abi {
        args.push(match &p.role {
            AbiRole::TensorPtr(t) => bufs[t.index()].arg(gpu),
            AbiRole::HeadParamPtr(h) => arrays[h.index()].arg(gpu),
            AbiRole::StatePtr(s) => arrays[state_index + s.index()].arg(gpu),
            AbiRole::LookBackFlags => match &flags {
                Some(f) => f.arg(gpu),
                None => return Err(CliError::input("error: no look-back flags")),
            },
            AbiRole::ChunkBase | AbiRole::QueryOffset => KernelArg::U32(0),
            AbiRole::ChunkTotal => KernelArg::U32(grid.2),
            AbiRole::TokenPtr(_) => arrays[gate_index].arg(gpu),
            AbiRole::TokenStrideBatch(_) => KernelArg::U64(m.gate.map_or(0, |g| g.stride_batch)),
            AbiRole::TokenStrideSeq(_) => KernelArg::U64(m.gate.map_or(0, |g| g.stride_seq)),
            AbiRole::TokenStrideHead(_) => KernelArg::U64(m.gate.map_or(0, |g| g.stride_head)),
            AbiRole::QueryLen | AbiRole::KeyLen => KernelArg::U32(m.n as u32),
            AbiRole::Heads => KernelArg::U32(m.heads as u32),
            AbiRole::KvGroup => KernelArg::U32(1),
            AbiRole::StrideBatch(t) => KernelArg::U64(layouts[t.index()].stride_batch),
            AbiRole::StrideSeq(t) => KernelArg::U64(layouts[t.index()].stride_seq),
            AbiRole::StrideHead(t) => KernelArg::U64(layouts[t.index()].stride_head),
            AbiRole::RowOutputPtr(_) | AbiRole::Scalar(_) => {
                return Err(CliError::input(
                    "error: unexpected parameter in a linear kernel",
                ))
            }
        });
    }
    let out = bufs
        .pop()
        .ok_or_else(|| CliError::input("error: no output buffer"))?;
    Ok(Launch {
        dims: LaunchDims {
            grid,
            block: (k.ptx.threads, 1, 1),
            dynamic_smem_bytes: k.ptx.dynamic_smem_bytes,
        },
        args,
        out,
        _keep: bufs,
        _keep_f32: arrays,
        flags: flags.map(std::cell::RefCell::new),
    })
}

pub(crate) type Inputs =
    HashMap<einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>, TensorData>;

/// A linear-attention launch ready to run on GPU 0: its kernels (the chunked strategy's
/// state kernel first) and their shared arguments.
struct LoadedLinear<'k> {
    gpu: Gpu,
    device: String,
    kernel: einattn_runtime::Kernel,
    pre: Option<(einattn_runtime::Kernel, &'k einattn_backends::PtxKernel)>,
    launch: Launch,
}

impl<'k> LoadedLinear<'k> {
    fn new(
        k: &'k einattn_backends::compile::CompiledLinear,
        inputs: &Inputs,
    ) -> Result<Self, CliError> {
        Self::new_at(0, k, inputs)
    }

    fn new_at(
        ordinal: usize,
        k: &'k einattn_backends::compile::CompiledLinear,
        inputs: &Inputs,
    ) -> Result<Self, CliError> {
        let (gpu, device) = open_gpu_at(ordinal)?;
        let kernel = gpu.load_ptx(&k.ptx.text, &k.ptx.entry).map_err(gpu_error)?;
        let pre = match &k.pre {
            Some((_, p)) => Some((gpu.load_ptx(&p.text, &p.entry).map_err(gpu_error)?, p)),
            None => None,
        };
        let launch = prepare_linear(&gpu, k, inputs)?;
        Ok(LoadedLinear {
            gpu,
            device,
            kernel,
            pre,
            launch,
        })
    }

    fn run(&self) -> Result<(), RuntimeError> {
        if let Some(flags) = &self.launch.flags {
            self.gpu.zero(&mut flags.borrow_mut())?;
        }
        if let Some((pk, p)) = &self.pre {
            let dims = LaunchDims {
                dynamic_smem_bytes: p.dynamic_smem_bytes,
                ..self.launch.dims
            };
            self.gpu.launch(pk, dims, &self.launch.args)?;
        }
        self.gpu
            .launch(&self.kernel, self.launch.dims, &self.launch.args)
    }
}

/// `einattn check` for linear attention.
pub fn check_linear(
    cascade: &Cascade,
    k: &einattn_backends::compile::CompiledLinear,
    seed: u64,
) -> Result<(String, bool), CliError> {
    let m = &k.matched;
    let inputs = rounded_inputs(
        cascade,
        [&k.matched.q, &k.matched.k, &k.matched.v],
        k.matched.spec.elem,
        seed,
    );
    let loaded = LoadedLinear::new(k, &inputs)?;
    let (gpu, device, kernel, launch) =
        (&loaded.gpu, &loaded.device, &loaded.kernel, &loaded.launch);
    loaded.run().map_err(gpu_error)?;
    let got = download_values(gpu, &launch.out, m.spec.elem)?;
    let small = m.batch * m.heads * m.n * m.n * m.spec.head_dim as u64 <= INTERPRETER_MAC_LIMIT;
    let formula = || m.reference_output(&inputs);
    let (want, reference_name) = f64_reference(
        cascade,
        &inputs,
        m.o.tensor,
        small,
        Some((
            "the f64 recurrence (size above the interpreter's limit)",
            &formula,
        )),
    )?
    .ok_or_else(|| CliError::input("error: no reference for this check"))?;
    let problem = format!(
        "B={} H={} N={} d={} e={} {} decay {:?}; seed {seed}; reference: {reference_name}",
        m.batch,
        m.heads,
        m.n,
        m.spec.head_dim,
        m.spec.value_dim,
        m.spec.elem.name(),
        m.spec.decay
    );
    let resources = kernel.resources().map_err(gpu_error)?;
    let (s, pass) = check_report(
        device,
        &k.ptx,
        resources,
        &problem,
        relative_error(&got, &want),
    );
    Ok((s, pass))
}

/// HBM bandwidth of known parts, bytes/s.
fn memory_bandwidth(device: &str) -> Option<f64> {
    if device.contains("H200") {
        Some(4.8e12)
    } else if device.contains("H100") {
        Some(3.35e12)
    } else {
        None
    }
}

/// `einattn bench` for linear attention: tokens per second and the fraction of the
/// memory floor (Q, K, V read and O written once).
pub fn bench_linear(
    cascade: &Cascade,
    k: &einattn_backends::compile::CompiledLinear,
    reps: usize,
    format: ReportFormat,
) -> Result<String, CliError> {
    let m = &k.matched;
    let inputs = rounded_inputs(
        cascade,
        [&k.matched.q, &k.matched.k, &k.matched.v],
        k.matched.spec.elem,
        0,
    );
    let loaded = LoadedLinear::new(k, &inputs)?;
    let (gpu, device, kernel) = (&loaded.gpu, &loaded.device, &loaded.kernel);
    let t = gpu
        .time(reps.div_ceil(4).max(3), reps, || loaded.run())
        .map_err(gpu_error)?;
    let tokens = (m.batch * m.n) as f64;
    let mtok = tokens / (t.median_ms * 1e-3) / 1e6;
    let eb = m.spec.elem.bytes() as f64;
    let bytes = tokens
        * m.heads as f64
        * (2.0 * m.spec.head_dim as f64 + 2.0 * m.spec.value_dim as f64)
        * eb;
    let floor_mtok = memory_bandwidth(device).map(|bw| tokens / (bytes / bw) / 1e6);
    let resources = kernel.resources().map_err(gpu_error)?;
    let value = json!({
        "device": device,
        "kernel": k.ptx.entry,
        "cascade": cascade.name,
        "problem": {"batch": m.batch, "heads": m.heads, "n": m.n, "head_dim": m.spec.head_dim,
                    "value_dim": m.spec.value_dim, "elem": m.spec.elem.name(),
                    "decay": format!("{:?}", m.spec.decay)},
        "schedule": {"value_block": k.schedule.value_block, "warps": k.schedule.warps, "stages": k.schedule.stages,
                     "mma": k.schedule.mma.name(), "strategy": format!("{:?}", k.schedule.strategy),
                     "target": k.target.name()},
        "registers": resources.registers,
        "local_bytes": resources.local_bytes,
        "median_ms": t.median_ms,
        "min_ms": t.min_ms,
        "max_ms": t.max_ms,
        "reps": t.reps,
        "mtok_per_s": mtok,
        "ns_per_token": t.median_ms * 1e6 / tokens,
        "memory_floor_mtok_per_s": floor_mtok,
        "percent_of_memory_floor": floor_mtok.map(|f| 100.0 * mtok / f),
    });
    let mut rate = format!("{mtok:.1} Mtok/s");
    if let Some(f) = floor_mtok {
        let _ = write!(
            rate,
            " = {:.1}% of the {f:.0} Mtok/s memory floor",
            100.0 * mtok / f
        );
    }
    bench_report(
        format,
        &value,
        device,
        &k.ptx.entry,
        resources.registers,
        &timing_line(&t),
        &rate,
    )
}

/// `einattn check FILE --sp P` and `einattn run-plan DIR`: runs `plan` on the GPUs (one
/// process driving all of them, or one process per GPU under a launcher) through the plan
/// executor, times it, runs the single-GPU kernel on the whole problem, and compares.
pub fn check_sp(
    cascade: &Cascade,
    kernel: &crate::cli::Kernel,
    plan: &einattn_backends::plan::Plan,
    seed: u64,
) -> Result<(String, bool), CliError> {
    use crate::cli::Kernel;
    use crate::plan_gpu::{check_lowerable, Lowering, PlanExec};
    let lowering = match kernel {
        Kernel::Linear(k) => Lowering::Linear(k),
        Kernel::Attention(k) => Lowering::Attention(k),
    };
    check_lowerable(plan, &lowering)?;
    let devices = plan.world_size as usize;
    let ranks = Ranks::open(devices)?;
    // Every process draws the same inputs: rank 0's seed.
    let seed = ranks.shared_seed(seed)?;
    let (qkv, elem, o) = match kernel {
        Kernel::Linear(k) => (
            [&k.matched.q, &k.matched.k, &k.matched.v],
            k.matched.spec.elem,
            k.matched.o.tensor,
        ),
        Kernel::Attention(k) => {
            let m = &k.schedule.matched;
            ([&m.q, &m.k, &m.v], m.spec.elem, m.o.tensor)
        }
    };
    let inputs = rounded_inputs(cascade, qkv, elem, seed);
    let device = ranks.first().name().map_err(gpu_error)?;
    let mut exec = PlanExec::new(plan, &ranks, lowering, cascade, &inputs)?;
    exec.run()?;
    let plan_ms = ranks.time(&mut || exec.run())?;
    let single = match kernel {
        Kernel::Linear(k) => {
            let loaded = LoadedLinear::new_at(ranks.ordinal, k, &inputs)?;
            loaded.run().map_err(gpu_error)?;
            single_gpu_result(&loaded.gpu, &loaded.launch.out, elem, &mut || {
                loaded.run().map_err(gpu_error)
            })?
        }
        Kernel::Attention(k) => {
            let (gpu, _) = open_gpu_at(ranks.ordinal)?;
            let kernel = gpu.load_ptx(&k.ptx.text, &k.ptx.entry).map_err(gpu_error)?;
            let launch = prepare(&gpu, k, &inputs)?;
            let mut run = || {
                gpu.launch(&kernel, launch.dims, &launch.args)
                    .map_err(gpu_error)
            };
            run()?;
            single_gpu_result(&gpu, &launch.out, elem, &mut run)?
        }
    };
    // The f64 reference where the problem is small enough to compute one on the host.
    let reference = match kernel {
        Kernel::Linear(k) => {
            let m = &k.matched;
            let (d, e) = (m.spec.head_dim as u64, m.spec.value_dim as u64);
            let formula = || m.reference_output(&inputs);
            f64_reference(
                cascade,
                &inputs,
                o,
                m.batch * m.heads * m.n * m.n * d <= INTERPRETER_MAC_LIMIT,
                (m.batch * m.heads * m.n * d * e <= 64 * INTERPRETER_MAC_LIMIT)
                    .then_some(("the f64 recurrence", &formula as &dyn Fn() -> Vec<f64>)),
            )?
        }
        Kernel::Attention(k) => {
            let m = &k.schedule.matched;
            let macs = m.batch * m.heads * m.n_q * m.n_k * m.spec.head_dim as u64 * 2;
            let formula = || m.reference_output(&inputs);
            f64_reference(
                cascade,
                &inputs,
                o,
                macs <= INTERPRETER_MAC_LIMIT,
                (macs <= 64 * INTERPRETER_MAC_LIMIT).then_some((
                    "the f64 attention formula",
                    &formula as &dyn Fn() -> Vec<f64>,
                )),
            )?
        }
    };
    let out_name = cascade.tensors[o].name.clone();
    let compare = |want: &[f64]| exec.compare(&out_name, want);
    let rate: Box<dyn Fn(f64) -> String> = match kernel {
        Kernel::Linear(k) => {
            let tokens = (k.matched.batch * k.matched.n) as f64;
            Box::new(move |ms: f64| format!("{:.1} Mtok/s", tokens / (ms * 1e-3) / 1e6))
        }
        Kernel::Attention(k) => {
            let flops = attention_flops(&k.schedule.matched);
            Box::new(move |ms: f64| format!("{:.1} TFLOP/s", flops / (ms * 1e-3) / 1e12))
        }
    };
    let mut steps: std::collections::BTreeMap<String, usize> = Default::default();
    if let Some(r0) = plan.ranks.first() {
        for st in &r0.steps {
            let key = match st {
                einattn_backends::plan::Step::Kernel(k) => k.kernel.clone(),
                other => other.op_name().to_string(),
            };
            *steps.entry(key).or_default() += 1;
        }
    }
    let summary = SpRun {
        scheme: plan.scheme.clone(),
        devices,
        device,
        launcher: ranks.launcher(),
        plan_ms,
        predicted_ms: Some(plan.predicted_ms),
        rate,
        what: format!(
            "rank 0 runs {}",
            steps
                .iter()
                .map(|(k, n)| format!("{n} x {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    summary.report(&ranks, &compare, single, reference)
}

/// `einattn bench FILE --sp P`: times `plan` on the GPUs (median of `reps`) without a
/// reference, so sizes past one GPU's or one host's memory run: every rank draws its own
/// slices of the sequence inputs and only the parameters come from the host. Prints the
/// cost model's prediction next to the measurement.
pub fn bench_sp(
    cascade: &Cascade,
    kernel: &crate::cli::Kernel,
    plan: &einattn_backends::plan::Plan,
    reps: usize,
    format: ReportFormat,
) -> Result<String, CliError> {
    use crate::cli::Kernel;
    use crate::plan_gpu::{Lowering, PlanExec};
    let lowering = match kernel {
        Kernel::Linear(k) => Lowering::Linear(k),
        Kernel::Attention(k) => Lowering::Attention(k),
    };
    crate::plan_gpu::check_lowerable(plan, &lowering)?;
    let ranks = Ranks::open(plan.world_size as usize)?;
    let params = einattn_ir::interp::random_inputs_of(cascade, 0, |t| {
        t.kind == einattn_ir::cascade::TensorKind::Param
    });
    let device = ranks.first().name().map_err(gpu_error)?;
    let mut exec = PlanExec::new(plan, &ranks, lowering, cascade, &params)?;
    exec.run()?;
    let ms = time_plan_reps(&ranks, &mut || exec.run(), reps)?;
    let (rate, unit) = match kernel {
        Kernel::Linear(k) => (
            (k.matched.batch * k.matched.n) as f64 / (ms * 1e-3) / 1e6,
            "Mtok/s",
        ),
        Kernel::Attention(k) => (
            attention_flops(&k.schedule.matched) / (ms * 1e-3) / 1e12,
            "TFLOP/s",
        ),
    };
    if !ranks.leader() {
        return Ok(String::new());
    }
    let value = json!({
        "device": device, "devices": plan.world_size, "launcher": ranks.launcher(),
        "cascade": cascade.name, "scheme": plan.scheme, "tokens": plan.sequence.tokens,
        "median_ms": ms, "reps": reps, "rate": rate, "rate_unit": unit,
        "predicted_ms": plan.predicted_ms, "measured_over_predicted": ms / plan.predicted_ms,
    });
    Ok(match format {
        ReportFormat::Json => {
            serde_json::to_string_pretty(&value)
                .map_err(|e| CliError::input(format!("error: {e}")))?
                + "\n"
        }
        ReportFormat::Text => format!(
            "devices: {} x {device} ({})\nplan: {} over {} tokens\nmedian {ms:.4} ms over {reps} runs ({rate:.1} {unit})\ncost model: predicted {:.4} ms; measured / predicted = {:.3}\n",
            plan.world_size,
            ranks.launcher(),
            plan.scheme,
            plan.sequence.tokens,
            plan.predicted_ms,
            ms / plan.predicted_ms
        ),
    })
}

/// FLOPs of the attention the masks leave (4 per visible score and head dim).
fn attention_flops(m: &einattn_backends::schedule::AttentionMatch) -> f64 {
    let n = m.n_k as i64;
    let visible: f64 = (0..m.n_q as i64)
        .map(|p| {
            let (mut lo, mut hi) = (0i64, n - 1);
            for b in m.spec.masks() {
                match b.direction {
                    einattn_backends::tile::BandDirection::KeyMinusQuery => {
                        hi = hi.min(p + b.bound)
                    }
                    einattn_backends::tile::BandDirection::QueryMinusKey => {
                        lo = lo.max(p - b.bound)
                    }
                }
            }
            (hi - lo + 1).max(0) as f64
        })
        .sum();
    4.0 * (m.batch * m.heads) as f64 * visible * m.spec.head_dim as f64
}

/// The single-GPU kernel on the whole problem: its output (the reference of large SP
/// checks) and its median time measured like the plan's.
fn single_gpu_result(
    gpu: &Gpu,
    out: &DeviceBuffer<u16>,
    elem: Elem,
    run: &mut dyn FnMut() -> Result<(), CliError>,
) -> Result<(Vec<f64>, f64), CliError> {
    let got = download_values(gpu, out, elem)?;
    let ms = time_plan(&[gpu], run, 20)?;
    Ok((got, ms))
}

/// The error parts (see [`error_parts`]) of this process's outputs against a reference.
type ErrorParts<'a> = dyn Fn(&[f64]) -> Result<[f64; 2], CliError> + 'a;

/// What an SP check measured, printed the same way for every scheme.
struct SpRun<F: Fn(f64) -> String> {
    scheme: String,
    devices: usize,
    device: String,
    launcher: &'static str,
    plan_ms: f64,
    predicted_ms: Option<f64>,
    rate: F,
    what: String,
}

impl<F: Fn(f64) -> String> SpRun<F> {
    /// The report (printed by rank 0 only) and whether it passes: against the f64
    /// `reference` when the problem is small enough to compute one, else against the
    /// single-GPU kernel's output (whose own checks against f64 run at the sizes the
    /// reference reaches). `compare` gives the error parts of this process's rows.
    fn report(
        &self,
        ranks: &Ranks,
        compare: &ErrorParts,
        (single, single_ms): (Vec<f64>, f64),
        reference: Option<(Vec<f64>, String)>,
    ) -> Result<(String, bool), CliError> {
        let mut parts = compare(&single)?.to_vec();
        if let Some((want, _)) = &reference {
            parts.extend(compare(want)?);
        }
        let parts = ranks.sum(&parts)?;
        let rel = |num: f64, den: f64| (num / den).sqrt();
        let vs_single = rel(parts[0], parts[1]);
        let (err, name) = match &reference {
            Some((_, name)) => (rel(parts[2], parts[3]), name.as_str()),
            None => (vs_single, "the single-GPU kernel on the whole problem"),
        };
        let pass = err < 2e-2;
        if !ranks.leader() {
            return Ok((String::new(), pass));
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "devices: {} x {} ({})",
            self.devices, self.device, self.launcher
        );
        let _ = writeln!(s, "plan: {} ({})", self.scheme, self.what);
        let _ = writeln!(
            s,
            "plan time: median {:.4} ms over 20 runs ({})",
            self.plan_ms,
            (self.rate)(self.plan_ms)
        );
        let _ = writeln!(
            s,
            "one GPU, whole problem: median {single_ms:.4} ms ({}); speed-up {:.3}x",
            (self.rate)(single_ms),
            single_ms / self.plan_ms
        );
        if let Some(p) = self.predicted_ms {
            let _ = writeln!(
                s,
                "cost model: predicted {p:.4} ms; measured / predicted = {:.3}",
                self.plan_ms / p
            );
        }
        if reference.is_some() {
            let _ = writeln!(s, "||out - single GPU|| / ||single GPU|| = {vs_single:.3e}");
        }
        let _ = writeln!(
            s,
            "{}: ||out - ref|| / ||ref|| = {err:.3e} against {name} (tolerance 2e-2)",
            if pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(
            s,
            "json: {}",
            json!({"scheme": self.scheme, "devices": self.devices, "device": self.device,
                   "launcher": self.launcher, "plan_ms": self.plan_ms, "single_gpu_ms": single_ms,
                   "speedup": single_ms / self.plan_ms, "predicted_ms": self.predicted_ms,
                   "relative_error": err, "reference": name, "pass": pass})
        );
        Ok((s, pass))
    }
}

/// The GPUs this process drives in an SP run and how they talk: every GPU of the host from
/// one thread (`ncclCommInitAll`), or one GPU per process when a launcher set `WORLD_SIZE`
/// (`RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; rank 0 hands out the NCCL id).
pub(crate) struct Ranks {
    /// (rank, GPU) for each rank this process drives.
    gpus: Vec<(usize, Gpu)>,
    comm: Comm,
    /// The device ordinal of this process's first GPU (for the single-GPU reference).
    ordinal: usize,
}

enum Comm {
    Group(einattn_runtime::nccl::NcclGroup),
    Process(einattn_runtime::nccl::NcclRank),
}

impl Ranks {
    pub(crate) fn open(devices: usize) -> Result<Ranks, CliError> {
        use einattn_runtime::launch::LaunchEnv;
        use einattn_runtime::nccl::{NcclGroup, NcclRank};
        match LaunchEnv::from_env().map_err(|e| CliError::usage(format!("error: {e}")))? {
            Some(env) => {
                if env.world_size != devices {
                    return Err(CliError::usage(format!(
                        "error: `--sp {devices}` under a launcher with WORLD_SIZE={}",
                        env.world_size
                    )));
                }
                let gpu = Gpu::open(env.local_rank).map_err(gpu_error)?;
                let comm = NcclRank::new(&gpu, &env).map_err(gpu_error)?;
                Ok(Ranks {
                    gpus: vec![(env.rank, gpu)],
                    comm: Comm::Process(comm),
                    ordinal: env.local_rank,
                })
            }
            None => {
                let mut gpus = Vec::new();
                for r in 0..devices {
                    gpus.push((r, Gpu::open(r).map_err(gpu_error)?));
                }
                let group = NcclGroup::new(&gpus.iter().map(|(_, g)| g).collect::<Vec<_>>())
                    .map_err(gpu_error)?;
                Ok(Ranks {
                    gpus,
                    comm: Comm::Group(group),
                    ordinal: 0,
                })
            }
        }
    }

    /// (rank, GPU) of each rank this process drives.
    pub(crate) fn gpus(&self) -> impl Iterator<Item = (usize, &Gpu)> {
        self.gpus.iter().map(|(r, g)| (*r, g))
    }

    /// The GPU of the `i`-th rank this process drives.
    pub(crate) fn gpu_of(&self, i: usize) -> &Gpu {
        &self.gpus[i].1
    }

    /// Ranks of the whole job (all of them, across processes).
    pub(crate) fn world_size(&self) -> usize {
        match &self.comm {
            Comm::Group(g) => g.size(),
            Comm::Process(c) => c.world_size(),
        }
    }

    /// All-gather over element ranges, one part per driven rank (in driven order).
    pub(crate) fn all_gather_regions<T: einattn_runtime::Element>(
        &self,
        mut parts: Vec<einattn_runtime::nccl::GatherPart<'_, T>>,
        count: usize,
    ) -> Result<(), CliError> {
        match &self.comm {
            Comm::Group(g) => g.all_gather_regions(parts, count),
            Comm::Process(c) => match parts.pop() {
                Some(part) if parts.is_empty() => c.all_gather_region(part, count),
                _ => Err(RuntimeError::InvalidArgument(
                    "one all-gather part per process".into(),
                )),
            },
        }
        .map_err(gpu_error)
    }

    /// Sends and receives of driven ranks (`(driven index, part)`), as one NCCL group.
    pub(crate) fn send_recv<T: einattn_runtime::Element>(
        &self,
        parts: Vec<(usize, einattn_runtime::nccl::P2pPart<'_, T>)>,
    ) -> Result<(), CliError> {
        match &self.comm {
            Comm::Group(g) => g.send_recv(
                parts
                    .into_iter()
                    .map(|(i, part)| (self.gpus[i].0, part))
                    .collect(),
            ),
            Comm::Process(c) => {
                let mut parts = parts;
                match parts.pop() {
                    Some((_, part)) if parts.is_empty() => c.send_recv(part),
                    _ => Err(RuntimeError::InvalidArgument(
                        "one point-to-point part per process".into(),
                    )),
                }
            }
        }
        .map_err(gpu_error)
    }

    /// The GPU of this process that runs the single-GPU reference.
    fn first(&self) -> &Gpu {
        &self.gpus[0].1
    }

    /// Whether this process prints the report (rank 0, or the only process).
    fn leader(&self) -> bool {
        self.gpus[0].0 == 0
    }

    fn launcher(&self) -> &'static str {
        match self.comm {
            Comm::Group(_) => "one process driving every GPU",
            Comm::Process(_) => "one process per GPU (launcher)",
        }
    }

    /// Rank 0's `seed` on every process.
    fn shared_seed(&self, seed: u64) -> Result<u64, CliError> {
        let mine = if self.leader() { seed } else { 0 };
        // Two 32-bit halves: exact in f64 sums.
        let sum = self.sum(&[(mine >> 32) as f64, (mine & 0xffff_ffff) as f64])?;
        Ok(((sum[0] as u64) << 32) | sum[1] as u64)
    }

    /// Sums over every process (per-rank error norms); the identity in one process.
    fn sum(&self, values: &[f64]) -> Result<Vec<f64>, CliError> {
        match &self.comm {
            Comm::Group(_) => Ok(values.to_vec()),
            Comm::Process(c) => c
                .all_reduce_sum_f64_host(self.first(), values)
                .map_err(gpu_error),
        }
    }

    fn time(&self, run: &mut dyn FnMut() -> Result<(), CliError>) -> Result<f64, CliError> {
        time_plan_reps(self, run, 20)
    }
}

/// Squared error and squared reference summed over `pairs` of (got, want): the parts of a
/// relative error that processes add up. A NaN anywhere makes the error NaN.
pub(crate) fn error_parts(pairs: impl Iterator<Item = (f64, f64)>) -> [f64; 2] {
    pairs.fold([0.0, 0.0], |[num, den], (g, w)| {
        [num + (g - w) * (g - w), den + w * w]
    })
}

fn time_plan_reps(
    ranks: &Ranks,
    run: &mut dyn FnMut() -> Result<(), CliError>,
    reps: usize,
) -> Result<f64, CliError> {
    let gpus: Vec<&Gpu> = ranks.gpus.iter().map(|(_, g)| g).collect();
    time_plan(&gpus, run, reps)
}

/// Median wall time of a multi-GPU plan over `reps` runs: every GPU synchronized before and
/// after each run.
fn time_plan(
    gpus: &[&Gpu],
    run: &mut dyn FnMut() -> Result<(), CliError>,
    reps: usize,
) -> Result<f64, CliError> {
    let sync = || -> Result<(), CliError> {
        for g in gpus {
            g.synchronize().map_err(gpu_error)?;
        }
        Ok(())
    };
    for _ in 0..3 {
        run()?;
    }
    let mut ms = Vec::new();
    for _ in 0..reps.max(1) {
        sync()?;
        let t0 = std::time::Instant::now();
        run()?;
        sync()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}
