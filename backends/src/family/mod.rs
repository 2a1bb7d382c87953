//! Kernel families: the ways the backend reads a cascade as GPU kernels.
//!
//! Each family lives in its own folder and implements [`KernelFamily`]: it reads the
//! cascade (or says why it cannot, so the next family is tried), picks the kernel shape by
//! its cost model, builds Tile IR programs, prints them as PTX and writes a launch contract
//! for each ([`Module`]). [`FAMILIES`] is the order they are tried in; adding a family is
//! its folder and one line there.
//!
//! - [`linear`]: linear attention with decays and gates (Lightning-style kernels);
//! - [`softmax`]: softmax attention in any pass structure (FlashAttention-style kernel),
//!   and attention whose weights are an element-wise map of the score (sigmoid attention);
//! - [`projection`]: row statistics (max, rescaled sums) of a long GEMM's rows, one pass
//!   (a language model head's log-partition and entropy);
//! - [`general`]: every other valid cascade, one point kernel per Einsum, recurrence or
//!   step body (the reference interpreter's loop nests, on every thread);
//! - [`elementwise`]: the small helper kernels an SP plan launches between them.

// A failed compile builds one diagnostic; boxing it would only add noise to every `?`.
#![allow(clippy::result_large_err)]

pub mod elementwise;
pub mod general;
mod layout;
pub mod linear;
pub mod projection;
pub mod softmax;
pub mod subcascade;

pub use layout::Layout;

use crate::abi::{self, ContractParam, ContractTensor, GridAxis, LaunchContract, Manifest, Source};
use crate::plan::Plan;
use crate::ptx::{PtxKernel, Target};
use crate::tile::{AbiKind, AbiParam, AbiRole, Elem, MmaUnit, SeqRank, TileProgram};
use einattn_ir::cascade::{Cascade, Tensor};
use einattn_ir::interp::TensorData;
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_ir::Handle;
use einattn_passes::analysis::GpuModel;
use std::collections::{BTreeMap, HashMap};

/// The families, in the order a cascade is offered to them.
/// The general lowering comes last: it compiles every valid cascade, the others only what
/// they recognize, faster. Linear attention comes before softmax: the softmax family also
/// reads `O = sum_m w(q.k) V` without normalization (sigmoid attention), which includes
/// linear attention, but in the quadratic form; the linear family's kernels are O(N).
pub static FAMILIES: &[&dyn KernelFamily] = &[
    &linear::Linear,
    &softmax::Softmax,
    &projection::Projection,
    &general::General,
];

/// Values of a cascade's inputs and parameters, by tensor.
pub type Inputs = HashMap<Handle<Tensor>, TensorData>;

/// What the user asks of the compile; `None` leaves a choice to the family's cost model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    pub target: Target,
    /// Storage type of the sequence tensors (default: the cascade's).
    pub elem: Option<Elem>,
    /// `--tile RANK=SIZE`: tile sizes by rank name, read by the family that knows the rank.
    pub tiles: Vec<(String, u64)>,
    pub warps: Option<u32>,
    pub stages: Option<u32>,
    pub mma: Option<MmaUnit>,
    /// Who copies the tiles: every thread, or a producer warpgroup.
    pub loads: Option<crate::tile::Loads>,
    /// A persistent grid (one CTA per SM looping over the work tiles) or one CTA per tile.
    pub persistent: Option<bool>,
    /// Softmax: rescale the output lazily (keep a row's max until it grows by 2^8).
    pub lazy_rescale: Option<bool>,
    /// Softmax: store the output by the copy engine through shared memory.
    pub store_tma: Option<bool>,
    /// Softmax: the probabilities of `P V` through shared memory instead of registers.
    pub p_in_shared: Option<bool>,
    /// Softmax: the wait for the deferred `P V` pinned after the next tile's softmax.
    pub pin_deferred_wait: Option<bool>,
    /// Run the rewrite engine first.
    pub optimize: bool,
    /// A family's named strategy (`single`, `chunked`, `lookback` for linear attention).
    pub strategy: Option<String>,
    /// Linear attention, chunked: tokens per chunk.
    pub chunk_tokens: Option<u64>,
}

/// Builds the source of a cascade again with other size bindings.
pub type Instantiate<'a> = dyn Fn(&[(String, u64)]) -> Result<Cascade, CompileError> + 'a;

