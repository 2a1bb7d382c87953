//! The `einattn` commands: each reads its files, calls the compiler (`einattn_backends`) or
//! the runner (`einattn_exec`), and returns the text to print or an error with its exit
//! code. `main.rs` only parses arguments.

use einattn_backends::abi::KernelSet;
use einattn_backends::family::{self, CompileError, Compiled, KernelOptions, Request};
use einattn_backends::plan::folder::BuildRecord;
use einattn_backends::plan::lower::{lower, LoweredPlan};
use einattn_backends::plan::Plan;
use einattn_backends::Target;
use einattn_exec::given::Given;
use einattn_exec::ranks::{RankMapping, RankMode};
use einattn_exec::{ExecError, ReportFormat};
use einattn_ir::interp;
use einattn_ir::{Cascade, TensorKind};
use einattn_passes::analysis::GpuModel;
use std::fmt;
use std::path::{Path, PathBuf};

/// A failed command: what to print and the process exit code (1: bad input, 2: bad usage,
/// 3: no GPU).
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub exit_code: i32,
}

impl CliError {
    /// The input (a `.ein` file, an `.npy`, a plan) is wrong.
    pub fn input(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            exit_code: 1,
        }
    }

    /// The command line is wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            exit_code: 2,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ExecError> for CliError {
    fn from(e: ExecError) -> Self {
        CliError {
            message: e.to_string(),
            exit_code: e.exit_code(),
        }
    }
}

/// Parses `NAME=VALUE` for `-D` and `--tile`.
pub fn parse_define(text: &str) -> Result<(String, u64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got `{text}`"))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("`{name}` is not a size name"));
    }
    let value: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a non-negative integer (in `{text}`)"))?;
    Ok((name.to_string(), value))
}

/// A `.ein` file read from disk.
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = einattn_dsl::read_source(path).map_err(CliError::input)?;
        Ok(SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Parses, lowers and validates; diagnostics come back rendered, and warnings (a `-D`
    /// the program does not use, a term summed over a rank it lacks) go to stderr.
    pub fn compile(&self, defines: &[(String, u64)]) -> Result<Cascade, CliError> {
        let (cascade, warnings) =
            einattn_dsl::compile_source_with_warnings(&self.name(), &self.text, defines)
                .map_err(|d| CliError::input(d.render(&self.name(), &self.text)))?;
        if !warnings.is_empty() {
            eprint!("{}", warnings.render(&self.name(), &self.text));
        }
        Ok(cascade)
    }

    fn render(&self, diagnostics: Vec<einattn_ir::validate::Diagnostic>) -> String {
        einattn_dsl::Diagnostics::new(diagnostics).render(&self.name(), &self.text)
    }

    /// A compile error as the user reads it: located diagnostics against this file, each
    /// family's reason when none read the cascade.
    fn compile_error(&self, e: CompileError) -> CliError {
        let usage = e.is_usage();
        let text = e.render(&self.name(), |ds| self.render(ds));
        if usage {
            CliError::usage(text)
        } else {
            CliError::input(text)
        }
    }
}

/// Sequence-parallel options from the command line: `--sp P [--seq Q,K] [--scheme NAME]`.
#[derive(Clone, Debug, Default)]
pub struct SpArgs {
    pub devices: Option<u64>,
    pub sequence: Option<(String, String)>,
    pub scheme: Option<String>,
    /// Run every rank on GPU 0 (collectives as device copies).
    pub one_gpu: bool,
    /// Run every rank's transfers on a second stream, ordered by the plan's events.
    pub overlap: bool,
}

impl SpArgs {
    fn mapping(&self) -> RankMode {
        RankMode {
            mapping: if self.one_gpu {
                RankMapping::OneGpuForAll
            } else {
                RankMapping::OneGpuEach
            },
            overlap: self.overlap,
        }
    }
}

impl SpArgs {
    fn options(&self) -> Option<einattn_passes::sp::SpOptions> {
        let mut options = einattn_passes::sp::SpOptions::new(self.devices?);
        options.sequence = self.sequence.clone();
        options.scheme = self.scheme.clone();
        Some(options)
    }
}

/// Kernel options from the command line; an absent `target` is the device's for `check`
/// and `bench` on one GPU, else `sm_80`.
#[derive(Clone, Debug, Default)]
pub struct KernelArgs {
    pub target: Option<Target>,
    pub options: KernelOptions,
}

impl KernelArgs {
    /// The options with the target resolved: `check` and `bench` on one GPU compile for
    /// the GPU they run on (sequence-parallel runs keep the portable sm_80 default).
    fn resolve(&self, on_device: bool) -> KernelOptions {
        let mut options = self.options.clone();
        options.target = match self.target {
            Some(t) => t,
            None if on_device => einattn_exec::device::target().unwrap_or_default(),
            None => Target::default(),
        };
        options
    }
}

pub fn analyze(
    file: &Path,
    defines: &[(String, u64)],
    format: ReportFormat,
    sp: &SpArgs,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let cascade = source.compile(defines)?;
    if let Some(options) = sp.options() {
        let decision = einattn_passes::sp::plan_sequence_parallel(&cascade, &options)
            .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
        return Ok(match format {
            ReportFormat::Text => decision.report.render_text(),
            ReportFormat::Json => decision.report.to_json(),
        });
    }
    let report = einattn_passes::analysis::analyze(
        &cascade,
        &einattn_passes::analysis::AnalysisOptions::default(),
    );
    Ok(match format {
        ReportFormat::Text => report.render_text(),
        ReportFormat::Json => serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::input(format!("error: cannot serialize the report: {e}")))?,
    })
}

