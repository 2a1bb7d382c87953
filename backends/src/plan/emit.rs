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

use super::format::*;
use einattn_ir::interp::shape_of;
use einattn_ir::{Cascade, DType, Handle, Rank, Tensor, TensorKind};
use einattn_passes::sp::local::{self, InitSource, LocalSpec, Window};
use einattn_passes::sp::schemes::{self, PairAnalyzer};
use einattn_passes::sp::{
    Classification, PairMask, SchemeKind, SpDecision, SpError, StateRole, TokenRange,
};

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

    fn finish(self) -> RankPlan {
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
        match scheme.kind {
            SchemeKind::Lasp2 | SchemeKind::Lasp1 => {
                emit_lasp(&ctx, &mut b, scheme.kind == SchemeKind::Lasp2)?
            }
            SchemeKind::AllGatherKv | SchemeKind::Ring | SchemeKind::TokenRing => {
                emit_softmax(&ctx, &mut b, scheme.kind, &mut analyzer)?
            }
            SchemeKind::Ulysses => emit_ulysses(&ctx, &mut b)?,
        }
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

/// LASP-2 (`gather`) or LASP-1 on a one-rank cascade with linear fixed-size states.
fn emit_lasp(ctx: &Ctx, b: &mut RankBuilder, gather: bool) -> Result<(), PlanError> {
    let cascade = ctx.cascade;
    let cls = ctx.cls;
    let r = b.rank;
    let p = ctx.devices;
    let chunk = ctx.chunks(r)[0];
    data_buffers(ctx, b, &[chunk], &[Side::Sequence], None);
    output_buffers(ctx, b, &[chunk]);

    // Slot layout: every state, then every state's decay, as the state-only kernel writes.
    let states: Vec<Handle<Tensor>> = cls.states.iter().map(|s| s.state).collect();
    let spec = LocalSpec {
        windows: vec![Window {
            rank: cls.seq.query.declared,
            start: chunk.start,
            len: chunk.len,
        }],
        inits: states.iter().map(|&s| (s, InitSource::Zero)).collect(),
        finals_from_input: Vec::new(),
        track_decay: states.clone(),
    };
    let local = local::localize(cascade, &spec)?;
    let mut combine_states = Vec::new();
    let mut state_args = Vec::new();
    let mut offset = 0u64;
    let mut out_offset = 0u64;
    for s in &cls.states {
        let shape = ctx.local_shape(s.state, chunk.len, chunk.len, None);
        let n = Ctx::elements(&shape);
        state_args.push((s.state, shape.clone(), offset, out_offset));
        offset += n;
        out_offset += n;
    }
    let state_total = out_offset;
    for (i, &(state, decay, _)) in local.decays.iter().enumerate() {
        let decay_tensor = &local.cascade.tensors[decay];
        let mut decay_shape: Vec<u64> = shape_of(&local.cascade, decay)
            .iter()
            .map(|&x| x as u64)
            .collect();
        if let Some(d) = decay_tensor.iterative {
            decay_shape.remove(d);
        }
        let state_ranks: Vec<Handle<Rank>> = {
            let t = &cascade.tensors[state];
            t.ranks
                .iter()
                .enumerate()
                .filter(|(d, _)| Some(*d) != t.iterative)
                .map(|(_, &r)| r)
                .collect()
        };
        let decay_dims: Vec<usize> = decay_tensor
            .ranks
            .iter()
            .enumerate()
            .filter(|(d, _)| Some(*d) != decay_tensor.iterative)
            .filter_map(|(_, r)| state_ranks.iter().position(|x| x == r))
            .collect();
        let (_, shape, state_offset, out_off) = &state_args[i];
        combine_states.push((
            CombineState {
                state: cascade.tensors[state].name.clone(),
                offset: *state_offset,
                shape: shape.clone(),
                decay_offset: offset,
                decay_dims,
                out_offset: *out_off,
            },
            decay_shape.clone(),
        ));
        offset += Ctx::elements(&decay_shape);
    }
    let slot = offset;
    let init_value = original_init_value(ctx, &states)?;

    b.buffer("state_local", "f32", slot, BufferInit::Uninit);
    b.buffer(
        "state_in",
        "f32",
        state_total,
        BufferInit::Value { value: init_value },
    );

    // 1. Local states from zero, and decays.
    let state_einsums: Vec<_> = cls.states.iter().map(|s| s.einsum).collect();
    let mut args = plain_args(ctx, &state_einsums, chunk, 0);
    for (cs, decay_shape) in &combine_states {
        args.push(KernelArg {
            tensor: cs.state.clone(),
            role: ArgRole::StateOut,
            key_chunk: None,
            shape: cs.shape.clone(),
            region: region("state_local", cs.offset, Ctx::elements(&cs.shape)),
        });
        args.push(KernelArg {
            tensor: format!("{}__decay", cs.state),
            role: ArgRole::DecayOut,
            key_chunk: None,
            shape: decay_shape.clone(),
            region: region("state_local", cs.decay_offset, Ctx::elements(decay_shape)),
        });
    }
    let states_ready = b.event();
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::StateOnly),
        phase: Phase::StateOnly,
        queries: chunk,
        keys: vec![chunk],
        masks: vec![PairMask::Partial],
        heads: None,
        args,
        grid: ctx.grid(chunk, None),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, Vec::new(), Some(states_ready.clone())),
    }));
    let plain_states: Vec<CombineState> = combine_states.iter().map(|(c, _)| c.clone()).collect();

    // 2. The prefix.
    let prefix_ready = if gather { b.event() } else { String::new() };
    if gather {
        b.buffer("state_gathered", "f32", slot * p, BufferInit::Uninit);
        let gathered = b.event();
        b.steps.push(Step::AllGather {
            send: region("state_local", 0, slot),
            recv: region("state_gathered", 0, slot * p),
            dtype: "f32".to_string(),
            exec: RankBuilder::exec(COMM, vec![states_ready], Some(gathered.clone())),
        });
        b.steps.push(Step::PrefixCombine {
            slots: region("state_gathered", 0, slot * p),
            slot_elements: slot,
            first: 0,
            count: r,
            init: None,
            init_value,
            states: plain_states,
            out: region("state_in", 0, state_total),
            exec: RankBuilder::exec(COMPUTE, vec![gathered], Some(prefix_ready.clone())),
        });
    } else {
        // LASP-1: receive the prefix from r-1, fold in this chunk, pass it on.
        let mut wait = vec![states_ready];
        if r > 0 {
            let received = b.event();
            b.steps.push(Step::SendRecv {
                send: None,
                recv: Some(PeerRegion {
                    peer: r - 1,
                    region: region("state_in", 0, state_total),
                }),
                dtype: "f32".to_string(),
                exec: RankBuilder::exec(COMM, Vec::new(), Some(received.clone())),
            });
            wait.push(received);
        }
        if r + 1 < p {
            b.buffer("state_out", "f32", state_total, BufferInit::Uninit);
            let folded = b.event();
            b.steps.push(Step::PrefixCombine {
                slots: region("state_local", 0, slot),
                slot_elements: slot,
                first: 0,
                count: 1,
                init: Some(region("state_in", 0, state_total)),
                init_value,
                states: plain_states,
                out: region("state_out", 0, state_total),
                exec: RankBuilder::exec(COMPUTE, wait.clone(), Some(folded.clone())),
            });
            b.steps.push(Step::SendRecv {
                send: Some(PeerRegion {
                    peer: r + 1,
                    region: region("state_out", 0, state_total),
                }),
                recv: None,
                dtype: "f32".to_string(),
                exec: RankBuilder::exec(COMM, vec![folded], None),
            });
        }
        // The output kernel waits for the received prefix (rank 0 starts from the init).
        return finish_lasp_output(ctx, b, chunk, &combine_states, wait);
    }
    finish_lasp_output(ctx, b, chunk, &combine_states, vec![prefix_ready])
}