/// A cascade and the means to see its source at other sizes.
pub struct Request<'a> {
    pub cascade: &'a Cascade,
    pub options: &'a KernelOptions,
    /// The size bindings `cascade` was built with.
    pub defines: &'a [(String, u64)],
    /// The same source built with other size bindings (the linear family confirms its
    /// reading on a small instance).
    pub instantiate: &'a Instantiate<'a>,
}

/// Why a compile failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CompileError {
    /// The options do not fit the kernel (a usage error).
    Usage(String),
    /// The cascade was read, but a size or shape is not supported: a located reason.
    Refused(Box<Diagnostic>),
    /// No family reads the cascade: each family's reason, in [`FAMILIES`] order, with what
    /// the family reads cascades as.
    Unmapped(Vec<(&'static str, Vec<Diagnostic>)>),
    /// The source could not be built at the sizes a family asked for.
    Source(Vec<Diagnostic>),
    /// A failure with no place in the source (the rewrite engine's); the caller names the
    /// file.
    Input(String),
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompileError::Usage(m) | CompileError::Input(m) => f.write_str(m),
            CompileError::Refused(d) => f.write_str(&d.message),
            CompileError::Unmapped(reasons) => {
                let parts: Vec<String> = reasons
                    .iter()
                    .map(|(what, ds)| {
                        let messages: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
                        format!("not {what}: {}", messages.join("; "))
                    })
                    .collect();
                f.write_str(&parts.join("; "))
            }
            CompileError::Source(ds) => {
                let parts: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

impl CompileError {
    /// The error as a user reads it, `render` turning located diagnostics into text against
    /// the source (the front end's renderer): the diagnostics, each family's reason in turn
    /// when none read the cascade. A usage error stays [`CompileError::Usage`] for its exit
    /// code; see [`CompileError::is_usage`].
    pub fn render(self, file_name: &str, render: impl Fn(Vec<Diagnostic>) -> String) -> String {
        match self {
            CompileError::Usage(m) => m,
            CompileError::Refused(d) => render(vec![*d]),
            CompileError::Source(ds) => render(ds),
            CompileError::Input(m) => format!("error: {file_name}: {m}"),
            CompileError::Unmapped(reasons) => reasons
                .into_iter()
                .enumerate()
                .map(|(i, (what, ds))| {
                    let text = render(ds).trim_end().to_string();
                    if i == 0 {
                        text
                    } else {
                        format!("nor as {what}:\n{text}")
                    }
                })
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    /// Whether the command line asked for something the kernel cannot do (exit 2), rather
    /// than the source being wrong for it (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, CompileError::Usage(_))
    }
}

/// Why one family did not compile a cascade.
pub enum FamilyError {
    /// The cascade is not this family's (the reasons): try the next one.
    NotMine(Vec<Diagnostic>),
    /// The cascade is this family's but cannot be compiled as asked: the answer.
    Failed(CompileError),
}

impl FamilyError {
    /// What went wrong, in words (the diagnostics' messages).
    pub fn message(&self) -> String {
        match self {
            FamilyError::NotMine(ds) => {
                let m: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
                m.join("; ")
            }
            FamilyError::Failed(e) => e.to_string(),
        }
    }
}

impl From<CompileError> for FamilyError {
    fn from(e: CompileError) -> Self {
        FamilyError::Failed(e)
    }
}

/// A way of reading cascades as kernels.
pub trait KernelFamily: Sync {
    /// Short name, recorded in manifests (`softmax`).
    fn name(&self) -> &'static str;
    /// What it reads cascades as, for messages (`softmax attention`).
    fn reads_as(&self) -> &'static str;
    fn compile(&self, request: &Request) -> Result<Box<dyn Compiled>, FamilyError>;
}

/// The program a module was printed from (`--emit tile` prints it).
#[derive(Debug, Clone)]
pub enum KernelProgram {
    /// A Tile IR program (the softmax and linear families).
    Tile(Box<TileProgram>),
    /// The general lowering's point program (all of a cascade's kernels).
    Points(Box<general::program::PointProgram>),
}

impl KernelProgram {
    /// The Tile IR program, for the families that print one.
    pub fn tile(&self) -> Option<&TileProgram> {
        match self {
            KernelProgram::Tile(t) => Some(t),
            KernelProgram::Points(_) => None,
        }
    }
}

impl std::fmt::Display for KernelProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelProgram::Tile(t) => t.fmt(f),
            KernelProgram::Points(p) => p.fmt(f),
        }
    }
}

/// One printed kernel with the program it came from and its launch contract.
#[derive(Debug, Clone)]
pub struct Module {
    pub program: KernelProgram,
    pub ptx: PtxKernel,
    pub contract: LaunchContract,
}

/// How a benchmark rates a family's kernels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Tensor-core work: the FLOPs of the score points the masks leave, and the cost
    /// model's predicted time. `at_most`: masks on values (documents) leave an
    /// input-dependent share of them, so the count (band masks only) bounds the work.
    Flops {
        flops: f64,
        predicted_ms: f64,
        at_most: bool,
    },
    /// Sequence throughput: tokens, and the bytes one pass over Q, K, V and O moves.
    Tokens { tokens: f64, bytes: f64 },
    /// The analysis's view: FLOPs, the minimum bytes, and the roofline's lower bound on
    /// the time (the general lowering).
    Roofline {
        flops: f64,
        bytes: f64,
        bound_ms: f64,
    },
}

