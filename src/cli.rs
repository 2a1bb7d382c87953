//! The `einattn` commands. `main.rs` only parses arguments and maps errors to exit codes.

use einattn_ir::interp::{self, TensorData};
use einattn_ir::{Cascade, Handle, Tensor, TensorKind};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A failed command: what to print and the process exit code (1: bad input, 2: bad usage).
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub exit_code: i32,
}

impl CliError {
    /// The input (a `.ein` file, an `.npy`) is wrong.
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

/// Parses `NAME=VALUE` for `-D`.
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

    /// Parses, lowers and validates; diagnostics come back rendered.
    pub fn compile(&self, defines: &[(String, u64)]) -> Result<Cascade, CliError> {
        einattn_dsl::compile_source(&self.name(), &self.text, defines)
            .map_err(|d| CliError::input(d.render(&self.name(), &self.text)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}

/// Sequence-parallel options from the command line: `--sp P [--seq Q,K] [--scheme NAME]`.
#[derive(Clone, Debug, Default)]
pub struct SpArgs {
    pub devices: Option<u64>,
    pub sequence: Option<(String, String)>,
    pub scheme: Option<String>,
}

impl SpArgs {
    fn options(&self) -> Option<einattn_passes::sp::SpOptions> {
        let mut options = einattn_passes::sp::SpOptions::new(self.devices?);
        options.sequence = self.sequence.clone();
        options.scheme = self.scheme.clone();
        Some(options)
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

/// Kernel options from the command line: target, storage type, schedule overrides.
#[derive(Clone, Debug, Default)]
pub struct KernelArgs {
    pub target: Option<einattn_backends::Target>,
    pub elem: Option<einattn_backends::tile::Elem>,
    /// `--tile NAME=SIZE`: a key rank (or its tile rank) sets the key tile, the query rank
    /// (or `NAME0`) the query rows per CTA.
    pub tiles: Vec<(String, u64)>,
    pub warps: Option<u32>,
    pub stages: Option<u32>,
    pub mma: Option<einattn_backends::tile::MmaUnit>,
    /// Run the rewrite engine first.
    pub optimize: bool,
    /// Linear attention: `single` pass or `chunked` two-phase (default: the cost model).
    pub strategy: Option<String>,
    /// Linear attention, chunked: tokens per chunk (default: the cost model).
    pub chunk_tokens: Option<u64>,
}

impl KernelArgs {
    /// `check` and `bench` on one GPU compile for the GPU they run on unless `--target`
    /// says otherwise (sequence-parallel runs keep the portable sm_80 default).
    fn for_device(&self, sp: &SpArgs) -> KernelArgs {
        let mut args = self.clone();
        if args.target.is_none() && sp.devices.is_none() {
            args.target = crate::gpu::device_target();
        }
        args
    }

    /// The schedule knobs these options set; the rest stay the cost model's.
    fn schedule_options(&self) -> einattn_backends::schedule::ScheduleOptions {
        let mut options = einattn_backends::schedule::ScheduleOptions {
            elem: self.elem,
            warps: self.warps,
            stages: self.stages,
            mma: self.mma,
            ..einattn_backends::schedule::ScheduleOptions::default()
        };
        if let Some(t) = self.target {
            options.target = t;
        }
        options
    }
}

/// A cascade compiled to one of the kernel families.
pub enum Kernel {
    Attention(Box<einattn_backends::compile::CompiledKernel>),
    Linear(Box<einattn_backends::compile::CompiledLinear>),
}

impl Kernel {
    pub fn ptx(&self) -> &einattn_backends::PtxKernel {
        match self {
            Kernel::Attention(k) => &k.ptx,
            Kernel::Linear(k) => &k.ptx,
        }
    }
    /// A kernel launched before [`Kernel::ptx`] (the chunked strategy's chunk states).
    pub fn pre_ptx(&self) -> Option<&einattn_backends::PtxKernel> {
        match self {
            Kernel::Attention(_) => None,
            Kernel::Linear(k) => k.pre.as_ref().map(|(_, p)| p),
        }
    }
    pub fn program(&self) -> &einattn_backends::TileProgram {
        match self {
            Kernel::Attention(k) => &k.program,
            Kernel::Linear(k) => &k.program,
        }
    }
    pub fn explain(&self) -> String {
        match self {
            Kernel::Attention(k) => k.schedule.explain(),
            Kernel::Linear(k) => k.explain(),
        }
    }
    pub fn manifest(&self, cascade: &Cascade, ptx_file: &str) -> serde_json::Value {
        match self {
            Kernel::Attention(k) => k.manifest(cascade, ptx_file),
            Kernel::Linear(k) => k.manifest(cascade, ptx_file),
        }
    }
}

/// Loads, optionally optimizes, and compiles a cascade to one kernel: softmax attention
/// first; causal linear attention (confirmed on a small instance of the same source) next.
pub fn build_kernel(
    source: &SourceFile,
    defines: &[(String, u64)],
    args: &KernelArgs,
) -> Result<(Cascade, Kernel), CliError> {
    if args.mma == Some(einattn_backends::tile::MmaUnit::Warpgroup)
        && args.target != Some(einattn_backends::Target::Sm90a)
    {
        return Err(CliError::usage(
            "error: `--mma wgmma` needs the Hopper instruction set\n  = help: add `--target sm_90a`",
        ));
    }
    let cascade = source.compile(defines)?;
    let softmax_err = match build_attention(source, &cascade, args) {
        Ok((c, k)) => return Ok((c, Kernel::Attention(Box::new(k)))),
        // Read as softmax attention, but the options or sizes do not fit: that is the answer.
        Err(e) if e.recognized => return Err(e.error),
        Err(e) => e.error,
    };
    match build_linear(source, &cascade, defines, args) {
        Ok(k) => Ok((cascade, Kernel::Linear(Box::new(k)))),
        Err(e) if e.recognized => Err(e.error),
        Err(e) => Err(CliError::input(format!(
            "{}\n\nnor as linear attention:\n{}",
            softmax_err.message.trim_end(),
            e.error.message.trim_end()
        ))),
    }
}

/// A failed kernel build, and whether the cascade was read as that kernel family (then the
/// error is about options or sizes and stands alone; else the next family is tried).
struct KernelError {
    error: CliError,
    recognized: bool,
}

impl From<CliError> for KernelError {
    /// Usage errors belong to the family whose flags they name; input errors are a
    /// failure to read the cascade as the family.
    fn from(error: CliError) -> Self {
        let recognized = error.exit_code != 1;
        KernelError { error, recognized }
    }
}

fn usage_error(message: impl Into<String>) -> KernelError {
    CliError::usage(message).into()
}

/// Renders a backend diagnostic against the source.
fn kernel_error(source: &SourceFile, d: einattn_ir::validate::Diagnostic) -> KernelError {
    KernelError {
        recognized: d.kind != einattn_ir::validate::DiagnosticKind::NotMappable,
        error: CliError::input(
            einattn_dsl::Diagnostics::new(vec![d]).render(&source.name(), &source.text),
        ),
    }
}

fn build_linear(
    source: &SourceFile,
    cascade: &Cascade,
    defines: &[(String, u64)],
    args: &KernelArgs,
) -> Result<einattn_backends::compile::CompiledLinear, KernelError> {
    use einattn_backends::schedule::recognize_linear;
    let render = |d| kernel_error(source, d);
    // The same source at small sizes, for the interpreter to confirm the reading.
    let hypothesis = recognize_linear(cascade, false).map_err(render)?;
    let mut small_defines: Vec<(String, u64)> = defines.to_vec();
    for (rank, small) in &hypothesis.shrinkable {
        if let einattn_ir::ExtentSource::Symbol(name) = &cascade.ranks[*rank].source {
            small_defines.retain(|(n, _)| n != name);
            small_defines.push((name.clone(), *small));
        }
    }
    let small = source.compile(&small_defines)?;
    let options = args.schedule_options();
    let mut value_block = None;
    for (n, size) in &args.tiles {
        let value_rank = cascade.tensors[hypothesis.v.tensor].ranks.last().copied();
        if value_rank.is_some_and(|r| cascade.ranks[r].name == *n) {
            value_block = Some(*size as u32);
        } else {
            return Err(usage_error(format!(
                "error: `--tile {n}=...`: the linear kernel takes a tile of the value rank only"
            )));
        }
    }
    use einattn_backends::tile::linear::Strategy;
    let d = u64::from(hypothesis.spec.head_dim);
    let strategy = match (args.strategy.as_deref(), args.chunk_tokens) {
        (None, None) => None,
        (Some("single"), None) => Some(Strategy::SinglePass),
        (Some("lookback"), None) => Some(Strategy::LookBack),
        (Some("single" | "lookback"), Some(_)) => {
            return Err(usage_error(
                "error: `--chunk-tokens` goes with `--strategy chunked`",
            ))
        }
        (Some("chunked") | None, tokens) => {
            let tiles = hypothesis.n.div_ceil(d);
            let chunk_tiles = match tokens {
                Some(t) if t == 0 || t % d != 0 => {
                    return Err(usage_error(format!(
                        "error: `--chunk-tokens {t}` must be a positive multiple of the block ({d} tokens)"
                    )))
                }
                Some(t) => t / d,
                None => tiles.div_ceil(8).max(1),
            };
            Some(Strategy::Chunked {
                chunk_tiles: chunk_tiles as u32,
            })
        }
        (Some(other), _) => {
            return Err(usage_error(format!(
                "error: unknown strategy `{other}` (single, chunked, lookback)"
            )))
        }
    };
    einattn_backends::compile::compile_linear(cascade, &small, &options, value_block, strategy)
        .map_err(render)
}

fn build_attention(
    source: &SourceFile,
    cascade: &Cascade,
    args: &KernelArgs,
) -> Result<(Cascade, einattn_backends::compile::CompiledKernel), KernelError> {
    use einattn_backends::schedule::recognize;
    let mut cascade = cascade.clone();
    if args.optimize {
        cascade = optimized(source, &cascade)?.cascade;
    }
    let render = |mut d: einattn_ir::validate::Diagnostic| {
        if args.optimize {
            // Spans of rewritten Einsums point nowhere useful in the original text.
            d.span = None;
        }
        kernel_error(source, d)
    };
    let mut options = args.schedule_options();
    if !args.tiles.is_empty() {
        let m = recognize(&cascade).map_err(render)?;
        let name = |r: einattn_ir::Handle<einattn_ir::Rank>| cascade.ranks[r].name.clone();
        let mut key_names = vec![name(m.roles.key)];
        if let Some((_, inner, _)) = m.roles.key_split {
            key_names.push(name(inner));
        }
        key_names.push(format!("{}0", name(m.roles.key)));
        key_names.dedup();
        let query_names: Vec<String> = m
            .roles
            .query
            .map(|q| vec![name(q), format!("{}0", name(q))])
            .unwrap_or_default();
        for (n, size) in &args.tiles {
            let size = u32::try_from(*size)
                .map_err(|_| CliError::usage(format!("error: tile size {size} is too large")))?;
            if key_names.contains(n) {
                options.block_n = Some(size);
            } else if query_names.contains(n) {
                options.block_m = Some(size);
            } else {
                return Err(usage_error(format!(
                    "error: `--tile {n}=...`: `{n}` is neither the key rank ({}) nor the query rank ({})",
                    key_names.join(", "),
                    if query_names.is_empty() { "none".to_string() } else { query_names.join(", ") }
                )));
            }
        }
    }
    let kernel = einattn_backends::compile::compile_kernel(&cascade, &options).map_err(render)?;
    Ok((cascade, kernel))
}

/// `einattn compile FILE [--target T] -o DIR`: writes `DIR/<kernel>.ptx` and
/// `DIR/manifest.json`.
pub fn compile_ptx(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    out_dir: &Path,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let (cascade, kernel) = build_kernel(&source, defines, args)?;
    let write_err = |p: &Path, e: std::io::Error| {
        CliError::input(format!("error: cannot write `{}`: {e}", p.display()))
    };
    std::fs::create_dir_all(out_dir).map_err(|e| write_err(out_dir, e))?;
    if let Some(pre) = kernel.pre_ptx() {
        let path = out_dir.join(format!("{}.ptx", pre.entry));
        std::fs::write(&path, &pre.text).map_err(|e| write_err(&path, e))?;
    }
    let ptx_name = format!("{}.ptx", kernel.ptx().entry);
    let ptx_path = out_dir.join(&ptx_name);
    std::fs::write(&ptx_path, &kernel.ptx().text).map_err(|e| write_err(&ptx_path, e))?;
    let manifest = kernel.manifest(&cascade, &ptx_name);
    let manifest_path = out_dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| CliError::input(format!("error: {e}")))?;
    std::fs::write(&manifest_path, text + "\n").map_err(|e| write_err(&manifest_path, e))?;
    Ok(format!(
        "{}: {} ({}, {} threads, {} B shared)\nwrote {}\nwrote {}\n",
        cascade.name,
        kernel.ptx().entry,
        kernel.ptx().target.name(),
        kernel.ptx().threads,
        kernel.ptx().dynamic_smem_bytes,
        ptx_path.display(),
        manifest_path.display()
    ))
}

/// `einattn check`: (report, passed).
pub fn check(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    seed: u64,
    sp: &SpArgs,
) -> Result<(String, bool), CliError> {
    let source = SourceFile::load(file)?;
    if sp.devices.is_some_and(|p| p < 2) {
        return Err(CliError::usage(
            "error: `check --sp P` splits the sequence over P >= 2 GPUs",
        ));
    }
    let args = &args.for_device(sp);
    let (cascade, kernel) = build_kernel(&source, defines, args)?;
    if let Some(options) = sp.options() {
        let (_, plan) = einattn_backends::plan::plan_cascade(&cascade, &options)
            .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
        return crate::gpu::check_sp(&cascade, &kernel, &plan, seed);
    }
    match &kernel {
        Kernel::Attention(k) => crate::gpu::check(&cascade, k, seed),
        Kernel::Linear(k) => crate::gpu::check_linear(&cascade, k, seed),
    }
}

/// What `compile --sp P -o DIR` records so that `run-plan DIR` rebuilds the same kernels:
/// the source (copied as `source.ein`), the size bindings and the kernel options.
fn build_record(defines: &[(String, u64)], args: &KernelArgs) -> serde_json::Value {
    serde_json::json!({
        "source": "source.ein",
        "defines": defines.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
        "target": args.target.map(|t| t.name()),
        "dtype": args.elem.map(|e| e.name()),
        "tiles": args.tiles.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
        "warps": args.warps,
        "stages": args.stages,
        "mma": args.mma.map(|m| m.name()),
        "optimize": args.optimize,
        "strategy": args.strategy,
        "chunk_tokens": args.chunk_tokens,
    })
}

/// A build record read back: the source file name, the size bindings, the kernel options.
type BuildRecord = (String, Vec<(String, u64)>, KernelArgs);

fn read_build_record(v: &serde_json::Value) -> Result<BuildRecord, String> {
    let pairs = |key: &str| -> Result<Vec<(String, u64)>, String> {
        v.get(key)
            .and_then(|x| x.as_array())
            .map(|a| {
                a.iter()
                    .map(|p| {
                        match (
                            p.get(0).and_then(|n| n.as_str()),
                            p.get(1).and_then(|x| x.as_u64()),
                        ) {
                            (Some(n), Some(x)) => Ok((n.to_string(), x)),
                            _ => Err(format!("`{key}` holds [name, number] pairs")),
                        }
                    })
                    .collect()
            })
            .unwrap_or_else(|| Ok(Vec::new()))
    };
    let text = |key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_string);
    let number = |key: &str| v.get(key).and_then(|x| x.as_u64());
    let target = match text("target").as_deref() {
        None => None,
        Some("sm_80") => Some(einattn_backends::Target::Sm80),
        Some("sm_90a") => Some(einattn_backends::Target::Sm90a),
        Some(other) => return Err(format!("unknown target `{other}`")),
    };
    let elem = match text("dtype").as_deref() {
        None => None,
        Some("bf16") => Some(einattn_backends::tile::Elem::Bf16),
        Some("f16") => Some(einattn_backends::tile::Elem::F16),
        Some(other) => return Err(format!("unknown dtype `{other}`")),
    };
    let args = KernelArgs {
        target,
        elem,
        tiles: pairs("tiles")?,
        warps: number("warps").map(|x| x as u32),
        stages: number("stages").map(|x| x as u32),
        mma: match text("mma").as_deref() {
            None => None,
            Some("mma.sync") => Some(einattn_backends::tile::MmaUnit::Sync),
            Some("wgmma") => Some(einattn_backends::tile::MmaUnit::Warpgroup),
            Some(other) => return Err(format!("unknown mma `{other}`")),
        },
        optimize: v.get("optimize").and_then(|x| x.as_bool()).unwrap_or(false),
        strategy: text("strategy"),
        chunk_tokens: number("chunk_tokens"),
    };
    let source = text("source").unwrap_or_else(|| "source.ein".to_string());
    Ok((source, pairs("defines")?, args))
}

/// `einattn run-plan DIR`: rebuilds the kernels `compile --sp P -o DIR` recorded, runs
/// `DIR/plan.json` on the GPUs and compares with one GPU on the whole problem.
pub fn run_plan(dir: &Path, seed: u64) -> Result<(String, bool), CliError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| CliError::input(format!("error: cannot read `{}`: {e}", path.display())))
    };
    let record: serde_json::Value = serde_json::from_str(&read("build.json")?).map_err(|e| {
        CliError::input(format!("error: {}: {e}", dir.join("build.json").display()))
    })?;
    let (source_name, defines, args) = read_build_record(&record).map_err(|e| {
        CliError::input(format!("error: {}: {e}", dir.join("build.json").display()))
    })?;
    let plan = einattn_backends::plan::Plan::from_json(&read("plan.json")?)
        .map_err(|e| CliError::input(format!("error: {}: {e}", dir.join("plan.json").display())))?;
    let source = SourceFile::load(&dir.join(source_name))?;
    let (cascade, kernel) = build_kernel(&source, &defines, &args)?;
    crate::gpu::check_sp(&cascade, &kernel, &plan, seed)
}