fn finish_lasp_output(
    ctx: &Ctx,
    b: &mut RankBuilder,
    chunk: TokenRange,
    combine_states: &[(CombineState, Vec<u64>)],
    wait: Vec<String>,
) -> Result<(), PlanError> {
    let all: Vec<_> = ctx.cascade.einsums.handles().collect();
    let mut args = plain_args(ctx, &all, chunk, 0);
    for (cs, _) in combine_states {
        args.push(KernelArg {
            tensor: cs.state.clone(),
            role: ArgRole::StateIn,
            key_chunk: None,
            shape: cs.shape.clone(),
            region: region("state_in", cs.out_offset, Ctx::elements(&cs.shape)),
        });
    }
    args.extend(output_args(ctx, chunk, 0));
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::OutputWithPrefix),
        phase: Phase::OutputWithPrefix,
        queries: chunk,
        keys: vec![chunk],
        masks: vec![PairMask::Partial],
        heads: None,
        args,
        grid: ctx.grid(chunk, None),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, wait, None),
    }));
    Ok(())
}

/// The carried states' original init when it is one literal for all of them (the prefix
/// combine starts there); a per-element init would need its own kernel.
fn original_init_value(ctx: &Ctx, states: &[Handle<Tensor>]) -> Result<f64, PlanError> {
    let mut value = None;
    for &s in states {
        let e = ctx
            .cascade
            .producer(s)
            .map(|h| &ctx.cascade.einsums[h])
            .and_then(|e| e.recurrence.as_ref());
        let v = match e.map(|r| &r.init) {
            Some(einattn_ir::Expr::Literal(v)) => *v,
            _ => {
                return Err(PlanError::Unsupported(format!(
                    "the init of `{}` is not a literal",
                    ctx.cascade.tensors[s].name
                )))
            }
        };
        match value {
            None => value = Some(v),
            Some(w) if w == v => {}
            Some(_) => {
                return Err(PlanError::Unsupported(
                    "carried states start from different literals".to_string(),
                ))
            }
        }
    }
    Ok(value.unwrap_or(0.0))
}

/// Tensors laid out in a buffer: (tensor, shape, offset).
type Placed = Vec<(Handle<Tensor>, Vec<u64>, u64)>;

