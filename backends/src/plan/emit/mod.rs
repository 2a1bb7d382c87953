//! Lowers the planner's chosen scheme to a [`Plan`]: buffers, kernel launches, NCCL calls
//! and local combine steps per rank.
//!
//! Buffer conventions (every scheme):
//! - a query-side input `T` (Q) lives in buffer `T`, one block per chunk the rank holds;
//! - key-side inputs (K, V) live together in buffer `kv`: per chunk, each tensor's block in
//!   declaration order, so one NCCL call moves all of them;
//! - in one-rank cascades (Lightning) every sequence input has its own buffer `T`;
//! - parameters are whole (or the rank's heads, for Ulysses), outputs one block per chunk;
//! - carried statistics of a query chunk (softmax: max, sum, numerator) are contiguous in
//!   `stats<i>`, state by state, each at its final-step shape.

mod allgather_kv;
mod lasp;
mod ring;
mod ulysses;

use super::format::*;
use allgather_kv::emit_allgather_kv;
use einattn_ir::interp::shape_of;
use einattn_ir::{Cascade, DType, Handle, Rank, Tensor, TensorKind};
use einattn_passes::sp::local::{self, InitSource, LocalSpec, Window};
use einattn_passes::sp::schemes::{self, PairAnalyzer};
use einattn_passes::sp::{
    Classification, PairMask, SchemeKind, SpDecision, SpError, StateRole, TokenRange,
};
use lasp::emit_lasp;
use ring::emit_softmax;
use ulysses::emit_ulysses;

#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    Sp(SpError),
    Unsupported(String),
    Execution(String),
    /// Writing the plan failed.
    Io(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Sp(e) => write!(f, "{e}"),
            PlanError::Unsupported(m) => write!(f, "cannot emit a plan: {m}"),
            PlanError::Execution(m) => write!(f, "plan execution: {m}"),
            PlanError::Io(m) => write!(f, "cannot write the plan: {m}"),
        }
    }
}

impl std::error::Error for PlanError {}

impl From<SpError> for PlanError {
    fn from(e: SpError) -> Self {
        PlanError::Sp(e)
    }
}

const COMPUTE: &str = "compute";
const COMM: &str = "comm";

fn dtype_name(t: &Tensor) -> String {
    t.dtype.unwrap_or(DType::F32).name().to_string()
}

/// Which side of the split a tensor's sequence dimension is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Query,
    Key,
    /// Lightning: one rank is both.
    Sequence,
    None,
}

struct Ctx<'a> {
    cascade: &'a Cascade,
    cls: &'a Classification,
    devices: u64,
    zigzag: bool,
    head_rank: Option<Handle<Rank>>,
    kernel: String,
}