/// The stages `einattn compile --emit` can print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Ast,
    Ir,
    Report,
    Schedule,
    Tile,
    Ptx,
}

/// The forward a backward cascade differentiates: its source, the size bindings it was
/// built with, the cascade and its gradient.
pub struct GradientOf<'a> {
    pub source: &'a SourceFile,
    pub defines: &'a [(String, u64)],
    pub forward: &'a Cascade,
    pub grad: &'a einattn_passes::grad::Grad,
}

/// Loads and compiles a cascade with the kernel families (`on_device`: for a run on this
/// machine's GPU).
pub fn build_kernels(
    source: &SourceFile,
    defines: &[(String, u64)],
    args: &KernelArgs,
    on_device: bool,
    gradient_of: Option<GradientOf>,
) -> Result<Box<dyn Compiled>, CliError> {
    let options = args.resolve(on_device);
    let cascade = source.compile(defines)?;
    let instantiate = |sizes: &[(String, u64)]| {
        einattn_dsl::compile_source(&source.name(), &source.text, sizes)
            .map_err(|d| CompileError::Source(d.items().to_vec()))
    };
    let request = Request {
        cascade: &cascade,
        options: &options,
        defines,
        instantiate: &instantiate,
    };
    // A backward cascade: the forward's family derives its kernels where it can.
    match gradient_of {
        Some(g) => {
            let forward_source = g.source;
            let instantiate_forward = |sizes: &[(String, u64)]| {
                einattn_dsl::compile_source(&forward_source.name(), &forward_source.text, sizes)
                    .map_err(|d| CompileError::Source(d.items().to_vec()))
            };
            let forward = Request {
                cascade: g.forward,
                options: &options,
                defines: g.defines,
                instantiate: &instantiate_forward,
            };
            family::compile_gradient(&forward, g.grad, &request)
        }
        None => family::compile(&request),
    }
    .map_err(|e| source.compile_error(e))
}

/// The kernels of a compile with their PTX.
fn kernel_set(compiled: &dyn Compiled) -> KernelSet {
    KernelSet {
        manifest: compiled.manifest(),
        ptx: compiled
            .modules()
            .iter()
            .map(|m| (m.ptx.entry.clone(), m.ptx.text.clone()))
            .collect(),
    }
}