/// Layout of one query chunk's statistics: (state, shape, offset) and the merge rules.
fn stats_layout(ctx: &Ctx, q_len: u64) -> (Placed, Vec<MergeStat>, u64) {
    let cascade = ctx.cascade;
    let mut layout = Vec::new();
    let mut merge = Vec::new();
    let mut offset = 0;
    for s in &ctx.cls.states {
        let shape = ctx.local_shape(s.state, q_len, q_len, None);
        let n = Ctx::elements(&shape);
        let (kind, max_stat, max_dims) = match &s.role {
            StateRole::Extremum { op } => (
                if *op == einattn_ir::ReduceOp::Min {
                    MergeKind::Min
                } else {
                    MergeKind::Max
                },
                None,
                Vec::new(),
            ),
            StateRole::Linear { .. } => (MergeKind::Sum, None, Vec::new()),
            StateRole::RescaledSum { max_state } => {
                let ranks_of = |t: Handle<Tensor>| -> Vec<Handle<Rank>> {
                    let tensor = &cascade.tensors[t];
                    tensor
                        .ranks
                        .iter()
                        .enumerate()
                        .filter(|(d, _)| Some(*d) != tensor.iterative)
                        .map(|(_, &r)| r)
                        .collect()
                };
                let mine = ranks_of(s.state);
                let dims = ranks_of(*max_state)
                    .iter()
                    .filter_map(|r| mine.iter().position(|x| x == r))
                    .collect();
                (
                    MergeKind::RescaledSum,
                    Some(cascade.tensors[*max_state].name.clone()),
                    dims,
                )
            }
        };
        merge.push(MergeStat {
            name: cascade.tensors[s.state].name.clone(),
            kind,
            offset,
            shape: shape.clone(),
            max_stat,
            max_dims,
        });
        layout.push((s.state, shape, offset));
        offset += n;
    }
    (layout, merge, offset)
}

/// Where a key chunk's K/V blocks are: (buffer, offset of the chunk's block).
struct KeySource {
    buffer: String,
    offset: u64,
}

/// Key-side inputs in the `kv` layout: per tensor, (tensor, shape, offset within a block).
fn kv_layout(ctx: &Ctx, k_len: u64) -> (Placed, u64) {
    let mut out = Vec::new();
    let mut offset = 0;
    for t in ctx.seq_inputs(Side::Key) {
        let shape = ctx.local_shape(t, k_len, k_len, None);
        let n = Ctx::elements(&shape);
        out.push((t, shape, offset));
        offset += n;
    }
    (out, offset)
}

struct SoftmaxKernels<'a> {
    ctx: &'a Ctx<'a>,
    kv: Placed,
    stats: Placed,
    q_inputs: Vec<Handle<Tensor>>,
}

impl SoftmaxKernels<'_> {
    /// A partial over one key chunk: statistics to `stats_out` (resuming from `stats_in`).
    // Each argument is one coordinate of the launch (queries, keys, where each lives).
    #[allow(clippy::too_many_arguments)]
    fn partial(
        &self,
        q: TokenRange,
        q_source: (&str, u64),
        k: TokenRange,
        mask: PairMask,
        key: &KeySource,
        stats_in: Option<(&str, u64)>,
        stats_out: (&str, u64),
        exec: Exec,
    ) -> Step {
        let ctx = self.ctx;
        let mut args = query_args(ctx, &self.q_inputs, q.len, k.len, q_source);
        for (t, shape, off) in &self.kv {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::Input,
                key_chunk: Some(0),
                shape: shape.clone(),
                region: region(&key.buffer, key.offset + off, Ctx::elements(shape)),
            });
        }
        args.extend(self.param_args());
        for (role, place) in [
            (ArgRole::StatsIn, stats_in),
            (ArgRole::StatsOut, Some(stats_out)),
        ] {
            let Some((buffer, base)) = place else {
                continue;
            };
            for (t, shape, off) in &self.stats {
                args.push(KernelArg {
                    tensor: ctx.cascade.tensors[*t].name.clone(),
                    role,
                    key_chunk: None,
                    shape: shape.clone(),
                    region: region(buffer, base + off, Ctx::elements(shape)),
                });
            }
        }
        Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Partial),
            phase: Phase::Partial,
            queries: q,
            keys: vec![k],
            masks: vec![mask],
            heads: None,
            args,
            grid: ctx.grid(q, None),
            launch: Vec::new(),
            chunks: None,
            exec,
        })
    }

    fn param_args(&self) -> Vec<KernelArg> {
        param_args(self.ctx)
    }

    fn epilogue(&self, q: TokenRange, block: u64, stats: (&str, u64), exec: Exec) -> Step {
        let ctx = self.ctx;
        let mut args = Vec::new();
        for (t, shape, off) in &self.stats {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::StatsIn,
                key_chunk: None,
                shape: shape.clone(),
                region: region(stats.0, stats.1 + off, Ctx::elements(shape)),
            });
        }
        args.extend(self.param_args());
        args.extend(output_args(ctx, q, block));
        Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Epilogue),
            phase: Phase::Epilogue,
            queries: q,
            keys: Vec::new(),
            masks: Vec::new(),
            heads: None,
            args,
            grid: ctx.grid(q, None),
            launch: Vec::new(),
            chunks: None,
            exec,
        })
    }
}