impl Ctx<'_> {
    fn side(&self, t: Handle<Tensor>) -> Side {
        let ranks = &self.cascade.tensors[t].ranks;
        let q = ranks.contains(&self.cls.seq.query.declared);
        let k = ranks.contains(&self.cls.seq.key.declared);
        match (q, k) {
            _ if self.cls.seq.single_rank() && q => Side::Sequence,
            (true, false) => Side::Query,
            (false, true) => Side::Key,
            (true, true) => Side::Sequence,
            _ => Side::None,
        }
    }

    /// The shape of tensor `t` with the sequence dims at `q_len` / `k_len` and the head
    /// dim at `h_len`; the iterative dimension is dropped (a state's final step).
    fn local_shape(
        &self,
        t: Handle<Tensor>,
        q_len: u64,
        k_len: u64,
        h_len: Option<u64>,
    ) -> Vec<u64> {
        let tensor = &self.cascade.tensors[t];
        tensor
            .ranks
            .iter()
            .enumerate()
            .filter(|(d, _)| Some(*d) != tensor.iterative)
            .map(|(d, &r)| {
                if r == self.cls.seq.query.declared {
                    q_len
                } else if r == self.cls.seq.key.declared {
                    k_len
                } else if Some(r) == self.head_rank && h_len.is_some() {
                    h_len.unwrap_or(0)
                } else if r == self.cls.seq.query.outer || r == self.cls.seq.key.outer {
                    // A state over the other sequence leaf (per-query statistics carry p).
                    self.cascade.dim_extent(t, d)
                } else {
                    self.cascade.dim_extent(t, d)
                }
            })
            .collect()
    }

    fn dim_of(&self, t: Handle<Tensor>, rank: Handle<Rank>) -> Option<usize> {
        self.cascade.tensors[t]
            .ranks
            .iter()
            .position(|&r| r == rank)
    }

    fn seq_dim(&self, t: Handle<Tensor>) -> Option<usize> {
        self.dim_of(t, self.cls.seq.query.declared)
            .or_else(|| self.dim_of(t, self.cls.seq.key.declared))
    }

    fn chunks(&self, rank: u64) -> Vec<TokenRange> {
        schemes::device_chunks(self.cls.seq.tokens, self.devices, self.zigzag, rank)
    }

    /// Input and parameter tensors the Einsums in `einsums` (with what they depend on) read.
    fn inputs_read(&self, einsums: &[Handle<einattn_ir::Einsum>]) -> Vec<Handle<Tensor>> {
        let order = local::dependency_order(self.cascade, einsums);
        let mut out: Vec<Handle<Tensor>> = Vec::new();
        for h in order {
            let e = &self.cascade.einsums[h];
            let mut add = |t: Handle<Tensor>| {
                if matches!(
                    self.cascade.tensors[t].kind,
                    TensorKind::Input | TensorKind::Param
                ) && !out.contains(&t)
                {
                    out.push(t);
                }
            };
            e.expr.visit_accesses(&mut |a| add(a.tensor));
            if let Some(rec) = &e.recurrence {
                rec.init.visit_accesses(&mut |a| add(a.tensor));
            }
        }
        out.sort();
        out
    }

    fn seq_inputs(&self, side: Side) -> Vec<Handle<Tensor>> {
        self.cascade
            .tensors
            .iter()
            .filter(|(h, t)| t.kind == TensorKind::Input && self.side(*h) == side)
            .map(|(h, _)| h)
            .collect()
    }

    fn params(&self) -> Vec<Handle<Tensor>> {
        self.cascade
            .tensors
            .iter()
            .filter(|(h, t)| t.kind == TensorKind::Param && self.side(*h) == Side::None)
            .map(|(h, _)| h)
            .collect()
    }

    fn outputs(&self) -> Vec<Handle<Tensor>> {
        self.cascade.outputs().collect()
    }

    fn elements(shape: &[u64]) -> u64 {
        shape.iter().product()
    }

    fn grid(&self, queries: TokenRange, heads: Option<u64>) -> [u64; 3] {
        let parallel: u64 = self
            .cascade
            .parallel_ranks()
            .iter()
            .filter(|&&r| !self.cls.seq.is_sequence_leaf(r))
            .map(|&r| {
                if Some(r) == self.head_rank {
                    heads.unwrap_or(self.cascade.ranks[r].extent)
                } else {
                    self.cascade.ranks[r].extent
                }
            })
            .product();
        [queries.len.div_ceil(64).max(1), parallel.max(1), 1]
    }
}

/// Tensors laid out in a buffer: (tensor, shape, offset).
type Placed = Vec<(Handle<Tensor>, Vec<u64>, u64)>;

/// Per-rank buffers, steps and output pieces under construction.
struct RankBuilder {
    rank: u64,
    buffers: Vec<Buffer>,
    steps: Vec<Step>,
    outputs: Vec<Piece>,
    events: u64,
}

impl RankBuilder {
    fn new(rank: u64) -> Self {
        RankBuilder {
            rank,
            buffers: Vec::new(),
            steps: Vec::new(),
            outputs: Vec::new(),
            events: 0,
        }
    }

    fn buffer(&mut self, name: &str, dtype: &str, elements: u64, init: BufferInit) -> String {
        self.buffers.push(Buffer {
            name: name.to_string(),
            dtype: dtype.to_string(),
            elements,
            init,
        });
        name.to_string()
    }

    fn event(&mut self) -> String {
        self.events += 1;
        format!("e{}", self.events)
    }

    fn exec(stream: &str, wait: Vec<String>, record: Option<String>) -> Exec {
        Exec {
            stream: stream.to_string(),
            wait,
            record,
        }
    }

