//! An application using einattn kernels the way a Rust user would: `build.rs` compiles the
//! `.ein` sources with einattn-build, this file includes the generated launchers and runs
//! them on GPU 0 with random inputs, then checks each output against the CPU reference
//! interpreter (bf16 relative error under 2e-2). Prints PASS or FAIL per kernel and exits 1
//! on a mismatch; on a machine without a GPU it says so and exits 0.

// The generated module must compile cleanly in a strict crate.
#![deny(warnings)]

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/einattn_kernels.rs"));
}

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::{Cascade, Handle, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

/// The relative error a bf16 kernel must stay under.
const TOLERANCE: f64 = 2e-2;
/// Seed of the random inputs (any seed must pass).
const SEED: u64 = 17;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// One kernel's inputs as the reference sees them: drawn by the interpreter, the bf16 ones
/// rounded to bf16 so the GPU and the reference read the same numbers.
struct Problem {
    cascade: Cascade,
    inputs: HashMap<Handle<Tensor>, TensorData>,
}

impl Problem {
    fn new(file: &str, source: &str, defines: &[(&str, u64)]) -> Result<Problem> {
        let defines: Vec<(String, u64)> =
            defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        let cascade = einattn_dsl::compile_source(file, source, &defines)
            .map_err(|d| d.render(file, source))?;
        let inputs = random_inputs(&cascade, SEED);
        let mut problem = Problem { cascade, inputs };
        for name in ["Q", "K", "V"] {
            for x in &mut problem.data_mut(name)?.values {
                *x = bf16::from_f64(*x).to_f64();
            }
        }
        Ok(problem)
    }

    fn handle(&self, name: &str) -> Result<Handle<Tensor>> {
        self.cascade
            .tensor_by_name(name)
            .ok_or_else(|| format!("the cascade has no tensor `{name}`").into())
    }

    fn data_mut(&mut self, name: &str) -> Result<&mut TensorData> {
        let h = self.handle(name)?;
        self.inputs
            .get_mut(&h)
            .ok_or_else(|| format!("no input values for `{name}`").into())
    }

    fn values(&self, name: &str) -> Result<&[f64]> {
        let h = self.handle(name)?;
        self.inputs
            .get(&h)
            .map(|d| d.values.as_slice())
            .ok_or_else(|| format!("no input values for `{name}`").into())
    }

    fn upload_bf16(&self, stream: &Arc<CudaStream>, name: &str) -> Result<CudaSlice<bf16>> {
        let host: Vec<bf16> = self
            .values(name)?
            .iter()
            .map(|&x| bf16::from_f64(x))
            .collect();
        Ok(stream.clone_htod(&host)?)
    }

    fn upload_f32(&self, stream: &Arc<CudaStream>, name: &str) -> Result<CudaSlice<f32>> {
        let host: Vec<f32> = self.values(name)?.iter().map(|&x| x as f32).collect();
        Ok(stream.clone_htod(&host)?)
    }

    /// The reference interpreter's output `name` (f64), in storage order.
    fn reference(&self, name: &str) -> Result<Vec<f64>> {
        let order = einattn_ir::validate::topological_order(&self.cascade);
        let values = evaluate_in_order(&self.cascade, &self.inputs, &order)
            .map_err(|e| format!("the interpreter failed: {e}"))?;
        let data = values
            .get(self.handle(name)?)
            .ok_or("the interpreter produced no output")?;
        Ok(data.stored().into_owned())
    }
}

/// ‖gpu − reference‖ / ‖reference‖ (NaN anywhere gives NaN, which fails).
fn relative_error(gpu: &[bf16], reference: &[f64]) -> f64 {
    if gpu.len() != reference.len() {
        return f64::NAN;
    }
    let (mut diff, mut norm) = (0.0, 0.0);
    for (g, r) in gpu.iter().zip(reference) {
        let d = g.to_f64() - r;
        diff += d * d;
        norm += r * r;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Causal softmax attention.
fn attention_causal(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<f64> {
    use kernels::AttentionCausal as K;
    let problem = Problem::new(
        K::SOURCE,
        include_str!("../../attention_causal.ein"),
        K::DEFINES,
    )?;
    let kernel = K::load(ctx)?;
    let q = problem.upload_bf16(stream, "Q")?;
    let k = problem.upload_bf16(stream, "K")?;
    let v = problem.upload_bf16(stream, "V")?;
    let mut o = stream.alloc_zeros::<bf16>(K::O_LEN)?;
    kernel.launch(stream, &q, &k, &v, &mut o, &Default::default())?;
    let gpu = stream.clone_dtoh(&o)?;
    Ok(relative_error(&gpu, &problem.reference("O")?))
}

/// Lightning attention, chunked: two kernels sharing a scratch array of chunk states. Runs
/// twice with one scratch to show the reuse.
fn lightning_chunked(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<f64> {
    use kernels::LightningChunked as K;
    let problem = Problem::new(K::SOURCE, include_str!("../../lightning.ein"), K::DEFINES)?;
    let kernel = K::load(ctx)?;
    let q = problem.upload_bf16(stream, "Q")?;
    let k = problem.upload_bf16(stream, "K")?;
    let v = problem.upload_bf16(stream, "V")?;
    let s = problem.upload_f32(stream, "s")?;
    let mut o = stream.alloc_zeros::<bf16>(K::O_LEN)?;
    let mut scratch = kernel.scratch(stream)?;
    for _ in 0..2 {
        kernel.launch_with_scratch(
            stream,
            &mut scratch,
            &q,
            &k,
            &v,
            &s,
            &mut o,
            &Default::default(),
        )?;
    }
    let gpu = stream.clone_dtoh(&o)?;
    Ok(relative_error(&gpu, &problem.reference("O")?))
}

/// Lightning attention in one kernel with a decoupled look-back. Launched twice: the
/// look-back flags must be zeroed before each launch or the second reads stale flags.
fn lightning_lookback(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<f64> {
    use kernels::LightningLookback as K;
    let problem = Problem::new(K::SOURCE, include_str!("../../lightning.ein"), K::DEFINES)?;
    let kernel = K::load(ctx)?;
    let q = problem.upload_bf16(stream, "Q")?;
    let k = problem.upload_bf16(stream, "K")?;
    let v = problem.upload_bf16(stream, "V")?;
    let s = problem.upload_f32(stream, "s")?;
    let mut o = stream.alloc_zeros::<bf16>(K::O_LEN)?;
    let mut scratch = kernel.scratch(stream)?;
    for _ in 0..2 {
        kernel.launch_with_scratch(
            stream,
            &mut scratch,
            &q,
            &k,
            &v,
            &s,
            &mut o,
            &Default::default(),
        )?;
    }
    let gpu = stream.clone_dtoh(&o)?;
    Ok(relative_error(&gpu, &problem.reference("O")?))
}

/// A slice of the wrong length is refused before anything is launched.
fn refuses_a_short_slice(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<f64> {
    use kernels::AttentionCausal as K;
    let kernel = K::load(ctx)?;
    let short = stream.alloc_zeros::<bf16>(K::Q_LEN - 1)?;
    let full = stream.alloc_zeros::<bf16>(K::Q_LEN)?;
    let mut o = stream.alloc_zeros::<bf16>(K::O_LEN)?;
    match kernel.launch(stream, &short, &full, &full, &mut o, &Default::default()) {
        Err(kernels::KernelError::Length { tensor: "q", .. }) => Ok(0.0),
        Err(other) => Err(format!("expected a length error for `q`, got: {other}").into()),
        Ok(()) => Err("a short `q` was launched".into()),
    }
}

type Check = fn(&Arc<CudaContext>, &Arc<CudaStream>) -> Result<f64>;

fn main() -> ExitCode {
    // cudarc's loader panics when the driver library is missing: ask first.
    // SAFETY: only tries to open the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!(
            "no GPU: the CUDA driver library (libcuda.so) was not found; nothing to run \
             (set LD_LIBRARY_PATH to its folder on a machine with a GPU)"
        );
        return ExitCode::SUCCESS;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            println!("no GPU: the CUDA driver sees no device; nothing to run");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            println!("no GPU: the CUDA driver did not start ({e}); nothing to run");
            return ExitCode::SUCCESS;
        }
    }
    let (ctx, stream) = match CudaContext::new(0) {
        Ok(ctx) => {
            let stream = ctx.default_stream();
            (ctx, stream)
        }
        Err(e) => {
            eprintln!("FAIL: cannot open GPU 0: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checks: [(&str, Check); 4] = [
        ("attention_causal (D=128, N=256)", attention_causal),
        ("lightning chunked (2 kernels)", lightning_chunked),
        ("lightning lookback", lightning_lookback),
        ("a short slice is refused", refuses_a_short_slice),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        match check(&ctx, &stream) {
            Ok(error) if error < TOLERANCE => {
                println!("PASS {name}: relative error {error:.2e}")
            }
            Ok(error) => {
                failed += 1;
                println!("FAIL {name}: relative error {error:.2e} (limit {TOLERANCE:.0e})");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    if failed > 0 {
        println!("{failed} of {} checks failed", checks.len());
        return ExitCode::FAILURE;
    }
    println!("all {} checks passed", checks.len());
    ExitCode::SUCCESS
}