fn create_dir(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::input(format!("error: cannot create `{}`: {e}", dir.display())))
}

/// `einattn compile FILE [--target T] -o DIR`: writes every kernel's PTX and
/// `DIR/manifest.json`.
pub fn compile_ptx(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    out_dir: &Path,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let compiled = build_kernels(&source, defines, args, false, None)?;
    create_dir(out_dir)?;
    let written = kernel_set(compiled.as_ref())
        .write(out_dir)
        .map_err(|e| CliError::input(format!("error: {e}")))?;
    let main = compiled
        .main()
        .ok_or_else(|| CliError::input("error: no kernels"))?;
    let mut out = format!(
        "{}: {} ({}, {} threads, {} B shared)\n",
        compiled.cascade().name,
        main.ptx.entry,
        main.ptx.target.name(),
        main.ptx.threads,
        main.ptx.dynamic_smem_bytes
    );
    for path in written {
        out.push_str(&format!("wrote {}\n", path.display()));
    }
    Ok(out)
}

/// The plan `--sp` asks for, lowered to the kernels of `compiled` (chunked for `gpu`).
fn planned(
    source: &SourceFile,
    compiled: &dyn Compiled,
    sp: &SpArgs,
    gpu: &GpuModel,
) -> Result<
    (
        einattn_passes::sp::SpDecision,
        Plan,
        Result<LoweredPlan, String>,
    ),
    CliError,
> {
    let options = sp
        .options()
        .ok_or_else(|| CliError::usage("error: this needs `--sp P`"))?;
    let (decision, plan) = einattn_backends::plan::plan_cascade(compiled.cascade(), &options)
        .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
    let lowered = lower(&plan, compiled, gpu);
    Ok((decision, plan, lowered))
}

/// `einattn check`: (report, passed).
#[allow(clippy::too_many_arguments)] // one per flag of `check`
pub fn check(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    seed: u64,
    given: &Given,
    save_outputs: Option<&Path>,
    grad: bool,
    sp: &SpArgs,
) -> Result<(String, bool), CliError> {
    let source = SourceFile::load(file)?;
    if grad {
        let (forward, result, backward) = backward(&source, defines, None)?;
        let of = GradientOf {
            source: &source,
            defines,
            forward: &forward,
            grad: &result,
        };
        let compiled = build_kernels(&backward, &[], args, true, Some(of))?;
        return Ok(einattn_exec::grad::check_backward(
            &forward,
            &result,
            compiled.as_ref(),
            seed,
            given,
            save_outputs,
        )?);
    }
    if sp.devices.is_some_and(|p| p < 2) {
        return Err(CliError::usage(
            "error: `check --sp P` splits the sequence over P >= 2 GPUs",
        ));
    }
    let compiled = build_kernels(&source, defines, args, sp.devices.is_none(), None)?;
    if sp.devices.is_some() {
        let gpu = einattn_exec::device::model().unwrap_or_else(GpuModel::h200);
        let (_, _, lowered) = planned(&source, compiled.as_ref(), sp, &gpu)?;
        let lowered = lowered.map_err(|e| CliError::input(format!("error: {e}")))?;
        return Ok(einattn_exec::plan::run::check_plan(
            &lowered.plan,
            &lowered.kernels,
            compiled.as_ref(),
            seed,
            given,
            sp.mapping(),
        )?);
    }
    Ok(einattn_exec::check::check(
        compiled.as_ref(),
        seed,
        given,
        save_outputs,
    )?)
}

/// The plan folder's source: a plain file name inside `dir`, never a path elsewhere.
fn plan_source(dir: &Path, name: &str) -> Result<SourceFile, CliError> {
    let plain = Path::new(name)
        .file_name()
        .is_some_and(|f| f == std::ffi::OsStr::new(name));
    if !plain {
        return Err(CliError::input(format!(
            "error: {}: `source` must name a file in the plan folder, not `{name}`",
            dir.join("build.json").display()
        )));
    }
    SourceFile::load(&dir.join(name))
}