/// All-gather of K/V, Ring and TokenRing, contiguous or zigzag: every (query chunk, key
/// chunk) pair with a non-empty mask runs a partial kernel into scratch statistics that
/// an LSE merge folds into the query chunk's accumulator; the epilogue finishes.
fn emit_softmax(
    ctx: &Ctx,
    b: &mut RankBuilder,
    kind: SchemeKind,
    analyzer: &mut PairAnalyzer,
) -> Result<(), PlanError> {
    let cls = ctx.cls;
    if !cls.keys_any_order() {
        return Err(PlanError::Unsupported(
            "softmax schemes are emitted for statistics that merge in any order; this cascade needs keys in order".to_string(),
        ));
    }
    let r = b.rank;
    let p = ctx.devices;
    let mine = ctx.chunks(r);
    let c_len = mine[0].len;
    data_buffers(ctx, b, &mine, &[Side::Query], None);
    output_buffers(ctx, b, &mine);
    let (kv, kv_block) = kv_layout(ctx, c_len);
    let pieces_per_rank = mine.len() as u64;
    // The kv buffer: per held chunk, each key-side tensor's block.
    let mut pieces = Vec::new();
    for (i, c) in mine.iter().enumerate() {
        for (t, _, off) in &kv {
            pieces.push(Piece {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                buffer: "kv".to_string(),
                offset: i as u64 * kv_block + off,
                slices: piece_slices(ctx, *t, *c, None),
            });
        }
    }
    let kv_elems = kv_block * pieces_per_rank;
    b.buffer(
        "kv",
        &kv_dtype(ctx),
        kv_elems,
        BufferInit::Pieces { pieces },
    );
    if kind == SchemeKind::AllGatherKv {
        return emit_allgather_kv(ctx, b, analyzer, &mine, &kv, kv_block, kv_elems);
    }
    let (stats, merge_stats, stats_elems) = stats_layout(ctx, c_len);
    for i in 0..mine.len() {
        b.buffer(&format!("stats{i}"), "f32", stats_elems, BufferInit::Uninit);
    }
    b.buffer("stats_part", "f32", stats_elems, BufferInit::Uninit);
    let kernels = SoftmaxKernels {
        ctx,
        kv,
        stats,
        q_inputs: ctx.seq_inputs(Side::Query),
    };
    let my_pairs = schemes::device_pairs(analyzer, p, ctx.zigzag, r)?;
    let chunk_index =
        |c: &TokenRange, list: &[TokenRange]| list.iter().position(|x| x == c).unwrap_or(0) as u64;
    // Per query chunk: whether its accumulator holds anything yet.
    let mut started = vec![false; mine.len()];

    // Runs the partial for (q, k) and folds it into q's accumulator.
    let run_pair = |b: &mut RankBuilder,
                    started: &mut Vec<bool>,
                    qi: usize,
                    q_source: (&str, u64),
                    q: TokenRange,
                    k: TokenRange,
                    mask: PairMask,
                    key: &KeySource,
                    acc: (&str, u64),
                    wait: Vec<String>,
                    record: Option<String>| {
        if !started[qi] {
            started[qi] = true;
            b.steps.push(kernels.partial(
                q,
                q_source,
                k,
                mask,
                key,
                None,
                acc,
                RankBuilder::exec(COMPUTE, wait, record),
            ));
        } else {
            b.steps.push(kernels.partial(
                q,
                q_source,
                k,
                mask,
                key,
                None,
                ("stats_part", 0),
                RankBuilder::exec(COMPUTE, wait, None),
            ));
            b.steps.push(Step::LseMerge {
                into: region(acc.0, acc.1, stats_elems),
                from: region("stats_part", 0, stats_elems),
                stats: merge_stats.clone(),
                exec: RankBuilder::exec(COMPUTE, Vec::new(), record),
            });
        }
    };

    match kind {
        SchemeKind::Ring => {
            // Double-buffered ring: at step s this rank holds the chunks of rank (r - s).
            b.buffer("kv_ring0", &kv_dtype(ctx), kv_elems, BufferInit::Uninit);
            b.buffer("kv_ring1", &kv_dtype(ctx), kv_elems, BufferInit::Uninit);
            let mut arrived: Option<String> = None;
            let mut computed_prev: Option<String> = None;
            for s in 0..p {
                let src = (r + p - s) % p;
                let holding = if s == 0 {
                    "kv".to_string()
                } else {
                    format!("kv_ring{}", (s - 1) % 2)
                };
                // Send what we hold on, receive the next; the target buffer was last read
                // by the compute of step s - 1.
                let next_arrival = if s + 1 < p {
                    let ev = b.event();
                    let mut wait = Vec::new();
                    if let Some(a) = &arrived {
                        wait.push(a.clone());
                    }
                    if let Some(c) = &computed_prev {
                        wait.push(c.clone());
                    }
                    b.steps.push(Step::SendRecv {
                        send: Some(PeerRegion {
                            peer: (r + 1) % p,
                            region: region(&holding, 0, kv_elems),
                        }),
                        recv: Some(PeerRegion {
                            peer: (r + p - 1) % p,
                            region: region(&format!("kv_ring{}", s % 2), 0, kv_elems),
                        }),
                        dtype: kv_dtype(ctx),
                        exec: RankBuilder::exec(COMM, wait, Some(ev.clone())),
                    });
                    Some(ev)
                } else {
                    None
                };
                let src_chunks = ctx.chunks(src);
                let step_pairs: Vec<_> = my_pairs
                    .iter()
                    .filter(|(_, k, _)| src_chunks.contains(k))
                    .collect();
                let done = b.event();
                let n = step_pairs.len();
                // An empty step keeps the last compute event: buffer reuse still waits for it.

                for (i, (q, k, mask)) in step_pairs.into_iter().enumerate() {
                    let qi = chunk_index(q, &mine) as usize;
                    let key = KeySource {
                        buffer: holding.clone(),
                        offset: chunk_index(k, &src_chunks) * kv_block,
                    };
                    let wait = if i == 0 {
                        arrived.iter().cloned().collect()
                    } else {
                        Vec::new()
                    };
                    let record = (i + 1 == n).then(|| done.clone());
                    run_pair(
                        b,
                        &mut started,
                        qi,
                        (&query_buffer(ctx), qi as u64),
                        *q,
                        *k,
                        *mask,
                        &key,
                        (&format!("stats{qi}"), 0),
                        wait,
                        record,
                    );
                    if i + 1 == n {
                        computed_prev = Some(done.clone());
                    }
                }
                arrived = next_arrival;
            }
        }
        SchemeKind::TokenRing => {
            // Step s: send our queries to rank r+s and compute rank r-s's queries against
            // our keys; partial statistics go back to their owner and merge there.
            let (q_elems_per_chunk, q_dtype) = query_block(ctx, c_len);
            // Pairs rank `owner`'s queries need from rank `holder`'s keys.
            let mut pairs_between =
                |owner: u64,
                 holder: u64|
                 -> Result<Vec<(TokenRange, TokenRange, PairMask)>, SpError> {
                    let held = ctx.chunks(holder);
                    Ok(schemes::device_pairs(analyzer, p, ctx.zigzag, owner)?
                        .into_iter()
                        .filter(|(_, k, _)| held.contains(k))
                        .collect())
                };
            // Local pairs.
            for (q, k, mask) in pairs_between(r, r)? {
                let qi = chunk_index(&q, &mine) as usize;
                let key = KeySource {
                    buffer: "kv".to_string(),
                    offset: chunk_index(&k, &mine) * kv_block,
                };
                run_pair(
                    b,
                    &mut started,
                    qi,
                    (&query_buffer(ctx), qi as u64),
                    q,
                    k,
                    mask,
                    &key,
                    (&format!("stats{qi}"), 0),
                    Vec::new(),
                    None,
                );
            }
            let q_total = q_elems_per_chunk * pieces_per_rank;
            let mut q_arrivals = Vec::new();
            // Queries out: all steps up front on the comm stream.
            for s in 1..p {
                let dst = (r + s) % p;
                let src = (r + p - s) % p;
                let send_needed = !pairs_between(r, dst)?.is_empty();
                let recv_needed = !pairs_between(src, r)?.is_empty();
                let recv_buf = format!("q_from{s}");
                if recv_needed {
                    b.buffer(&recv_buf, &q_dtype, q_total, BufferInit::Uninit);
                }
                if !send_needed && !recv_needed {
                    q_arrivals.push(None);
                    continue;
                }
                let ev = b.event();
                b.steps.push(Step::SendRecv {
                    send: send_needed.then(|| PeerRegion {
                        peer: dst,
                        region: region(&query_buffer(ctx), 0, q_total),
                    }),
                    recv: recv_needed.then(|| PeerRegion {
                        peer: src,
                        region: region(&recv_buf, 0, q_total),
                    }),
                    dtype: q_dtype.clone(),
                    exec: RankBuilder::exec(COMM, Vec::new(), Some(ev.clone())),
                });
                q_arrivals.push(recv_needed.then_some(ev));
            }
            for s in 1..p {
                let dst = (r + s) % p;
                let src = (r + p - s) % p;
                // Compute src's queries against our keys.
                let theirs = pairs_between(src, r)?;
                let src_chunks = ctx.chunks(src);
                let result_buf = format!("stats_for{s}");
                let mut computed = None;
                if !theirs.is_empty() {
                    b.buffer(
                        &result_buf,
                        "f32",
                        stats_elems * pieces_per_rank,
                        BufferInit::Uninit,
                    );
                    let mut their_started = vec![false; src_chunks.len()];
                    let done = b.event();
                    let n = theirs.len();
                    for (i, (q, k, mask)) in theirs.into_iter().enumerate() {
                        let qi = chunk_index(&q, &src_chunks) as usize;
                        let key = KeySource {
                            buffer: "kv".to_string(),
                            offset: chunk_index(&k, &mine) * kv_block,
                        };
                        let wait = if i == 0 {
                            q_arrivals[(s - 1) as usize].iter().cloned().collect()
                        } else {
                            Vec::new()
                        };
                        let record = (i + 1 == n).then(|| done.clone());
                        run_pair(
                            b,
                            &mut their_started,
                            qi,
                            (&format!("q_from{s}"), qi as u64),
                            q,
                            k,
                            mask,
                            &key,
                            (&result_buf, qi as u64 * stats_elems),
                            wait,
                            record,
                        );
                    }
                    computed = Some(done);
                    // A query chunk of src that none of our keys reach keeps no result:
                    // the owner does not expect one (the pair lists agree on both sides).
                }
                // Results back: ours to src, theirs (our queries) from dst.
                let ours_from_dst = pairs_between(r, dst)?;
                let recv_buf = format!("stats_from{s}");
                if !ours_from_dst.is_empty() {
                    b.buffer(
                        &recv_buf,
                        "f32",
                        stats_elems * pieces_per_rank,
                        BufferInit::Uninit,
                    );
                }
                if computed.is_none() && ours_from_dst.is_empty() {
                    continue;
                }
                let back = b.event();
                b.steps.push(Step::SendRecv {
                    send: computed.as_ref().map(|_| PeerRegion {
                        peer: src,
                        region: region(&result_buf, 0, stats_elems * pieces_per_rank),
                    }),
                    recv: (!ours_from_dst.is_empty()).then(|| PeerRegion {
                        peer: dst,
                        region: region(&recv_buf, 0, stats_elems * pieces_per_rank),
                    }),
                    dtype: "f32".to_string(),
                    exec: RankBuilder::exec(
                        COMM,
                        computed.iter().cloned().collect(),
                        Some(back.clone()),
                    ),
                });
                // Merge what came back, per query chunk that dst's keys reached.
                let mut merged_chunks: Vec<u64> = ours_from_dst
                    .iter()
                    .map(|(q, _, _)| chunk_index(q, &mine))
                    .collect();
                merged_chunks.sort();
                merged_chunks.dedup();
                for (i, qi) in merged_chunks.into_iter().enumerate() {
                    let wait = if i == 0 {
                        vec![back.clone()]
                    } else {
                        Vec::new()
                    };
                    if !started[qi as usize] {
                        // Every query chunk sees its own diagonal block under the masks
                        // TokenRing is planned for; an accumulator with nothing local
                        // would need an identity-initialized buffer.
                        return Err(PlanError::Unsupported(
                            "a query chunk with no local keys under TokenRing".to_string(),
                        ));
                    }
                    b.steps.push(Step::LseMerge {
                        into: region(&format!("stats{qi}"), 0, stats_elems),
                        from: region(&recv_buf, qi * stats_elems, stats_elems),
                        stats: merge_stats.clone(),
                        exec: RankBuilder::exec(COMPUTE, wait, None),
                    });
                }
            }
        }
        _ => unreachable_kind(kind)?,
    }
    for (qi, q) in mine.iter().enumerate() {
        if !started[qi] {
            return Err(PlanError::Unsupported(format!(
                "queries [{}, {}) see no key at all",
                q.start,
                q.end()
            )));
        }
        let exec = RankBuilder::exec(COMPUTE, Vec::new(), None);
        b.steps
            .push(kernels.epilogue(*q, qi as u64, (&format!("stats{qi}"), 0), exec));
    }
    Ok(())
}