pub fn bench(
    file: &Path,
    defines: &[(String, u64)],
    args: &KernelArgs,
    reps: usize,
    format: ReportFormat,
    sp: &SpArgs,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let args = &args.for_device(sp);
    let (cascade, kernel) = build_kernel(&source, defines, args)?;
    if let Some(options) = sp.options() {
        let (_, plan) = einattn_backends::plan::plan_cascade(&cascade, &options)
            .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
        return crate::gpu::bench_sp(&cascade, &kernel, &plan, reps, format);
    }
    match &kernel {
        Kernel::Attention(k) => crate::gpu::bench(&cascade, k, reps, format),
        Kernel::Linear(k) => crate::gpu::bench_linear(&cascade, k, reps, format),
    }
}

pub fn emit(
    file: &Path,
    defines: &[(String, u64)],
    stage: Stage,
    args: &KernelArgs,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    match stage {
        Stage::Schedule => Ok(build_kernel(&source, defines, args)?.1.explain()),
        Stage::Tile => Ok(build_kernel(&source, defines, args)?
            .1
            .program()
            .to_string()),
        Stage::Ptx => Ok(build_kernel(&source, defines, args)?.1.ptx().text.clone()),
        Stage::Ast => {
            let ast = einattn_dsl::parse(&source.name(), &source.text)
                .map_err(|d| CliError::input(d.render(&source.name(), &source.text)))?;
            Ok(format!("{ast:#?}"))
        }
        Stage::Ir => Ok(einattn_ir::print::print(&source.compile(defines)?)),
        Stage::Report => analyze(file, defines, ReportFormat::Text, &SpArgs::default()),
    }
}