    fn finish(mut self) -> RankPlan {
        // Scratch that no step of this rank ended up using (the second ring buffer with
        // one transfer, the merge scratch of a rank with one pair) is not allocated.
        let steps = &self.steps;
        self.buffers.retain(|b| {
            !matches!(b.init, BufferInit::Uninit)
                || steps
                    .iter()
                    .flat_map(|s| s.regions())
                    .any(|r| r.buffer == b.name)
        });
        RankPlan {
            rank: self.rank,
            buffers: self.buffers,
            steps: self.steps,
            outputs: self.outputs,
        }
    }
}

fn region(buffer: &str, offset: u64, count: u64) -> Region {
    Region {
        buffer: buffer.to_string(),
        offset,
        count,
    }
}

/// One rank's steps of a scheme (the kind says which of an emitter's schemes).
type EmitRank = fn(&Ctx, &mut RankBuilder, SchemeKind, &mut PairAnalyzer) -> Result<(), PlanError>;

/// The emitter of every scheme: adding a scheme is its file here and one line.
const EMITTERS: &[(SchemeKind, EmitRank)] = &[
    (SchemeKind::Lasp2, emit_lasp),
    (SchemeKind::Lasp1, emit_lasp),
    (SchemeKind::AllGatherKv, emit_softmax),
    (SchemeKind::Ring, emit_softmax),
    (SchemeKind::TokenRing, emit_softmax),
    (SchemeKind::Ulysses, emit_ulysses),
];

/// Emits the plan for the decision's chosen scheme.
pub fn emit_plan(cascade: &Cascade, decision: &SpDecision) -> Result<Plan, PlanError> {
    let cls = &decision.classification;
    let scheme = decision.chosen;
    let devices = decision.report.devices;
    let ctx = Ctx {
        cascade,
        cls,
        devices,
        zigzag: scheme.zigzag,
        head_rank: scheme.head_rank,
        kernel: cascade.name.clone(),
    };
    let mut analyzer = PairAnalyzer::new(cascade, cls, Default::default());
    let mut ranks = Vec::new();
    for r in 0..devices {
        let mut b = RankBuilder::new(r);
        let emit = EMITTERS
            .iter()
            .find(|(kind, _)| *kind == scheme.kind)
            .map(|(_, emit)| *emit)
            .ok_or_else(|| PlanError::Unsupported(format!("no emitter for `{}`", scheme.name())))?;
        emit(&ctx, &mut b, scheme.kind, &mut analyzer)?;
        ranks.push(b.finish());
    }
    let predicted_ms = decision
        .report
        .estimates
        .iter()
        .find(|e| e.scheme == decision.report.chosen)
        .map(|e| e.total_s * 1e3)
        .unwrap_or(0.0);
    // Rounded to a nanosecond so the value survives a JSON round trip unchanged.
    let predicted_ms = (predicted_ms * 1e6).round() / 1e6;
    let name = |r: Handle<Rank>| cascade.ranks[r].name.clone();
    let mut phases: Vec<Phase> = Vec::new();
    for rp in &ranks {
        for s in &rp.steps {
            if let Step::Kernel(k) = s {
                if !phases.contains(&k.phase) {
                    phases.push(k.phase);
                }
            }
        }
    }
    Ok(Plan {
        format: FORMAT.to_string(),
        kernel: cascade.name.clone(),
        scheme: scheme.name(),
        world_size: devices,
        sequence: SequenceInfo {
            query_rank: name(cls.seq.query.declared),
            key_rank: name(cls.seq.key.declared),
            tokens: cls.seq.tokens,
            zigzag: scheme.zigzag,
            head_rank: scheme
                .head_rank
                .filter(|_| scheme.kind == SchemeKind::Ulysses)
                .map(name),
        },
        tensors: cascade
            .tensors
            .iter()
            .filter(|(_, t)| t.kind != TensorKind::Temp)
            .map(|(h, t)| GlobalTensor {
                name: t.name.clone(),
                kind: match t.kind {
                    TensorKind::Input => "input",
                    TensorKind::Param => "param",
                    _ => "output",
                }
                .to_string(),
                dtype: dtype_name(t),
                dims: t.ranks.iter().map(|&r| name(r)).collect(),
                shape: shape_of(cascade, h).iter().map(|&x| x as u64).collect(),
            })
            .collect(),
        kernels: phases
            .iter()
            .map(|&p| KernelInfo {
                name: format!("{}.{}", ctx.kernel, phase_name(p)),
                phase: p,
                description: phase_description(p).to_string(),
            })
            .collect(),
        streams: vec![COMPUTE.to_string(), COMM.to_string()],
        predicted_ms,
        ranks,
    })
}

pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Full => "full",
        Phase::StateOnly => "state_only",
        Phase::OutputWithPrefix => "output_with_prefix",
        Phase::Partial => "partial_with_lse",
        Phase::Epilogue => "epilogue",
    }
}

fn phase_description(p: Phase) -> &'static str {
    match p {
        Phase::Full => "the whole cascade over the launch's queries, keys and heads",
        Phase::StateOnly => "the carried linear states from zero over the chunk, and their cumulative decay; no outputs",
        Phase::OutputWithPrefix => "the whole cascade with the carried states starting from state_in",
        Phase::Partial => "everything before the epilogue over one key range; writes final statistics (max, sums)",
        Phase::Epilogue => "the Einsums after the statistics are final, from merged statistics",
    }
}

fn kernel_name(ctx: &Ctx, p: Phase) -> String {
    format!("{}.{}", ctx.kernel, phase_name(p))
}

/// Buffers for the sequence inputs (one-rank cascades), parameters and outputs of `b`'s
/// chunks; returns nothing, the names are the tensors'.
fn data_buffers(
    ctx: &Ctx,
    b: &mut RankBuilder,
    chunks: &[TokenRange],
    sides: &[Side],
    heads: Option<TokenRange>,
) {
    let cascade = ctx.cascade;
    for side in sides {
        for t in ctx.seq_inputs(*side) {
            let tensor = &cascade.tensors[t];
            let mut pieces = Vec::new();
            let mut offset = 0;
            for c in chunks {
                let shape = ctx.local_shape(t, c.len, c.len, heads.map(|h| h.len));
                pieces.push(Piece {
                    tensor: tensor.name.clone(),
                    buffer: tensor.name.clone(),
                    offset,
                    slices: piece_slices(ctx, t, *c, heads),
                });
                offset += Ctx::elements(&shape);
            }
            b.buffer(
                &tensor.name,
                &dtype_name(tensor),
                offset,
                BufferInit::Pieces { pieces },
            );
        }
    }
    for t in ctx.params() {
        let tensor = &cascade.tensors[t];
        let shape = ctx.local_shape(t, 0, 0, heads.map(|h| h.len));
        let slices = match (heads, ctx.head_rank.and_then(|h| ctx.dim_of(t, h))) {
            (Some(h), Some(dim)) => vec![DimSlice {
                dim,
                start: h.start,
                len: h.len,
            }],
            _ => Vec::new(),
        };
        b.buffer(
            &tensor.name,
            &dtype_name(tensor),
            Ctx::elements(&shape),
            BufferInit::Pieces {
                pieces: vec![Piece {
                    tensor: tensor.name.clone(),
                    buffer: tensor.name.clone(),
                    offset: 0,
                    slices,
                }],
            },
        );
    }
}

fn piece_slices(
    ctx: &Ctx,
    t: Handle<Tensor>,
    chunk: TokenRange,
    heads: Option<TokenRange>,
) -> Vec<DimSlice> {
    let mut slices = Vec::new();
    if let Some(dim) = ctx.seq_dim(t) {
        slices.push(DimSlice {
            dim,
            start: chunk.start,
            len: chunk.len,
        });
    }
    if let (Some(h), Some(dim)) = (heads, ctx.head_rank.and_then(|hr| ctx.dim_of(t, hr))) {
        slices.push(DimSlice {
            dim,
            start: h.start,
            len: h.len,
        });
    }
    slices
}

/// Output buffers: one block per chunk, with the pieces that send them to the global outputs.
fn output_buffers(ctx: &Ctx, b: &mut RankBuilder, chunks: &[TokenRange]) {
    for t in ctx.outputs() {
        let tensor = &ctx.cascade.tensors[t];
        let mut offset = 0;
        for c in chunks {
            let shape = ctx.local_shape(t, c.len, c.len, None);
            b.outputs.push(Piece {
                tensor: tensor.name.clone(),
                buffer: tensor.name.clone(),
                offset,
                slices: piece_slices(ctx, t, *c, None),
            });
            offset += Ctx::elements(&shape);
        }
        b.buffer(
            &tensor.name,
            &dtype_name(tensor),
            offset,
            BufferInit::Uninit,
        );
    }
}