/// `einattn run-plan DIR`: validates `DIR/plan.json` and the kernels beside it on the CPU,
/// then runs them on the GPUs and compares with one GPU on the whole problem and the
/// reference (the source is read only for the reference).
pub fn run_plan(dir: &Path, seed: u64, mapping: RankMode) -> Result<(String, bool), CliError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| CliError::input(format!("error: cannot read `{}`: {e}", path.display())))
    };
    let in_dir = |name: &str, e: String| {
        CliError::input(format!("error: {}: {e}", dir.join(name).display()))
    };
    let plan =
        Plan::from_json(&read("plan.json")?).map_err(|e| in_dir("plan.json", e.to_string()))?;
    einattn_backends::plan::lower::check_steps(&plan).map_err(|e| in_dir("plan.json", e))?;
    let kernels = KernelSet::read(dir).map_err(|e| CliError::input(format!("error: {e}")))?;
    einattn_backends::plan::validate::validate(&plan, &kernels)
        .map_err(|e| in_dir("plan.json", e))?;
    let record = read("build.json")?;
    let record = BuildRecord::from_json(&record).map_err(|e| in_dir("build.json", e))?;
    let source = plan_source(dir, &record.source)?;
    let (defines, args) = (
        record.defines,
        KernelArgs {
            target: record.target,
            options: record.options,
        },
    );
    let compiled = build_kernels(&source, &defines, &args, false, None)?;
    einattn_backends::plan::validate::matches_source(&plan, compiled.cascade())
        .map_err(|e| in_dir("plan.json", e))?;
    Ok(einattn_exec::plan::run::check_plan(
        &plan,
        &kernels,
        compiled.as_ref(),
        seed,
        &Given::default(),
        mapping,
    )?)
}

/// Relative error under which `run-plan --cpu` passes: the CPU executor evaluates every
/// step with the f64 interpreter, so a correct plan differs from one device by rounding.
pub const CPU_PLAN_TOLERANCE: f64 = 1e-9;

/// `einattn run-plan DIR --cpu`: runs `DIR/plan.json` on the CPU executor (every rank's
/// steps over the reference interpreter, collectives simulated) on inputs drawn from
/// `seed`, and compares every output with the interpreter on the whole problem. Needs no
/// GPU and no kernels: a plan without a GPU lowering runs too.
pub fn run_plan_cpu(
    dir: &Path,
    seed: u64,
    limits: interp::Limits,
) -> Result<(String, bool), CliError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| CliError::input(format!("error: cannot read `{}`: {e}", path.display())))
    };
    let in_dir = |name: &str, e: String| {
        CliError::input(format!("error: {}: {e}", dir.join(name).display()))
    };
    let plan =
        Plan::from_json(&read("plan.json")?).map_err(|e| in_dir("plan.json", e.to_string()))?;
    let record = read("build.json")?;
    let record = BuildRecord::from_json(&record).map_err(|e| in_dir("build.json", e))?;
    let source = plan_source(dir, &record.source)?;
    let cascade = source.compile(&record.defines)?;
    einattn_backends::plan::validate::matches_source(&plan, &cascade)
        .map_err(|e| in_dir("plan.json", e))?;
    // The executor holds every rank's buffers next to the whole problem's values: bounded
    // like a reference run.
    let inputs = interp::random_inputs_limited(&cascade, seed, limits).map_err(|e| {
        CliError::input(format!(
            "error: {}: {e}\n  = help: compile the plan for smaller sizes",
            source.name()
        ))
    })?;
    let got = einattn_backends::plan::execute_plan(&cascade, &plan, &inputs)
        .map_err(|e| in_dir("plan.json", e.to_string()))?;
    let order = einattn_ir::validate::topological_order(&cascade);
    let want = interp::evaluate_in_order(&cascade, &inputs, &order)
        .map_err(|e| CliError::input(format!("error: evaluation failed: {e}")))?;
    let mut report = format!(
        "run-plan --cpu: {} ({} on {} devices), seed {seed}\n",
        cascade.name, plan.scheme, plan.world_size
    );
    let mut pass = true;
    for h in cascade.outputs() {
        let name = &cascade.tensors[h].name;
        let (Some(g), Some(w)) = (got.get(&h), want.get(h)) else {
            return Err(in_dir(
                "plan.json",
                format!("the plan does not compute `{name}`"),
            ));
        };
        let e = g.relative_error(w);
        let ok = e < CPU_PLAN_TOLERANCE;
        pass &= ok;
        report.push_str(&format!(
            "  {name}: relative error {e:.2e} against the interpreter on the whole problem (tolerance {CPU_PLAN_TOLERANCE:.0e}): {}\n",
            if ok { "PASS" } else { "FAIL" }
        ));
    }
    Ok((report, pass))
}