/// `einattn compile FILE --sp P -o DIR`: writes `DIR/plan.json` and returns the planner's
/// comparison table.
pub fn compile_plan(
    file: &Path,
    defines: &[(String, u64)],
    sp: &SpArgs,
    args: &KernelArgs,
    out_dir: &Path,
) -> Result<String, CliError> {
    let source = SourceFile::load(file)?;
    let options = sp
        .options()
        .ok_or_else(|| CliError::usage("error: `compile` needs `--sp P` or `--emit STAGE`"))?;
    let (cascade, kernel) = build_kernel(&source, defines, args)?;
    let (decision, path) = einattn_backends::plan::write_plan(&cascade, &options, out_dir)
        .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
    let (_, plan) = einattn_backends::plan::plan_cascade(&cascade, &options)
        .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))?;
    let write = |name: &str, text: &str| -> Result<std::path::PathBuf, CliError> {
        let p = out_dir.join(name);
        std::fs::write(&p, text)
            .map_err(|e| CliError::input(format!("error: cannot write `{}`: {e}", p.display())))?;
        Ok(p)
    };
    write("source.ein", &source.text)?;
    let record = serde_json::to_string_pretty(&build_record(defines, args))
        .map_err(|e| CliError::input(format!("error: {e}")))?;
    write("build.json", &(record + "\n"))?;
    let lowering = match &kernel {
        Kernel::Linear(k) => crate::plan_gpu::Lowering::Linear(k),
        Kernel::Attention(k) => crate::plan_gpu::Lowering::Attention(k),
    };
    let mut lines = vec![
        decision.report.render_text().trim_end().to_string(),
        format!("wrote {}", path.display()),
    ];
    match crate::plan_gpu::lowered_ptx(&plan, &lowering) {
        Ok(kernels) => {
            for (entry, text) in kernels {
                let p = write(&format!("{entry}.ptx"), &text)?;
                lines.push(format!("wrote {}", p.display()));
            }
        }
        // The plan stands on its own; say why the GPU executor will refuse it.
        Err(e) => lines.push(format!("note: {}", e.message.trim_start_matches("error: "))),
    }
    lines.push(format!(
        "wrote {} and {} (run it with `einattn run-plan {}`)",
        out_dir.join("source.ein").display(),
        out_dir.join("build.json").display(),
        out_dir.display()
    ));
    Ok(lines.join("\n") + "\n")
}