/// A cascade compiled by a family.
pub trait Compiled: Send + Sync {
    /// The family's [`KernelFamily::name`].
    fn family(&self) -> &'static str;
    /// The cascade the kernels compute (after the family's rewrites, if any).
    fn cascade(&self) -> &Cascade;
    /// The kernels, in launch order for the whole problem.
    fn modules(&self) -> &[Module];
    /// `--emit schedule`: what was chosen and why, in words.
    fn explain(&self) -> String;
    /// The computation by a direct f64 formula on `inputs`, in the output's storage order:
    /// the reference of checks past the interpreter's reach. Its name says which formula.
    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str);
    /// Multiply-adds the cascade interpreter would spend on the whole problem.
    fn interpreter_work(&self) -> u64;
    /// Multiply-adds [`Compiled::formula`] spends, or `None` when the family has no formula
    /// of its own (its `formula` runs the cascade interpreter).
    fn formula_work(&self) -> Option<u64>;
    fn rate(&self) -> Rate;
    /// Told why the families tried before this one did not take the cascade (for
    /// `--emit schedule`).
    fn passed_over(&mut self, _reasons: &[(&'static str, Vec<Diagnostic>)]) {}
    /// Assigns each kernel step of `plan` the kernels it launches (their entries in the
    /// step's `launch`) and returns them; `gpu` sizes the chunking of each window.
    fn plan_modules(&self, plan: &mut Plan, gpu: &GpuModel) -> Result<PlanKernels, String>;
}

/// The kernels a family's plan steps launch.
#[derive(Default)]
pub struct PlanKernels {
    /// Tile (or general) kernels.
    pub modules: Vec<Module>,
    /// Kernels written directly in PTX (the softmax epilogue): text and contract.
    pub ptx: Vec<elementwise::Helper>,
}

impl<'a> dyn Compiled + 'a {
    /// The manifest of the whole-problem kernels.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            format: abi::MANIFEST_FORMAT.to_string(),
            cascade: self.cascade().name.clone(),
            family: self.family().to_string(),
            launch: self.modules().iter().map(|m| m.ptx.entry.clone()).collect(),
            kernels: self.modules().iter().map(|m| m.contract.clone()).collect(),
        }
    }

    /// The kernel that writes the output (the last one launched).
    pub fn main(&self) -> Option<&Module> {
        self.modules().last()
    }
}