/// Arguments for the inputs and parameters `einsums` read, for one chunk held at block
/// `block` of the per-tensor buffers.
fn plain_args(
    ctx: &Ctx,
    einsums: &[Handle<einattn_ir::Einsum>],
    chunk: TokenRange,
    block: u64,
) -> Vec<KernelArg> {
    let mut args = Vec::new();
    for t in ctx.inputs_read(einsums) {
        let tensor = &ctx.cascade.tensors[t];
        let shape = ctx.local_shape(t, chunk.len, chunk.len, None);
        let n = Ctx::elements(&shape);
        let (role, offset) = if tensor.kind == TensorKind::Param {
            (ArgRole::Param, 0)
        } else {
            (ArgRole::Input, block * n)
        };
        args.push(KernelArg {
            tensor: tensor.name.clone(),
            role,
            key_chunk: None,
            shape,
            region: region(&tensor.name, offset, n),
        });
    }
    args
}

/// Arguments for the query-side inputs of a `q_len x k_len` launch, held at block `block`
/// of `buffer` (`source = (buffer, block)`).
fn query_args(
    ctx: &Ctx,
    inputs: &[Handle<Tensor>],
    q_len: u64,
    k_len: u64,
    (buffer, block): (&str, u64),
) -> Vec<KernelArg> {
    inputs
        .iter()
        .map(|&t| {
            let shape = ctx.local_shape(t, q_len, k_len, None);
            let n = Ctx::elements(&shape);
            KernelArg {
                tensor: ctx.cascade.tensors[t].name.clone(),
                role: ArgRole::Input,
                key_chunk: None,
                shape,
                region: region(buffer, block * n, n),
            }
        })
        .collect()
}

/// Arguments for every parameter, each whole in the buffer named after it.
fn param_args(ctx: &Ctx) -> Vec<KernelArg> {
    ctx.params()
        .into_iter()
        .map(|t| {
            let shape = ctx.local_shape(t, 0, 0, None);
            let n = Ctx::elements(&shape);
            KernelArg {
                tensor: ctx.cascade.tensors[t].name.clone(),
                role: ArgRole::Param,
                key_chunk: None,
                shape,
                region: region(&ctx.cascade.tensors[t].name, 0, n),
            }
        })
        .collect()
}

fn output_args(ctx: &Ctx, chunk: TokenRange, block: u64) -> Vec<KernelArg> {
    ctx.outputs()
        .into_iter()
        .map(|t| {
            let tensor = &ctx.cascade.tensors[t];
            let shape = ctx.local_shape(t, chunk.len, chunk.len, None);
            let n = Ctx::elements(&shape);
            KernelArg {
                tensor: tensor.name.clone(),
                role: ArgRole::Output,
                key_chunk: None,
                shape,
                region: region(&tensor.name, block * n, n),
            }
        })
        .collect()
}

fn unreachable_kind(kind: SchemeKind) -> Result<(), PlanError> {
    Err(PlanError::Unsupported(format!(
        "{kind:?} is not a softmax scheme"
    )))
}

/// The buffer holding the query-side inputs (one query-side input: its name).
fn query_buffer(ctx: &Ctx) -> String {
    ctx.seq_inputs(Side::Query)
        .first()
        .map(|&t| ctx.cascade.tensors[t].name.clone())
        .unwrap_or_else(|| "Q".to_string())
}

fn query_block(ctx: &Ctx, q_len: u64) -> (u64, String) {
    match ctx.seq_inputs(Side::Query).first() {
        Some(&t) => (
            Ctx::elements(&ctx.local_shape(t, q_len, q_len, None)),
            dtype_name(&ctx.cascade.tensors[t]),
        ),
        None => (0, "bf16".to_string()),
    }
}

fn kv_dtype(ctx: &Ctx) -> String {
    let dtypes: Vec<String> = ctx
        .seq_inputs(Side::Key)
        .iter()
        .map(|&t| dtype_name(&ctx.cascade.tensors[t]))
        .collect();
    dtypes
        .first()
        .cloned()
        .unwrap_or_else(|| "bf16".to_string())
}