/// All-gather of K/V (LASP-2H), contiguous or zigzag: one all-gather of every device's key
/// chunks, placed into whole-sequence key tensors, then one `full` kernel per held query
/// chunk over every key (the masks, at global positions, skip what causality hides).
fn emit_allgather_kv(
    ctx: &Ctx,
    b: &mut RankBuilder,
    analyzer: &mut PairAnalyzer,
    mine: &[TokenRange],
    kv: &Placed,
    kv_block: u64,
    kv_elems: u64,
) -> Result<(), PlanError> {
    let p = ctx.devices;
    let tokens = ctx.cls.seq.tokens;
    let dtype = kv_dtype(ctx);
    b.buffer("kv_all", &dtype, kv_elems * p, BufferInit::Uninit);
    let gathered = b.event();
    b.steps.push(Step::AllGather {
        send: region("kv", 0, kv_elems),
        recv: region("kv_all", 0, kv_elems * p),
        dtype: dtype.clone(),
        exec: RankBuilder::exec(COMM, Vec::new(), Some(gathered.clone())),
    });
    let pieces_per_rank = mine.len() as u64;
    let mut whole_keys = Vec::new();
    for (t, _, _) in kv {
        let name = format!("{}_seq", ctx.cascade.tensors[*t].name);
        let shape = ctx.local_shape(*t, tokens, tokens, None);
        b.buffer(&name, &dtype, Ctx::elements(&shape), BufferInit::Uninit);
        whole_keys.push((*t, name, shape));
    }
    let mut wait = vec![gathered];
    for owner in 0..p {
        for (j, c) in ctx.chunks(owner).iter().enumerate() {
            for ((t, chunk_shape, off), (_, name, shape)) in kv.iter().zip(&whole_keys) {
                b.steps.push(Step::Place {
                    src: region(
                        "kv_all",
                        (owner * pieces_per_rank + j as u64) * kv_block + off,
                        Ctx::elements(chunk_shape),
                    ),
                    dst: region(name, 0, Ctx::elements(shape)),
                    shape: shape.clone(),
                    slices: piece_slices(ctx, *t, *c, None),
                    dtype: dtype.clone(),
                    exec: RankBuilder::exec(COMPUTE, std::mem::take(&mut wait), None),
                });
            }
        }
    }
    let pairs = schemes::device_pairs(analyzer, p, ctx.zigzag, b.rank)?;
    let all_keys = TokenRange {
        start: 0,
        len: tokens,
    };
    let q_buffer = query_buffer(ctx);
    for (qi, q) in mine.iter().enumerate() {
        let seen: Vec<PairMask> = pairs
            .iter()
            .filter(|(pq, _, _)| pq == q)
            .map(|&(_, _, m)| m)
            .collect();
        if seen.is_empty() {
            return Err(PlanError::Unsupported(format!(
                "queries [{}, {}) see no key at all",
                q.start,
                q.end()
            )));
        }
        // Full only when every key chunk is seen unmasked.
        let mask = if seen.len() as u64 == 2u64.pow(ctx.zigzag as u32) * p
            && seen.iter().all(|&m| m == PairMask::Full)
        {
            PairMask::Full
        } else {
            PairMask::Partial
        };
        let mut args = query_args(
            ctx,
            &ctx.seq_inputs(Side::Query),
            q.len,
            tokens,
            (&q_buffer, qi as u64),
        );
        for (t, name, shape) in &whole_keys {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::Input,
                key_chunk: Some(0),
                shape: shape.clone(),
                region: region(name, 0, Ctx::elements(shape)),
            });
        }
        args.extend(param_args(ctx));
        args.extend(output_args(ctx, *q, qi as u64));
        b.steps.push(Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Full),
            phase: Phase::Full,
            queries: *q,
            keys: vec![all_keys],
            masks: vec![mask],
            heads: None,
            args,
            grid: ctx.grid(*q, None),
            launch: Vec::new(),
            chunks: None,
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        }));
    }
    Ok(())
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