/// The plan's global tensors are the cascade's, with its shapes, and every tensor or state
/// its steps name is one of the cascade's.
#[allow(clippy::too_many_arguments)] // one per flag of `bench`
pub fn bench(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    reps: usize,
    format: ReportFormat,
    given: &Given,
    grad: bool,
    sp: &SpArgs,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let (compiled, forward_kernels) = if grad {
        // Drawn values, not a forward's: timing needs no meaningful statistics.
        let (forward, result, backward) = backward(&source, defines, None)?;
        let of = GradientOf {
            source: &source,
            defines,
            forward: &forward,
            grad: &result,
        };
        let compiled = build_kernels(&backward, &[], args, true, Some(of))?;
        // The forward's kernels too, for the time of a training step's attention (forward
        // then backward). Options meant for the backward kernels may not fit them: then the
        // report says why and times the backward alone.
        let forward_kernels =
            build_kernels(&source, defines, args, true, None).map_err(|e| e.message);
        (compiled, Some(forward_kernels))
    } else {
        let compiled = build_kernels(&source, defines, args, sp.devices.is_none(), None)?;
        (compiled, None)
    };
    if sp.devices.is_some() {
        let gpu = einattn_exec::device::model().unwrap_or_else(GpuModel::h200);
        let (_, _, lowered) = planned(&source, compiled.as_ref(), sp, &gpu)?;
        let lowered = lowered.map_err(|e| CliError::input(format!("error: {e}")))?;
        return Ok(einattn_exec::plan::run::bench_plan(
            &lowered.plan,
            &lowered.kernels,
            compiled.as_ref(),
            reps,
            format,
            given,
            sp.mapping(),
        )?);
    }
    let forward = forward_kernels
        .as_ref()
        .map(|f| f.as_ref().map(|k| k.as_ref()).map_err(String::as_str));
    Ok(einattn_exec::bench::bench(
        compiled.as_ref(),
        forward,
        reps,
        format,
        given,
    )?)
}

pub fn emit(
    file: &Path,
    defines: &[(String, u64)],
    stage: Stage,
    args: &KernelArgs,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    // Every kernel in launch order: a split loop's main kernel comes before its merge.
    let every_module = |text: &dyn Fn(&family::Module) -> String| -> Result<String, CliError> {
        let compiled = build_kernels(&source, defines, args, false, None)?;
        let modules = compiled.modules();
        if modules.is_empty() {
            return Err(CliError::input("error: no kernels"));
        }
        let mut texts: Vec<String> = modules.iter().map(text).collect();
        // The general lowering's kernels share one program, which prints once.
        texts.dedup();
        Ok(texts.join("\n"))
    };
    match stage {
        Stage::Schedule => Ok(build_kernels(&source, defines, args, false, None)?.explain()),
        Stage::Tile => every_module(&|m| m.program.to_string()),
        Stage::Ptx => every_module(&|m| m.ptx.text.clone()),
        Stage::Ast => {
            let ast = einattn_dsl::parse(&source.name(), &source.text)
                .map_err(|d| CliError::input(d.render(&source.name(), &source.text)))?;
            Ok(format!("{ast:#?}"))
        }
        Stage::Ir => Ok(einattn_ir::print::print(&source.compile(defines)?)),
        Stage::Report => analyze(file, defines, ReportFormat::Text, &SpArgs::default()),
    }
}