/// Offers the cascade to every family in turn.
pub fn compile(request: &Request) -> Result<Box<dyn Compiled>, CompileError> {
    if request.options.mma == Some(MmaUnit::Warpgroup) && request.options.target != Target::Sm90a {
        return Err(CompileError::Usage(
            "error: `--mma wgmma` needs the Hopper instruction set\n  = help: add `--target sm_90a`"
                .into(),
        ));
    }
    // Options that only a wgmma kernel on the Hopper instruction set has: (asked, what it
    // needs, the flag to leave out).
    let o = request.options;
    let hopper_only = [
        (
            o.loads.is_some_and(|l| l.specialized()),
            "`--loads producer` and `--loads pingpong` need wgmma",
            "--loads",
        ),
        (
            o.persistent == Some(true),
            "`--grid persistent` needs a producer warpgroup, which needs wgmma",
            "--grid",
        ),
        (
            o.store_tma == Some(true),
            "`--store tma` needs the copy engine",
            "--store",
        ),
        (
            o.p_in_shared == Some(true),
            "`--probs shared` feeds wgmma's shared-memory operand",
            "--probs",
        ),
        (
            o.pin_deferred_wait == Some(true),
            "`--pv-wait pinned` pins a wgmma wait",
            "--pv-wait",
        ),
    ];
    let sync = o.target != Target::Sm90a || o.mma == Some(MmaUnit::Sync);
    if let Some((_, what, flag)) = hopper_only.iter().find(|(asked, ..)| *asked && sync) {
        return Err(CompileError::Usage(format!(
            "error: {what} on the Hopper instruction set\n  = help: add `--target sm_90a` (and leave out `--mma sync`), or leave out `{flag}`"
        )));
    }
    // Kernel-shape options are meant for the family that reads the cascade: its refusal of
    // them is the answer, not a reason to try another family.
    let shaped = !o.tiles.is_empty()
        || o.warps.is_some()
        || o.stages.is_some()
        || o.mma.is_some()
        || o.loads.is_some()
        || o.persistent.is_some()
        || o.lazy_rescale.is_some()
        || o.store_tma.is_some()
        || o.p_in_shared.is_some()
        || o.pin_deferred_wait.is_some()
        || o.strategy.is_some()
        || o.chunk_tokens.is_some();
    let mut reasons = Vec::new();
    // The softmax and linear readings know forward recurrences only; a reverse one (an
    // adjoint state from `einattn grad`) is the general lowering's.
    let reverse = request
        .cascade
        .einsums
        .iter()
        .find(|(_, e)| e.recurrence.as_ref().is_some_and(|r| r.reverse))
        .map(|(_, e)| e.span);
    for (k, family) in FAMILIES.iter().enumerate() {
        let last = k + 1 == FAMILIES.len() || shaped;
        if let (Some(span), false) = (reverse, k + 1 == FAMILIES.len()) {
            let d = Diagnostic::error(
                DiagnosticKind::NotMappable,
                format!(
                    "`{}` has a reverse recurrence, which only the general lowering runs",
                    request.cascade.name
                ),
                span,
            )
            .with_label("a recurrence that runs down its rank");
            reasons.push((family.reads_as(), vec![d]));
            continue;
        }
        match family.compile(request) {
            Ok(mut compiled) => {
                compiled.passed_over(&reasons);
                return Ok(compiled);
            }
            // A family that reads the cascade but cannot compile its sizes or shapes leaves
            // it to the next (the general lowering takes every valid cascade).
            Err(FamilyError::Failed(CompileError::Refused(d))) if !last => {
                reasons.push((family.reads_as(), vec![*d]))
            }
            Err(FamilyError::Failed(e)) => return Err(e),
            Err(FamilyError::NotMine(d)) => reasons.push((family.reads_as(), d)),
        }
    }
    Err(CompileError::Unmapped(reasons))
}