/// The transposition that moves axis `from` to position `to`.
fn move_axis(rank: usize, from: usize, to: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rank).filter(|&a| a != from).collect();
    order.insert(to, from);
    order
}

/// Ulysses: per sequence tensor, pack head groups, all-to-all, unpack to the full
/// sequence; the full cascade on this rank's heads; the output back the same way.
fn emit_ulysses(ctx: &Ctx, b: &mut RankBuilder) -> Result<(), PlanError> {
    let cascade = ctx.cascade;
    let r = b.rank;
    let p = ctx.devices;
    let Some(head) = ctx.head_rank else {
        return Err(PlanError::Unsupported(
            "Ulysses needs a head rank".to_string(),
        ));
    };
    let heads_total = cascade.ranks[head].extent;
    let hl = heads_total / p;
    let my_heads = TokenRange {
        start: r * hl,
        len: hl,
    };
    let tokens = ctx.cls.seq.tokens;
    let chunk = ctx.chunks(r)[0];
    let sides: Vec<Side> = if ctx.cls.seq.single_rank() {
        vec![Side::Sequence]
    } else {
        vec![Side::Query, Side::Key]
    };
    // Natural-layout inputs of this rank's chunk, all heads.
    data_buffers(ctx, b, &[chunk], &sides, None);
    // Parameters: this rank's heads only (replace the whole-parameter buffers).
    b.buffers.retain(|buf| {
        !ctx.params()
            .iter()
            .any(|&t| cascade.tensors[t].name == buf.name)
    });
    for t in ctx.params() {
        let tensor = &cascade.tensors[t];
        let shape = ctx.local_shape(t, 0, 0, Some(hl));
        b.buffer(
            &tensor.name,
            &dtype_name(tensor),
            Ctx::elements(&shape),
            BufferInit::Pieces {
                pieces: vec![Piece {
                    tensor: tensor.name.clone(),
                    buffer: tensor.name.clone(),
                    offset: 0,
                    slices: piece_slices(ctx, t, chunk, Some(my_heads))
                        .into_iter()
                        .filter(|s| Some(s.dim) == ctx.dim_of(t, head))
                        .collect(),
                }],
            },
        );
    }
    let mut args = Vec::new();
    let mut ready = Vec::new();
    let seq_tensors: Vec<Handle<Tensor>> = sides.iter().flat_map(|s| ctx.seq_inputs(*s)).collect();
    for &t in &seq_tensors {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let (Some(sd), Some(hd)) = (ctx.seq_dim(t), ctx.dim_of(t, head)) else {
            return Err(PlanError::Unsupported(format!(
                "`{}` lacks the sequence or head rank",
                tensor.name
            )));
        };
        let natural = ctx.local_shape(t, chunk.len, chunk.len, None);
        let n = Ctx::elements(&natural);
        // View [.., H, ..] as [.., P, Hl, ..] and bring the head group to the front.
        let mut view = natural.clone();
        view[hd] = hl;
        view.insert(hd, p);
        let pack = move_axis(view.len(), hd, 0);
        let packed = format!("{}_packed", tensor.name);
        let exchanged = format!("{}_exchanged", tensor.name);
        let full = format!("{}_full", tensor.name);
        b.buffer(&packed, &dtype, n, BufferInit::Uninit);
        b.buffer(&exchanged, &dtype, n, BufferInit::Uninit);
        b.buffer(&full, &dtype, n, BufferInit::Uninit);
        b.steps.push(Step::Rearrange {
            src: region(&tensor.name, 0, n),
            dst: region(&packed, 0, n),
            shape: view,
            perm: pack,
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        let ev = b.event();
        b.steps.push(Step::AllToAll {
            send: region(&packed, 0, n),
            recv: region(&exchanged, 0, n),
            count_per_peer: n / p,
            dtype: dtype.clone(),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), Some(ev.clone())),
        });
        ready.push(ev);
        // Received [P (sequence chunk), .., C, .., Hl, ..]: put the chunk index before
        // the sequence dimension, giving [.., N, .., Hl, ..].
        let mut recv_shape = natural.clone();
        recv_shape[hd] = hl;
        recv_shape.insert(0, p);
        b.steps.push(Step::Rearrange {
            src: region(&exchanged, 0, n),
            dst: region(&full, 0, n),
            shape: recv_shape.clone(),
            perm: move_axis(recv_shape.len(), 0, sd),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        let mut shape = natural.clone();
        shape[sd] = tokens;
        shape[hd] = hl;
        let keyish = ctx.side(t) == Side::Key;
        args.push(KernelArg {
            tensor: tensor.name.clone(),
            role: ArgRole::Input,
            key_chunk: keyish.then_some(0),
            shape,
            region: region(&full, 0, n),
        });
    }
    for t in ctx.params() {
        let shape = ctx.local_shape(t, 0, 0, Some(hl));
        let n = Ctx::elements(&shape);
        args.push(KernelArg {
            tensor: cascade.tensors[t].name.clone(),
            role: ArgRole::Param,
            key_chunk: None,
            shape,
            region: region(&cascade.tensors[t].name, 0, n),
        });
    }
    // Outputs: full sequence, this rank's heads.
    let mut back = Vec::new();
    for t in ctx.outputs() {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let (Some(sd), Some(hd)) = (ctx.seq_dim(t), ctx.dim_of(t, head)) else {
            return Err(PlanError::Unsupported(format!(
                "`{}` lacks the sequence or head rank",
                tensor.name
            )));
        };
        let mut full_shape = ctx.local_shape(t, tokens, tokens, None);
        full_shape[hd] = hl;
        let n = Ctx::elements(&full_shape);
        let full = format!("{}_full", tensor.name);
        b.buffer(&full, &dtype, n, BufferInit::Uninit);
        args.push(KernelArg {
            tensor: tensor.name.clone(),
            role: ArgRole::Output,
            key_chunk: None,
            shape: full_shape.clone(),
            region: region(&full, 0, n),
        });
        back.push((t, sd, hd, full_shape, n));
    }
    let all_tokens = TokenRange {
        start: 0,
        len: tokens,
    };
    let computed = b.event();
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::Full),
        phase: Phase::Full,
        queries: all_tokens,
        keys: vec![all_tokens],
        masks: vec![PairMask::Partial],
        heads: Some(my_heads),
        args,
        grid: ctx.grid(all_tokens, Some(hl)),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, ready, Some(computed)),
    }));
    output_buffers(ctx, b, &[chunk]);
    for (t, sd, hd, full_shape, n) in back {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let packed = format!("{}_packed", tensor.name);
        let exchanged = format!("{}_exchanged", tensor.name);
        b.buffer(&packed, &dtype, n, BufferInit::Uninit);
        b.buffer(&exchanged, &dtype, n, BufferInit::Uninit);
        // View [.., N, ..] as [.., P, C, ..] and bring the chunk index to the front.
        let mut view = full_shape.clone();
        view[sd] = chunk.len;
        view.insert(sd, p);
        b.steps.push(Step::Rearrange {
            src: region(&format!("{}_full", tensor.name), 0, n),
            dst: region(&packed, 0, n),
            shape: view.clone(),
            perm: move_axis(view.len(), sd, 0),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        b.steps.push(Step::AllToAll {
            send: region(&packed, 0, n),
            recv: region(&exchanged, 0, n),
            count_per_peer: n / p,
            dtype: dtype.clone(),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        // Received [P (head group), .., C, .., Hl, ..]: the group goes before the head dim.
        let mut recv_shape = full_shape.clone();
        recv_shape[sd] = chunk.len;
        recv_shape.insert(0, p);
        b.steps.push(Step::Rearrange {
            src: region(&exchanged, 0, n),
            dst: region(&tensor.name, 0, n),
            shape: recv_shape.clone(),
            perm: move_axis(recv_shape.len(), 0, hd),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
    }
    Ok(())
}