/// `einattn compile FILE --sp P -o DIR`: writes `DIR/plan.json`, the kernels it launches
/// with their manifest, the source and the build record; returns the planner's table.
pub fn compile_plan(
    file: &Path,
    defines: &[(String, u64)],
    sp: &SpArgs,
    args: &KernelArgs,
    out_dir: &Path,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let compiled = build_kernels(&source, defines, args, false, None)?;
    // Plans are costed for the H200 the SP anchors were measured on; windows are chunked
    // for the same part.
    let (decision, plan, lowered) = planned(&source, compiled.as_ref(), sp, &GpuModel::h200())?;
    create_dir(out_dir)?;
    let write = |name: &str, text: &str| -> Result<PathBuf, CliError> {
        let p = out_dir.join(name);
        std::fs::write(&p, text)
            .map_err(|e| CliError::input(format!("error: cannot write `{}`: {e}", p.display())))?;
        Ok(p)
    };
    let mut lines = vec![decision.report.render_text().trim_end().to_string()];
    match &lowered {
        Ok(l) => {
            let path = write("plan.json", &(l.plan.to_json() + "\n"))?;
            lines.push(format!("wrote {}", path.display()));
            for p in l
                .kernels
                .write(out_dir)
                .map_err(|e| CliError::input(format!("error: {e}")))?
            {
                lines.push(format!("wrote {}", p.display()));
            }
        }
        // The plan stands on its own; say why the GPU executor will refuse it.
        Err(e) => {
            let path = write("plan.json", &(plan.to_json() + "\n"))?;
            lines.push(format!("wrote {}", path.display()));
            lines.push(format!("note: {e}"));
        }
    }
    write("source.ein", &source.text)?;
    let record = BuildRecord {
        source: "source.ein".into(),
        defines: defines.to_vec(),
        target: args.target,
        options: args.options.clone(),
    }
    .to_json();
    write("build.json", &record)?;
    lines.push(format!(
        "wrote {} and {} (run it with `einattn run-plan {}`)",
        out_dir.join("source.ein").display(),
        out_dir.join("build.json").display(),
        out_dir.display()
    ));
    Ok(lines.join("\n") + "\n")
}

/// `einattn optimize`: the log of rules applied with the analysis before and after, and
/// the optimized cascade as `.ein` text (written to `out` when given, else appended).
pub fn optimize(
    file: &Path,
    defines: &[(String, u64)],
    out: Option<&Path>,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let cascade = source.compile(defines)?;
    let result = einattn_passes::rewrite::optimize(
        &cascade,
        &einattn_passes::rewrite::OptimizeOptions::default(),
    )
    .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
    let text = einattn_ir::print::print(&result.cascade);
    let step = result.applied.last().map_or_else(
        || "with no rewrite applied".to_string(),
        |a| format!("after step {} ({})", result.applied.len(), a.rule),
    );
    compiles_back(&source, &format!("optimized cascade ({step})"), &text)?;
    let mut log = result.render_log();
    match out {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| {
                CliError::input(format!("error: cannot write `{}`: {e}", path.display()))
            })?;
            log.push_str(&format!("\nwrote {}\n", path.display()));
        }
        None => {
            log.push('\n');
            log.push_str(&text);
        }
    }
    Ok(log)
}