/// Why each family passed a cascade over, one line each: what it reads the cascade as,
/// then its reasons (for a later family's `--emit schedule`).
pub(crate) fn reasons_in_words(reasons: &[(&'static str, Vec<Diagnostic>)]) -> Vec<String> {
    reasons
        .iter()
        .map(|(what, ds)| {
            let why: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
            format!("{what}: {}", why.join("; "))
        })
        .collect()
}

/// The kernels a family's backward fast path builds for `einattn grad`'s cascade (which
/// stays their specification, and so their formula).
pub struct GradientKernels {
    pub family: &'static str,
    pub cascade: Cascade,
    pub modules: Vec<Module>,
    pub explain: String,
    pub rate: Rate,
    /// Multiply-adds of the interpreter (and so of the formula) on the backward cascade.
    pub work: u64,
}

impl Compiled for GradientKernels {
    fn family(&self) -> &'static str {
        self.family
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        self.explain.clone()
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        interpreter_formula(self, inputs)
    }

    fn interpreter_work(&self) -> u64 {
        self.work
    }

    fn formula_work(&self) -> Option<u64> {
        None
    }

    fn rate(&self) -> Rate {
        self.rate
    }

    fn plan_modules(&self, _plan: &mut Plan, _gpu: &GpuModel) -> Result<PlanKernels, String> {
        Err("sequence-parallel plans of backward kernels are not built yet".into())
    }
}

/// [`Compiled::formula`] for a family with no formula faster than its cascade: the
/// interpreter, on the main output (the one every caller of `formula` compares, whatever
/// order the outputs have).
pub fn interpreter_formula(compiled: &dyn Compiled, inputs: &Inputs) -> (Vec<f64>, &'static str) {
    let cascade = compiled.cascade();
    let manifest = compiled.manifest();
    let out = manifest
        .main_output()
        .and_then(|name| cascade.tensor_by_name(name));
    let values = einattn_ir::interp::evaluate_in_order(
        cascade,
        inputs,
        &einattn_ir::validate::topological_order(cascade),
    );
    let values = match (values, out) {
        (Ok(v), Some(o)) => v
            .get(o)
            .map(|d| d.stored().into_owned())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    (values, "the cascade interpreter (f64)")
}

/// Compiles the backward cascade of `grad` (in `request`): the backward kernels of the
/// family that reads the forward (`forward`: its cascade, the size bindings it was built
/// with and the means to build it at others) as softmax or linear attention, with the
/// backward as its gradient; else the families in turn on the backward cascade itself.
pub fn compile_gradient(
    forward: &Request,
    grad: &einattn_passes::grad::Grad,
    request: &Request,
) -> Result<Box<dyn Compiled>, CompileError> {
    let o = request.options;
    // Kernel-shape options asked of a family's kernels: its refusal is the answer (the
    // linear family also takes a strategy and a chunk size).
    let shaped = !o.tiles.is_empty() || o.warps.is_some() || o.mma.is_some();
    let linear_shaped = shaped || o.strategy.is_some() || o.chunk_tokens.is_some();
    let mut reasons = Vec::new();
    let reason = |e: FamilyError, shaped: bool| match e {
        FamilyError::Failed(CompileError::Refused(d)) if !shaped => Ok(vec![*d]),
        FamilyError::Failed(e) => Err(e),
        FamilyError::NotMine(d) => Ok(d),
    };
    match softmax::gradient::compile_gradient(forward.cascade, grad, request.options) {
        Ok(kernels) => return Ok(Box::new(kernels)),
        Err(e) => reasons.push(("the backward of softmax attention", reason(e, shaped)?)),
    }
    match linear::gradient::compile_gradient(forward, grad) {
        Ok(kernels) => return Ok(Box::new(kernels)),
        Err(e) => reasons.push((
            "the backward of linear attention",
            reason(e, linear_shaped)?,
        )),
    }
    let mut compiled = compile(request)?;
    compiled.passed_over(&reasons);
    Ok(compiled)
}

/// What a contract's pointer, size, stride and scalar parameters are in the cascade: the
/// tile program's ids mapped to cascade names.
pub struct ContractNames {
    pub tensors: Vec<String>,
    pub head_params: Vec<String>,
    pub scalars: Vec<(String, Option<f64>)>,
    pub tokens: Vec<String>,
    pub states: Vec<String>,
    pub row_outputs: Vec<String>,
    /// The scratch arrays a merge program's row inputs read.
    pub row_inputs: Vec<String>,
}

/// The contract parameters of a tile program's ABI, named by what they are in the cascade.
pub fn contract_params(abi: &[AbiParam], names: &ContractNames) -> Vec<ContractParam> {
    abi.iter()
        .map(|p| {
            let size = |s: &str| Source::Size { size: s.into() };
            let stride = |t: &String, axis| Source::Stride {
                tensor: t.clone(),
                axis,
            };
            use abi::Axis::{Batch, Head, Seq};
            let from = match &p.role {
                AbiRole::TensorPtr(t) => Source::Tensor {
                    tensor: names.tensors[t.index()].clone(),
                },
                AbiRole::HeadParamPtr(h) => Source::Tensor {
                    tensor: names.head_params[h.index()].clone(),
                },
                AbiRole::TokenPtr(t) => Source::Tensor {
                    tensor: names.tokens[t.index()].clone(),
                },
                AbiRole::StatePtr(s) => Source::Scratch {
                    scratch: names.states[s.index()].clone(),
                },
                AbiRole::RowOutputPtr(r) => Source::Scratch {
                    scratch: names.row_outputs[r.index()].clone(),
                },
                AbiRole::RowInputPtr(r) => Source::Scratch {
                    scratch: names.row_inputs[r.index()].clone(),
                },
                AbiRole::LookBackFlags => Source::Scratch {
                    scratch: "look_back_flags".into(),
                },
                AbiRole::ChunkBase => size("chunk_base"),
                AbiRole::ChunkTotal => size("chunk_total"),
                AbiRole::QueryOffset => size("q_offset"),
                AbiRole::QueryLen => size("n_q"),
                AbiRole::KeyLen => size("n_k"),
                AbiRole::Heads => size("heads"),
                AbiRole::KvGroup => size("kv_group"),
                AbiRole::Batch => size("batch"),
                AbiRole::StrideBatch(t) => stride(&names.tensors[t.index()], Batch),
                AbiRole::StrideSeq(t) => stride(&names.tensors[t.index()], Seq),
                AbiRole::StrideHead(t) => stride(&names.tensors[t.index()], Head),
                AbiRole::TokenStrideBatch(t) => stride(&names.tokens[t.index()], Batch),
                AbiRole::TokenStrideSeq(t) => stride(&names.tokens[t.index()], Seq),
                AbiRole::TokenStrideHead(t) => stride(&names.tokens[t.index()], Head),
                AbiRole::Scalar(s) => Source::Scalar {
                    param: names.scalars[s.index()].0.clone(),
                    default: names.scalars[s.index()].1,
                },
                AbiRole::TensorMap {
                    tensor,
                    rows,
                    cols,
                    rank,
                } => Source::TensorMap {
                    tensor: names.tensors[tensor.index()].clone(),
                    seq: match rank {
                        SeqRank::Query => "n_q",
                        SeqRank::Key => "n_k",
                    }
                    .into(),
                    heads_per: (*rank == SeqRank::Key).then(|| "kv_group".into()),
                    box_rows: *rows,
                    box_cols: *cols,
                },
            };
            ContractParam {
                name: p.name.clone(),
                ty: match p.kind {
                    AbiKind::Ptr => abi::ParamType::Ptr,
                    AbiKind::U32 => abi::ParamType::U32,
                    AbiKind::U64 => abi::ParamType::U64,
                    AbiKind::F32 => abi::ParamType::F32,
                    AbiKind::TensorMap => abi::ParamType::TensorMap,
                },
                from,
            }
        })
        .collect()
}

/// The grid of a tile program: `(ceil(n_q / block_m), batch * heads, 1)` for a query-tiled
/// program; `(column blocks, batch * heads, chunks)` for a sequential one.
pub fn grid_formula(ptx: &PtxKernel) -> [GridAxis; 3] {
    let rows = GridAxis::ceil_div(&["batch", "heads"], 1);
    if let Some(ctas) = ptx.persistent_ctas {
        // A persistent grid: CTAs loop over the work tiles, so any count is correct;
        // `ceil(n_q B H / block_m)` (at most the `ceil(n_q / block_m) B H` tiles) keeps none
        // idle at small sizes.
        let tiles = GridAxis {
            at_least: 1,
            at_most: Some(u64::from(ctas)),
            ..GridAxis::ceil_div(&["n_q", "batch", "heads"], u64::from(ptx.block_m))
        };
        return [tiles, GridAxis::fixed(1), GridAxis::fixed(1)];
    }
    match ptx.col_blocks {
        None => [
            GridAxis::ceil_div(&["n_q"], u64::from(ptx.block_m)),
            rows,
            GridAxis::fixed(u64::from(ptx.key_splits)),
        ],
        Some(cb) => [
            GridAxis::fixed(u64::from(cb)),
            rows,
            match ptx.chunk_tiles {
                Some(ct) => GridAxis {
                    sizes: vec!["n_q".into()],
                    divide_by: u64::from(ptx.block_m) * u64::from(ct),
                    at_least: 1,
                    at_most: None,
                    times: 1,
                },
                None => GridAxis::fixed(1),
            },
        ],
    }
}

/// The parts of a contract every family fills the same way.
pub struct ContractParts {
    pub sizes: BTreeMap<String, u64>,
    pub tensors: Vec<ContractTensor>,
    pub scratch: Vec<abi::Scratch>,
    pub names: ContractNames,
    pub requires: Vec<String>,
    pub family: serde_json::Value,
}

/// The launch contract of `ptx`, whose grid is evaluated at `parts.sizes`.
pub fn contract(ptx: &PtxKernel, parts: ContractParts) -> Result<LaunchContract, CompileError> {
    let grid_formula = grid_formula(ptx);
    let mut c = LaunchContract {
        kernel: ptx.entry.clone(),
        ptx: format!("{}.ptx", ptx.entry),
        target: ptx.target.name().to_string(),
        block: [ptx.threads, 1, 1],
        grid: [0; 3],
        grid_formula,
        dynamic_shared_bytes: ptx.dynamic_smem_bytes,
        sizes: parts.sizes,
        tensors: parts.tensors,
        scratch: parts.scratch,
        params: contract_params(&ptx.abi, &parts.names),
        requires: parts.requires,
        family: parts.family,
    };
    c.grid = c.compiled_grid().map_err(|e| {
        CompileError::Refused(Box::new(Diagnostic::error(
            einattn_ir::validate::DiagnosticKind::UnsupportedShape,
            format!("the problem is too large for one launch: {e}"),
            einattn_ir::cascade::Span::UNKNOWN,
        )))
    })?;
    Ok(c)
}

/// A cascade tensor as a contract records it.
pub fn contract_tensor(
    cascade: &Cascade,
    t: Handle<Tensor>,
    role: abi::TensorRole,
    dtype: abi::Dtype,
    layout: Option<&Layout>,
) -> ContractTensor {
    let tensor = &cascade.tensors[t];
    ContractTensor {
        name: tensor.name.clone(),
        role,
        dtype,
        shape: tensor
            .ranks
            .iter()
            .map(|&r| cascade.ranks[r].extent)
            .collect(),
        strides: layout.map(Layout::strides),
    }
}

/// The contract dtype of a storage element type.
pub fn dtype(elem: Elem) -> abi::Dtype {
    match elem {
        Elem::Bf16 => abi::Dtype::Bf16,
        Elem::F16 => abi::Dtype::F16,
        Elem::F32 => abi::Dtype::F32,
    }
}

/// A tile-program or PTX error as a refusal of the cascade.
pub fn backend_error(e: crate::TileError) -> CompileError {
    CompileError::Refused(Box::new(Diagnostic::error(
        einattn_ir::validate::DiagnosticKind::UnsupportedShape,
        e.to_string(),
        einattn_ir::cascade::Span::UNKNOWN,
    )))
}

/// Turns the contract's tensors named in `names` into scratch arrays: pointers to them
/// read the scratch, strides along them become sizes (`NAME_stride_AXIS`, the scratch is
/// laid out at the compiled sizes).
pub(crate) fn tensors_to_scratch(
    c: &mut LaunchContract,
    names: &[String],
    what: &dyn Fn(&str) -> String,
) -> Result<(), CompileError> {
    let axis_name = |a: abi::Axis| match a {
        abi::Axis::Batch => "batch",
        abi::Axis::Seq => "seq",
        abi::Axis::Head => "head",
    };
    for name in names {
        let Some(pos) = c.tensors.iter().position(|t| &t.name == name) else {
            continue;
        };
        let t = c.tensors.remove(pos);
        for p in &mut c.params {
            match &p.from {
                Source::Tensor { tensor } if tensor == name => {
                    p.from = Source::Scratch {
                        scratch: name.clone(),
                    }
                }
                Source::Stride { tensor, axis } if tensor == name => {
                    let size = format!("{name}_stride_{}", axis_name(*axis));
                    let stride = t
                        .strides
                        .map(|s| s.along(*axis))
                        .ok_or_else(|| CompileError::Input(format!("`{name}` has no strides")))?;
                    c.sizes.insert(size.clone(), stride);
                    p.from = Source::Size { size };
                }
                _ => {}
            }
        }
        c.scratch.push(abi::Scratch {
            name: name.clone(),
            dtype: t.dtype,
            elements: t.elements(),
            zero_before_launch: false,
            what: what(name),
        });
    }
    c.check().map_err(CompileError::Input)
}