fn optimized(
    source: &SourceFile,
    cascade: &Cascade,
) -> Result<einattn_passes::rewrite::Optimized, CliError> {
    einattn_passes::rewrite::optimize(
        cascade,
        &einattn_passes::rewrite::OptimizeOptions::default(),
    )
    .map_err(|e| CliError::input(format!("error: {}: {e}", source.name())))
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
    let result = optimized(&source, &cascade)?;
    let text = einattn_ir::print::print(&result.cascade);
    // What is written must be what `analyze` accepts: check the text itself.
    if let Err(d) = einattn_dsl::compile_source_with_warnings("optimized.ein", &text, &[]) {
        let step = result.applied.last().map_or_else(
            || "with no rewrite applied".to_string(),
            |a| format!("after step {} ({})", result.applied.len(), a.rule),
        );
        return Err(CliError::input(format!(
            "error: {}: the optimized cascade ({step}) does not compile; nothing was written:\n{}",
            source.name(),
            d.render("optimized.ein", &text)
        )));
    }
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
/// or are drawn from `seed`; every input and output is written to `out_dir` as `NAME.npy`.
/// Refused before anything is allocated when the evaluation would exceed `limits`.
pub fn run(
    file: &Path,
    defines: &[(String, u64)],
    seed: u64,
    input_files: &[(String, PathBuf)],
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
    for (name, path) in input_files {
        let tensor = find_input(&cascade, name)?;
        let expected = interp::shape_of(&cascade, tensor);
        let data = crate::npy::read_as(path, &expected).map_err(|e| match e {
            crate::npy::ReadError::Shape(got) => CliError::input(format!(
                "error: `{}` has shape {got:?}, but `{name}` in {} has shape {expected:?}",
                path.display(),
                source.name(),
            )),
            e => CliError::input(format!("error: cannot read `{}`: {e}", path.display())),
        })?;
        inputs.insert(tensor, data);
    }
    let order = einattn_ir::validate::topological_order(&cascade);
    let values = interp::evaluate_in_order(&cascade, &inputs, &order)
        .map_err(|e| CliError::input(format!("error: evaluation failed: {e}")))?;
    std::fs::create_dir_all(out_dir).map_err(|e| {
        CliError::input(format!("error: cannot create `{}`: {e}", out_dir.display()))
    })?;
    let mut written = Vec::new();
    for (h, t) in cascade.tensors.iter() {
        if t.kind == TensorKind::Temp {
            continue;
        }
        let Some(data) = values.get(h) else { continue };
        let path = out_dir.join(format!("{}.npy", t.name));
        crate::npy::write(&path, data).map_err(|e| {
            CliError::input(format!("error: cannot write `{}`: {e}", path.display()))
        })?;
        written.push((t.name.clone(), data.shape.clone(), path));
    }
    Ok(RunSummary { written })
}

fn find_input(cascade: &Cascade, name: &str) -> Result<Handle<Tensor>, CliError> {
    let names: Vec<&str> = cascade
        .tensors
        .iter()
        .filter(|(_, t)| matches!(t.kind, TensorKind::Input | TensorKind::Param))
        .map(|(_, t)| t.name.as_str())
        .collect();
    cascade
        .inputs()
        .find(|&h| cascade.tensors[h].name == name)
        .ok_or_else(|| {
            CliError::usage(format!(
                "error: `--input {name}=...`: the kernel has no input or parameter `{name}` (it has: {})",
                names.join(", ")
            ))
        })
}

/// Evaluates with seeded random inputs and returns every tensor's value by name; used by
/// tests and by `check` to get the reference.
pub fn reference_values(
    cascade: &Cascade,
    seed: u64,
) -> Result<HashMap<String, TensorData>, CliError> {
    let inputs = interp::random_inputs(cascade, seed);
    let order = einattn_ir::validate::topological_order(cascade);
    let values = interp::evaluate_in_order(cascade, &inputs, &order)
        .map_err(|e| CliError::input(format!("error: evaluation failed: {e}")))?;
    Ok(values
        .tensors
        .into_iter()
        .map(|(h, d)| (cascade.tensors[h].name.clone(), d))
        .collect())
}