/// What `einattn run` wrote, for the summary it prints.
pub struct RunSummary {
    pub written: Vec<(String, Vec<usize>, PathBuf)>,
}

/// Evaluates a cascade with the reference interpreter. Inputs come from `--input NAME=PATH`
/// and `--param NAME=VALUE` or are drawn from `seed`; every input and output is written to `out_dir` as `NAME.npy`.
/// Refused before anything is allocated when the evaluation would exceed `limits`.
pub fn run(
    file: &Path,
    defines: &[(String, u64)],
    seed: u64,
    given: &Given,
    out_dir: &Path,
    limits: interp::Limits,
) -> Result<RunSummary, CliError> {
    let source = SourceFile::load(file)?;
    let cascade = source.compile(defines)?;
    let mut inputs = interp::random_inputs_limited(&cascade, seed, limits).map_err(|e| {
        CliError::input(format!(
            "error: {}: {e}
  = help: bind smaller sizes with -D, or raise the bounds with --max-elements and --max-work",
            source.name()
        ))
    })?;
    given.apply(&cascade, &mut inputs)?;
    let order = einattn_ir::validate::topological_order(&cascade);
    let values = interp::evaluate_in_order(&cascade, &inputs, &order)
        .map_err(|e| CliError::input(format!("error: evaluation failed: {e}")))?;
    // NaN is a value of the semantics, but never a silent one.
    for origin in &values.nan_origins {
        eprintln!("warning: {}", origin.message(&cascade));
    }
    create_dir(out_dir)?;
    let mut written = Vec::new();
    for (h, t) in cascade.tensors.iter() {
        if t.kind == TensorKind::Temp {
            continue;
        }
        let Some(data) = values.get(h) else { continue };
        let path = out_dir.join(format!("{}.npy", t.name));
        einattn_exec::npy::write(&path, data).map_err(|e| {
            CliError::input(format!("error: cannot write `{}`: {e}", path.display()))
        })?;
        written.push((t.name.clone(), data.shape.clone(), path));
    }
    Ok(RunSummary { written })
}

/// `einattn grad`: the backward cascade as `.ein` text, checked to compile back.
pub fn grad(
    file: &Path,
    defines: &[(String, u64)],
    wrt: Option<Vec<String>>,
    out: Option<&Path>,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let text = backward(&source, defines, wrt)?.2.text;
    match out {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| {
                CliError::input(format!("error: cannot write `{}`: {e}", path.display()))
            })?;
            Ok(format!("wrote {}\n", path.display()))
        }
        None => Ok(text),
    }
}

/// The forward, its gradient, and the backward as a source `FILE (backward)` that compiles.
fn backward(
    source: &SourceFile,
    defines: &[(String, u64)],
    wrt: Option<Vec<String>>,
) -> Result<(Cascade, einattn_passes::grad::Grad, SourceFile), CliError> {
    let forward = source.compile(defines)?;
    let options = einattn_passes::grad::GradOptions { wrt };
    let result = einattn_passes::grad::grad(&forward, &options)
        .map_err(|d| CliError::input(source.render(d)))?;
    let text = result.to_text(&source.name());
    compiles_back(source, "backward cascade", &text)?;
    let path = PathBuf::from(format!("{} (backward)", source.name()));
    Ok((forward, result, SourceFile { path, text }))
}

/// What a command writes as a cascade must be what `analyze` accepts: the text itself is
/// compiled back before anything is written.
fn compiles_back(source: &SourceFile, what: &str, text: &str) -> Result<(), CliError> {
    let name = format!("{}.ein", what.split(' ').next().unwrap_or("cascade"));
    einattn_dsl::compile_source_with_warnings(&name, text, &[])
        .map(|_| ())
        .map_err(|d| {
            CliError::input(format!(
                "error: {}: the {what} does not compile; nothing was written:\n{}",
                source.name(),
                d.render(&name, text)
            ))
        })
}
