//! The GPU plan executor: runs an SP plan (`plan.json`, docs/sp.md) step by step on the
//! GPUs of [`Ranks`], launching the kernels the plan carries (its manifest's contracts and
//! PTX) and NCCL calls.
//!
//! - the plan is validated on the CPU first (`einattn_backends::plan::validate`), so what
//!   this module indexes is known to lie inside its buffers;
//! - buffers are allocated per rank with the plan's dtype and filled from the pieces of the
//!   global inputs (uninitialized ones are poisoned with NaN, so a read before a write
//!   shows in the check);
//! - a `full` kernel step launches its one kernel over the step's query slice (query
//!   offset, local heads, local strides), every parameter bound through the contract;
//! - `state_only` (chunked linear states): the chunk-state kernel over the step's `chunks`
//!   chunks of the window (into a per-window scratch array of chunk states), then the
//!   chunk's cumulative decay (`einattn_chunk_decay`) and the decayed sum of the window's
//!   chunks into `state_out` (`einattn_prefix_combine`);
//! - `output_with_prefix`: `state_in` goes to slot 0 of the window's scratch array and the
//!   chunk-output kernel starts each of its chunks from the decayed sum of the slots before
//!   it (the prefix, then the window's own earlier chunks);
//! - `partial` (Ring, TokenRing): the attention kernel over one (query block, key block)
//!   pair at the queries' offset relative to the keys, writing the pair's statistics (its
//!   row outputs and f32 numerator) into the step's `stats_out`; `epilogue`: the
//!   element-wise `num / den` into the output piece; `lse_merge`: the merge kernel once per
//!   statistic, sums before the max they read;
//! - `prefix_combine` and `rearrange`: the helper kernels; `place`: device copies;
//!   `all_gather`, `all_to_all`, `send_recv`: NCCL.
//!
//! Steps of a rank run in plan order on its GPU's one stream, which satisfies every event
//! of the plan (plan order is a topological order); what the plan would overlap runs one
//! after another. With overlap ([`crate::ranks::RankMode`]), each rank's transfers (every
//! collective and send, and steps declared on `comm`) run on a second stream of its GPU
//! and the plan's waits and records become stream waits and events (validation has
//! checked that they order every conflicting access); each run forks the transfer
//! streams from the compute streams and joins them back. Sends and receives (LASP-1) go as NCCL groups of matched pairs
//! ([`order`]).

pub mod run;

use crate::device::{from_bits, to_bits};
use crate::ranks::{error_parts, Ranks};
use crate::whole::{dims, driver_arg, host_values, Inputs};
use crate::{ExecError, Result};
use einattn_backends::abi::{
    self, ArgValue, ArgValues, Axis, BindError, Dtype, KernelSet, LaunchContract, Source,
    TensorRole,
};
use einattn_backends::family::elementwise::{
    merge_kind_code, plan_rearrange, LSE_MERGE, REARRANGE_DIMS,
};
use einattn_backends::plan::bind::{Pointer, StepBinding};
use einattn_backends::plan::order::{order, Batch};
use einattn_backends::plan::{
    piece_runs, stats, ArgRole, BufferInit, KernelStep, PeerRegion, Phase, Plan, Region, Step,
};
use einattn_ir::cascade::Cascade;
use einattn_runtime::nccl::P2pPart;
use einattn_runtime::{DeviceBuffer, Event, Gpu, Kernel};
use std::collections::HashMap;

pub(crate) fn plan_error(message: impl Into<String>) -> ExecError {
    ExecError::Input(format!("plan: {}", message.into()))
}

/// A plan buffer on a GPU: 16-bit floats as bits, or f32.
enum Buf {
    Half(DeviceBuffer<u16>),
    Float(DeviceBuffer<f32>),
}

impl Buf {
    fn address(&self, gpu: &Gpu, offset: u64) -> u64 {
        match self {
            Buf::Half(b) => b.device_address(gpu) + 2 * offset,
            Buf::Float(b) => b.device_address(gpu) + 4 * offset,
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::Half(b) => b.len(),
            Buf::Float(b) => b.len(),
        }
    }

    fn half(&self) -> Option<&DeviceBuffer<u16>> {
        match self {
            Buf::Half(b) => Some(b),
            Buf::Float(_) => None,
        }
    }

    fn half_mut(&mut self) -> Option<&mut DeviceBuffer<u16>> {
        match self {
            Buf::Half(b) => Some(b),
            Buf::Float(_) => None,
        }
    }

    fn float(&self) -> Option<&DeviceBuffer<f32>> {
        match self {
            Buf::Float(b) => Some(b),
            Buf::Half(_) => None,
        }
    }

    fn float_mut(&mut self) -> Option<&mut DeviceBuffer<f32>> {
        match self {
            Buf::Float(b) => Some(b),
            Buf::Half(_) => None,
        }
    }
}

/// Per window of a chunked step: the chunk count and the scratch array of chunk states
/// (slot 0 the prefix, slots `1..=sub` the window's chunks).
struct Window {
    sub: usize,
    slots: DeviceBuffer<f32>,
    /// The per-chunk decay (one value per head) the combine uses.
    chunk_decay: DeviceBuffer<f32>,
    has_states: bool,
}

struct RankExec {
    rank: usize,
    buffers: HashMap<String, Buf>,
    windows: HashMap<(u64, u64), Window>,
    /// Every kernel of the plan's manifest, loaded on this rank's GPU.
    kernels: HashMap<String, Kernel>,
    /// With overlap: the events this run's steps recorded, by the plan's names.
    events: HashMap<String, Event>,
}

/// A plan loaded onto the GPUs of `ranks`, ready to run (repeatedly, for timing).
pub struct PlanExec<'a> {
    plan: &'a Plan,
    kernels: &'a KernelSet,
    ranks: &'a Ranks,
    host: &'a Inputs,
    cascade: &'a Cascade,
    execs: Vec<RankExec>,
}

fn elem_of(dtype: &str) -> Result<Option<Dtype>> {
    match Dtype::from_name(dtype) {
        Some(d @ (Dtype::Bf16 | Dtype::F16)) => Ok(Some(d)),
        Some(Dtype::F32) => Ok(None),
        _ => Err(plan_error(format!(
            "buffers of `{dtype}` are not supported"
        ))),
    }
}

const LOG2_E: f64 = std::f64::consts::LOG2_E;

/// Named values of a helper kernel's [`Source::Argument`] parameters.
struct Arguments(Vec<(&'static str, ArgValue)>);

impl ArgValues for Arguments {
    fn pointer(&self, source: &Source) -> std::result::Result<u64, BindError> {
        Err(BindError(format!("a helper kernel takes no {source:?}")))
    }
    fn size(&self, name: &str) -> std::result::Result<u64, BindError> {
        Err(BindError(format!("a helper kernel takes no size `{name}`")))
    }
    fn stride(&self, tensor: &str, _: Axis) -> std::result::Result<u64, BindError> {
        Err(BindError(format!(
            "a helper kernel takes no stride of `{tensor}`"
        )))
    }
    fn scalar(&self, param: &str, _: Option<f64>) -> std::result::Result<f64, BindError> {
        Err(BindError(format!(
            "a helper kernel takes no scalar `{param}`"
        )))
    }
    fn argument(&self, name: &str) -> std::result::Result<ArgValue, BindError> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| BindError(format!("no value for argument `{name}`")))
    }
}

/// Entries of the helper kernels (`einattn_backends::family::elementwise`).
const PREFIX_COMBINE: &str = "einattn_prefix_combine";
const CHUNK_DECAY: &str = "einattn_chunk_decay";
const REARRANGE_16: &str = "einattn_rearrange_b16";
const REARRANGE_32: &str = "einattn_rearrange_b32";
const SHAPE_NAMES: [&str; REARRANGE_DIMS] = ["shape0", "shape1", "shape2", "shape3", "shape4"];
const STRIDE_NAMES: [&str; REARRANGE_DIMS] =
    ["stride0", "stride1", "stride2", "stride3", "stride4"];

/// The arguments of `einattn_prefix_combine` (see `family::elementwise::prefix_combine`):
/// device addresses and element counts.
struct Combine {
    slots: u64,
    slot_stride: u64,
    first: u32,
    count: u32,
    decay: u64,
    decay_stride: u64,
    decay_div: u64,
    decay_mod: u64,
    init: u64,
    init_value: f32,
    out: u64,
    n: u64,
}

impl Combine {
    fn arguments(&self) -> Arguments {
        Arguments(vec![
            ("slots", ArgValue::Ptr(self.slots)),
            ("slot_stride", ArgValue::U64(self.slot_stride)),
            ("first", ArgValue::U32(self.first)),
            ("count", ArgValue::U32(self.count)),
            ("decay", ArgValue::Ptr(self.decay)),
            ("decay_stride", ArgValue::U64(self.decay_stride)),
            ("decay_div", ArgValue::U64(self.decay_div)),
            ("decay_mod", ArgValue::U64(self.decay_mod)),
            ("init", ArgValue::Ptr(self.init)),
            ("init_value", ArgValue::F32(self.init_value)),
            ("out", ArgValue::Ptr(self.out)),
            ("n", ArgValue::U64(self.n)),
        ])
    }
}

/// The arguments of `einattn_chunk_decay`: `out[i] = exp(-rate[i] * tokens)` for `i < n`.
fn decay_arguments(rate: u64, out: u64, n: u32, tokens: u64) -> Arguments {
    Arguments(vec![
        ("rate", ArgValue::Ptr(rate)),
        ("out", ArgValue::Ptr(out)),
        ("n", ArgValue::U32(n)),
        ("scale", ArgValue::F32((-LOG2_E * tokens as f64) as f32)),
    ])
}

/// The arguments of `einattn_rearrange_b{16,32}` for a run-copy plan (leading dims padded
/// with extent 1, stride 0).
fn rearrange_arguments(
    src: u64,
    dst: u64,
    plan: &einattn_backends::family::elementwise::RearrangePlan,
) -> Arguments {
    let pad = REARRANGE_DIMS - plan.outer_shape.len();
    let mut args = vec![
        ("src", ArgValue::Ptr(src)),
        ("dst", ArgValue::Ptr(dst)),
        ("runs", ArgValue::U64(plan.runs())),
        ("run_len", ArgValue::U64(plan.run_len)),
    ];
    let shape = std::iter::repeat_n(1, pad).chain(plan.outer_shape.iter().copied());
    let stride = std::iter::repeat_n(0, pad).chain(plan.outer_stride.iter().copied());
    for (a, (extent, step)) in shape.zip(stride).enumerate() {
        args.push((SHAPE_NAMES[a], ArgValue::U64(extent)));
        args.push((STRIDE_NAMES[a], ArgValue::U64(step)));
    }
    Arguments(args)
}

/// The arguments of `einattn_lse_merge` for one statistic: the addresses of the two sides
/// and of their maxes (0 when the rule reads none), and the launch's counts.
fn merge_arguments(
    [into, from, into_max, from_max]: [u64; 4],
    m: &stats::MergeLaunch,
) -> Arguments {
    Arguments(vec![
        ("into", ArgValue::Ptr(into)),
        ("from", ArgValue::Ptr(from)),
        ("into_max", ArgValue::Ptr(into_max)),
        ("from_max", ArgValue::Ptr(from_max)),
        ("width", ArgValue::U64(m.width)),
        ("n", ArgValue::U64(m.count)),
        ("kind", ArgValue::U32(merge_kind_code(m.kind))),
    ])
}

/// A plan count as a 32-bit kernel argument.
fn u32_arg(what: &str, v: u64) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| plan_error(format!("`{what}` = {v} does not fit a 32-bit argument")))
}

/// What a kernel step binds ([`StepBinding`]), with regions as device addresses on the
/// rank's GPU, the window's chunk states for scratch, and the run's scalar values.
struct StepValues<'a> {
    exec: &'a PlanExec<'a>,
    i: usize,
    gpu: &'a Gpu,
    binding: StepBinding<'a>,
    chunk_states: Option<u64>,
}

impl ArgValues for StepValues<'_> {
    fn pointer(&self, source: &Source) -> std::result::Result<u64, BindError> {
        match self.binding.pointer(source)? {
            Pointer::Region(r) => self
                .exec
                .address(self.i, self.gpu, r, 0)
                .map_err(|e| BindError(e.to_string())),
            Pointer::Null => Ok(0),
            Pointer::Scratch => self
                .chunk_states
                .ok_or_else(|| BindError(format!("no scratch {source:?} for this step"))),
        }
    }

    fn size(&self, name: &str) -> std::result::Result<u64, BindError> {
        self.binding.size(name)
    }

    fn stride(&self, tensor: &str, axis: Axis) -> std::result::Result<u64, BindError> {
        self.binding.stride(tensor, axis)
    }

    fn scalar(&self, param: &str, default: Option<f64>) -> std::result::Result<f64, BindError> {
        match host_values(self.exec.cascade, self.exec.host, param) {
            Ok(v) => v
                .first()
                .copied()
                .ok_or_else(|| BindError(format!("`{param}` is empty"))),
            Err(_) => default.ok_or_else(|| BindError(format!("no value for `{param}`"))),
        }
    }
}

impl<'a> PlanExec<'a> {
    /// Allocates every rank's buffers (filled from `host`, or drawn on the device for
    /// sequence inputs `host` leaves out) and loads the plan's kernels. `plan` must have
    /// passed `einattn_backends::plan::validate` against `kernels`.
    pub fn new(
        plan: &'a Plan,
        kernels: &'a KernelSet,
        ranks: &'a Ranks,
        cascade: &'a Cascade,
        host: &'a Inputs,
    ) -> Result<Self> {
        if plan.world_size != ranks.world_size() as u64 {
            return Err(plan_error(format!(
                "the plan is for {} devices, this run has {}",
                plan.world_size,
                ranks.world_size()
            )));
        }
        let mut execs = Vec::new();
        for (r, gpu) in ranks.gpus() {
            let rp = plan
                .ranks
                .iter()
                .find(|x| x.rank as usize == r)
                .ok_or_else(|| plan_error(format!("no steps for rank {r}")))?;
            let mut loaded = HashMap::new();
            for c in &kernels.manifest.kernels {
                let text = kernels
                    .ptx
                    .get(&c.kernel)
                    .ok_or_else(|| plan_error(format!("no PTX for `{}`", c.kernel)))?;
                loaded.insert(c.kernel.clone(), gpu.load_ptx(text, &c.kernel)?);
            }
            let mut buffers = HashMap::new();
            for (bi, b) in rp.buffers.iter().enumerate() {
                let n = usize::try_from(b.elements)
                    .map_err(|_| plan_error(format!("buffer `{}` is too large", b.name)))?;
                let elem = elem_of(&b.dtype)?;
                // Constant buffers fill on the device; pieces are assembled on the host.
                let constant = match &b.init {
                    BufferInit::Uninit => Some(f64::NAN),
                    BufferInit::Value { value } => Some(*value),
                    BufferInit::Pieces { .. } => None,
                };
                if let Some(v) = constant {
                    let buf = match elem {
                        Some(e) => Buf::Half(gpu.filled(n, to_bits(e, v))?),
                        None => Buf::Float(gpu.filled(n, v as f32)?),
                    };
                    buffers.insert(b.name.clone(), buf);
                    continue;
                }
                // `bench --sp` leaves the sequence inputs out of `host`: a rank draws its
                // pieces itself (uniform in [-1, 1)), so no host holds the whole problem.
                let absent = |name: &str| {
                    cascade.tensor_by_name(name).is_some_and(|t| {
                        !host.contains_key(&t) && cascade.tensors[t].default.is_none()
                    })
                };
                if let BufferInit::Pieces { pieces } = &b.init {
                    if let (Some(e), true) = (elem, pieces.iter().all(|p| absent(&p.tensor))) {
                        let bits = drawn_bits(e, n, ((r as u64) << 32) | bi as u64);
                        buffers.insert(b.name.clone(), Buf::Half(gpu.upload(&bits)?));
                        continue;
                    }
                }
                let mut values = vec![f64::NAN; n];
                if let BufferInit::Pieces { pieces } = &b.init {
                    for piece in pieces {
                        let g = plan
                            .tensors
                            .iter()
                            .find(|t| t.name == piece.tensor)
                            .ok_or_else(|| plan_error(format!("no tensor `{}`", piece.tensor)))?;
                        let data = host_values(cascade, host, &piece.tensor)?;
                        for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                            let (at, from, len) = (at as usize, from as usize, len as usize);
                            let dst = piece.offset as usize + from;
                            let src = data
                                .get(at..at + len)
                                .ok_or_else(|| plan_error(format!("piece outside `{}`", g.name)))?;
                            values
                                .get_mut(dst..dst + len)
                                .ok_or_else(|| plan_error(format!("piece outside `{}`", b.name)))?
                                .copy_from_slice(src);
                        }
                    }
                }
                let buf = match elem {
                    Some(e) => Buf::Half(
                        gpu.upload(&values.iter().map(|&x| to_bits(e, x)).collect::<Vec<_>>())?,
                    ),
                    None => Buf::Float(
                        gpu.upload(&values.iter().map(|&x| x as f32).collect::<Vec<_>>())?,
                    ),
                };
                buffers.insert(b.name.clone(), buf);
            }
            execs.push(RankExec {
                rank: r,
                buffers,
                windows: HashMap::new(),
                kernels: loaded,
                events: HashMap::new(),
            });
        }
        Ok(PlanExec {
            plan,
            kernels,
            ranks,
            host,
            cascade,
            execs,
        })
    }

    /// Runs every rank's steps once, in the order [`order`] gives.
    pub fn run(&mut self) -> Result<()> {
        let steps: Vec<&[Step]> = self
            .execs
            .iter()
            .map(|e| {
                self.plan
                    .ranks
                    .iter()
                    .find(|x| x.rank as usize == e.rank)
                    .map(|x| x.steps.as_slice())
                    .ok_or_else(|| plan_error(format!("no steps for rank {}", e.rank)))
            })
            .collect::<Result<_>>()?;
        let ranks: Vec<usize> = self.execs.iter().map(|e| e.rank).collect();
        let overlap = self.ranks.overlap();
        if overlap {
            // Fork: transfers start after what is enqueued so far (uploads, the last run).
            for (compute, comm) in self.ranks.streams() {
                comm.wait(&compute.record()?)?;
            }
            for e in &mut self.execs {
                e.events.clear();
            }
        }
        for batch in order(&steps, &ranks).map_err(plan_error)? {
            let (at, transfer) = match &batch {
                Batch::Local(i, k) => (vec![(*i, *k)], false),
                Batch::Collective(at) | Batch::PointToPoint(at) => (at.clone(), true),
            };
            if overlap {
                for &(i, k) in &at {
                    self.before(i, &steps[i][k], transfer)?;
                }
            }
            match batch {
                Batch::Local(i, k) => self.local_step(i, &steps[i][k])?,
                Batch::Collective(at) => match &steps[at[0].0][at[0].1] {
                    Step::AllToAll { .. } => self.all_to_all(&steps, &at)?,
                    _ => {
                        let group: Vec<&Step> = at.iter().map(|&(i, k)| &steps[i][k]).collect();
                        self.all_gather(&group)?
                    }
                },
                Batch::PointToPoint(at) => self.send_recv(&steps, &at)?,
            }
            if overlap {
                for &(i, k) in &at {
                    self.after(i, &steps[i][k], transfer)?;
                }
            }
        }
        if overlap {
            // Join: later compute-stream work (downloads, the next run) waits for transfers.
            for (compute, comm) in self.ranks.streams() {
                compute.wait(&comm.record()?)?;
            }
        }
        Ok(())
    }

    /// The stream a step is declared on: the rank's transfer stream for `comm`, else its
    /// compute stream (the same stream without overlap).
    fn declared(&self, i: usize, step: &Step) -> &'a Gpu {
        if step.exec().stream == "comm" {
            self.ranks.comm_of(i)
        } else {
            self.ranks.gpu_of(i)
        }
    }

    /// The stream a step runs on: collectives and transfers where the communicators are
    /// (the transfer stream), other steps where they are declared.
    fn actual(&self, i: usize, step: &Step, transfer: bool) -> &'a Gpu {
        if transfer {
            self.ranks.comm_of(i)
        } else {
            self.declared(i, step)
        }
    }

    /// Before a step runs with overlap: its stream waits for the events the step waits for,
    /// and, when it runs off its declared stream, for the declared stream's work so far.
    fn before(&self, i: usize, step: &Step, transfer: bool) -> Result<()> {
        let (run_on, declared) = (self.actual(i, step, transfer), self.declared(i, step));
        for name in &step.exec().wait {
            let e = self.execs[i].events.get(name).ok_or_else(|| {
                plan_error(format!(
                    "a step waits for `{name}`, which no earlier step recorded"
                ))
            })?;
            run_on.wait(e)?;
        }
        if !std::ptr::eq(run_on, declared) {
            run_on.wait(&declared.record()?)?;
        }
        Ok(())
    }

    /// After a step ran with overlap: its declared stream continues after it, and its event
    /// is recorded where it ran.
    fn after(&mut self, i: usize, step: &Step, transfer: bool) -> Result<()> {
        let (run_on, declared) = (self.actual(i, step, transfer), self.declared(i, step));
        if !std::ptr::eq(run_on, declared) {
            declared.wait(&run_on.record()?)?;
        }
        if let Some(name) = &step.exec().record {
            let e = run_on.record()?;
            self.execs[i].events.insert(name.clone(), e);
        }
        Ok(())
    }

    fn send_recv(&mut self, steps: &[&[Step]], at: &[(usize, usize)]) -> Result<()> {
        // Receive buffers leave their maps while borrowed mutably next to the sends.
        let mut taken: Vec<Option<(String, Buf)>> = Vec::new();
        for &(i, k) in at {
            let Step::SendRecv { recv, .. } = &steps[i][k] else {
                return Err(plan_error("not a send/receive step"));
            };
            taken.push(match recv {
                Some(r) => {
                    let buf = self.execs[i]
                        .buffers
                        .remove(&r.region.buffer)
                        .ok_or_else(|| plan_error(format!("no buffer `{}`", r.region.buffer)))?;
                    Some((r.region.buffer.clone(), buf))
                }
                None => None,
            });
        }
        let result = (|| {
            let mut floats = Vec::new();
            let mut halves = Vec::new();
            let block = |r: &PeerRegion| {
                vec![(
                    r.region.offset as usize,
                    r.region.count as usize,
                    r.peer as usize,
                )]
            };
            for (&(i, k), slot) in at.iter().zip(taken.iter_mut()) {
                let Step::SendRecv { send, recv, .. } = &steps[i][k] else {
                    return Err(plan_error("not a send/receive step"));
                };
                let send_buf = match send {
                    Some(s) => Some((
                        self.execs[i].buffers.get(&s.region.buffer).ok_or_else(|| {
                            plan_error(format!("no buffer `{}`", s.region.buffer))
                        })?,
                        block(s),
                    )),
                    None => None,
                };
                let recv_buf = slot.as_mut().map(|(_, b)| b).zip(recv.as_ref().map(block));
                let half = matches!(send_buf, Some((Buf::Half(_), _)))
                    || matches!(recv_buf, Some((Buf::Half(_), _)));
                let mismatch = || plan_error("send and receive of different dtypes");
                if half {
                    halves.push((
                        i,
                        P2pPart {
                            send: send_buf
                                .map(|(b, x)| b.half().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                            recv: recv_buf
                                .map(|(b, x)| b.half_mut().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                        },
                    ));
                } else {
                    floats.push((
                        i,
                        P2pPart {
                            send: send_buf
                                .map(|(b, x)| b.float().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                            recv: recv_buf
                                .map(|(b, x)| b.float_mut().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                        },
                    ));
                }
            }
            if !halves.is_empty() && !floats.is_empty() {
                return Err(plan_error("one point-to-point group of two dtypes"));
            }
            if halves.is_empty() {
                self.ranks.send_recv(floats)
            } else {
                self.ranks.send_recv(halves)
            }
        })();
        for (&(i, _), slot) in at.iter().zip(taken) {
            if let Some((name, buf)) = slot {
                self.execs[i].buffers.insert(name, buf);
            }
        }
        result
    }

    /// All-to-all as one group of sends and receives (block `q` of `send` to rank `q`,
    /// block `q` of `recv` from rank `q`); a rank's own block is a device copy.
    fn all_to_all(&mut self, steps: &[&[Step]], at: &[(usize, usize)]) -> Result<()> {
        let world = self.plan.world_size as usize;
        let mut taken = Vec::new();
        for &(i, k) in at {
            let Step::AllToAll { recv, .. } = &steps[i][k] else {
                return Err(plan_error("ranks disagree on their collectives"));
            };
            let buf = self.execs[i]
                .buffers
                .remove(&recv.buffer)
                .ok_or_else(|| plan_error(format!("no buffer `{}`", recv.buffer)))?;
            taken.push((recv.buffer.clone(), buf));
        }
        let result = (|| {
            let mut floats = Vec::new();
            let mut halves = Vec::new();
            for (&(i, k), (_, recv_buf)) in at.iter().zip(taken.iter_mut()) {
                let Step::AllToAll {
                    send,
                    recv,
                    count_per_peer,
                    ..
                } = &steps[i][k]
                else {
                    return Err(plan_error("ranks disagree on their collectives"));
                };
                let (r, cpp) = (self.execs[i].rank, *count_per_peer as usize);
                // The own block goes on the stream the collective runs on.
                let gpu = self.ranks.comm_of(i);
                let send_buf = self.execs[i]
                    .buffers
                    .get(&send.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", send.buffer)))?;
                let blocks = |base: u64| -> Vec<(usize, usize, usize)> {
                    (0..world)
                        .filter(|&q| q != r)
                        .map(|q| (base as usize + q * cpp, cpp, q))
                        .collect()
                };
                let own = (
                    send.offset as usize + r * cpp,
                    recv.offset as usize + r * cpp,
                );
                match (send_buf, recv_buf) {
                    (Buf::Half(a), Buf::Half(b)) => {
                        gpu.copy_within(a, own.0..own.0 + cpp, b, own.1)?;
                        halves.push((
                            i,
                            P2pPart {
                                send: Some((a, blocks(send.offset))),
                                recv: Some((b, blocks(recv.offset))),
                            },
                        ));
                    }
                    (Buf::Float(a), Buf::Float(b)) => {
                        gpu.copy_within(a, own.0..own.0 + cpp, b, own.1)?;
                        floats.push((
                            i,
                            P2pPart {
                                send: Some((a, blocks(send.offset))),
                                recv: Some((b, blocks(recv.offset))),
                            },
                        ));
                    }
                    _ => return Err(plan_error("all-to-all between different dtypes")),
                }
            }
            if !halves.is_empty() && !floats.is_empty() {
                return Err(plan_error("one all-to-all of two dtypes"));
            }
            if halves.is_empty() {
                self.ranks.send_recv(floats)
            } else {
                self.ranks.send_recv(halves)
            }
        })();
        for (&(i, _), (name, buf)) in at.iter().zip(taken) {
            self.execs[i].buffers.insert(name, buf);
        }
        result
    }

    fn all_gather(&mut self, steps: &[&Step]) -> Result<()> {
        let mut regions = Vec::new();
        for s in steps {
            match s {
                Step::AllGather { send, recv, .. } => regions.push((send.clone(), recv.clone())),
                other => {
                    return Err(plan_error(format!(
                        "collective {other:?} has no GPU lowering"
                    )))
                }
            }
        }
        let count = regions[0].0.count as usize;
        if regions.iter().any(|(s, _)| s.count as usize != count) {
            return Err(plan_error("all-gather counts differ across ranks"));
        }
        // The receive buffers leave their maps while borrowed mutably next to the sends.
        let mut taken = Vec::new();
        for (e, (_, recv)) in self.execs.iter_mut().zip(&regions) {
            let buf = e
                .buffers
                .remove(&recv.buffer)
                .ok_or_else(|| plan_error(format!("no buffer `{}`", recv.buffer)))?;
            taken.push(buf);
        }
        let result = {
            let mut halves = Vec::new();
            let mut floats = Vec::new();
            for ((e, (send, recv)), buf) in self.execs.iter().zip(&regions).zip(taken.iter_mut()) {
                let src = e
                    .buffers
                    .get(&send.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", send.buffer)))?;
                match (src, buf) {
                    (Buf::Half(s), Buf::Half(r)) => {
                        halves.push((s, send.offset as usize, r, recv.offset as usize))
                    }
                    (Buf::Float(s), Buf::Float(r)) => {
                        floats.push((s, send.offset as usize, r, recv.offset as usize))
                    }
                    _ => return Err(plan_error("all-gather between different dtypes")),
                }
            }
            if !halves.is_empty() {
                self.ranks.all_gather_regions(halves, count)
            } else {
                self.ranks.all_gather_regions(floats, count)
            }
        };
        for ((e, (_, recv)), buf) in self.execs.iter_mut().zip(&regions).zip(taken) {
            e.buffers.insert(recv.buffer.clone(), buf);
        }
        result
    }

    fn local_step(&mut self, i: usize, step: &Step) -> Result<()> {
        let gpu = self.declared(i, step);
        match step {
            Step::Kernel(k) => self.kernel_step(i, gpu, k),
            Step::Place {
                src,
                dst,
                shape,
                slices,
                ..
            } => {
                let e = &mut self.execs[i];
                let mut to = e
                    .buffers
                    .remove(&dst.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", dst.buffer)))?;
                let result = (|| {
                    let from = e
                        .buffers
                        .get(&src.buffer)
                        .ok_or_else(|| plan_error(format!("no buffer `{}`", src.buffer)))?;
                    for (at, off, len) in piece_runs(shape, slices) {
                        let (s, d) = ((src.offset + off) as usize, (dst.offset + at) as usize);
                        let len = len as usize;
                        match (from, &mut to) {
                            (Buf::Half(a), Buf::Half(b)) => gpu.copy_within(a, s..s + len, b, d),
                            (Buf::Float(a), Buf::Float(b)) => gpu.copy_within(a, s..s + len, b, d),
                            _ => return Err(plan_error("place between different dtypes")),
                        }?;
                    }
                    Ok(())
                })();
                e.buffers.insert(dst.buffer.clone(), to);
                result
            }
            Step::PrefixCombine {
                slots,
                slot_elements,
                first,
                count,
                init,
                init_value,
                states,
                out,
                ..
            } => {
                for st in states {
                    let n: u64 = st.shape.iter().product();
                    let (div, modulo) = decay_indexing(&st.shape, &st.decay_dims)?;
                    // The kernel reads every slot's state and decay and writes `n` values:
                    // all of them must lie inside the regions.
                    let fits = (first + count) * slot_elements <= slots.count
                        && st.offset + n <= *slot_elements
                        && st.decay_offset + modulo <= *slot_elements
                        && st.out_offset + n <= out.count
                        && init.as_ref().is_none_or(|r| st.out_offset + n <= r.count);
                    if !fits {
                        return Err(plan_error(format!(
                            "prefix_combine of `{}` reaches outside its regions",
                            st.state
                        )));
                    }
                    let init_addr = match init {
                        Some(r) => self.address(i, gpu, r, st.out_offset)?,
                        None => 0,
                    };
                    let args = Combine {
                        slots: self.address(i, gpu, slots, st.offset)?,
                        slot_stride: *slot_elements,
                        first: u32_arg("first", *first)?,
                        count: u32_arg("count", *count)?,
                        decay: self.address(i, gpu, slots, st.decay_offset)?,
                        decay_stride: *slot_elements,
                        decay_div: div,
                        decay_mod: modulo,
                        init: init_addr,
                        init_value: *init_value as f32,
                        out: self.address(i, gpu, out, st.out_offset)?,
                        n,
                    }
                    .arguments();
                    self.helper(i, gpu, PREFIX_COMBINE, n, &args)?;
                }
                Ok(())
            }
            Step::Rearrange {
                src,
                dst,
                shape,
                perm,
                ..
            } => {
                let n: u64 = shape.iter().product();
                if src.count != n || dst.count != n || perm.len() != shape.len() {
                    return Err(plan_error("a rearrange between regions of other sizes"));
                }
                let plan = plan_rearrange(shape, perm).ok_or_else(|| {
                    plan_error(format!(
                        "a rearrange of {shape:?} by {perm:?} keeps more than {REARRANGE_DIMS} dims apart"
                    ))
                })?;
                let half = matches!(self.execs[i].buffers.get(&src.buffer), Some(Buf::Half(_)));
                let entry = if half { REARRANGE_16 } else { REARRANGE_32 };
                let args = rearrange_arguments(
                    self.address(i, gpu, src, 0)?,
                    self.address(i, gpu, dst, 0)?,
                    &plan,
                );
                // One warp per run.
                self.helper(i, gpu, entry, 32 * plan.runs(), &args)
            }
            Step::LseMerge {
                into, from, stats, ..
            } => self.lse_merge(i, gpu, into, from, stats),
            other => Err(plan_error(format!("no GPU lowering for {other:?}"))),
        }
    }

    /// The device address of `region` plus `extra` elements, checked against its buffer.
    fn address(&self, i: usize, gpu: &Gpu, region: &Region, extra: u64) -> Result<u64> {
        let buf = self.execs[i]
            .buffers
            .get(&region.buffer)
            .ok_or_else(|| plan_error(format!("no buffer `{}`", region.buffer)))?;
        let end = region.offset.checked_add(region.count);
        if end.is_none_or(|e| e > buf.len() as u64) || extra > region.count {
            return Err(plan_error(format!(
                "region [{}, +{}) is outside `{}`",
                region.offset, region.count, region.buffer
            )));
        }
        Ok(buf.address(gpu, region.offset + extra))
    }

    fn contract(&self, entry: &str) -> Result<&'a LaunchContract> {
        self.kernels
            .manifest
            .kernel(entry)
            .ok_or_else(|| plan_error(format!("no kernel `{entry}` in the plan's manifest")))
    }

    /// Launches a kernel of the manifest with bound values and the grid its sizes give.
    fn launch(&self, i: usize, gpu: &Gpu, entry: &str, values: &dyn ArgValues) -> Result<()> {
        let contract = self.contract(entry)?;
        let kernel = self.execs[i]
            .kernels
            .get(entry)
            .ok_or_else(|| plan_error(format!("kernel `{entry}` is not loaded")))?;
        let args = abi::bind(contract, values)?
            .into_iter()
            .map(driver_arg)
            .collect::<Result<Vec<_>>>()?;
        let grid = contract.grid(&|s| values.size(s))?;
        gpu.launch(kernel, dims(contract, grid), &args)?;
        Ok(())
    }

    /// A helper kernel over `work_items` threads.
    fn helper(
        &self,
        i: usize,
        gpu: &Gpu,
        entry: &str,
        work_items: u64,
        args: &Arguments,
    ) -> Result<()> {
        struct Sized<'s>(&'s Arguments, u64);
        impl ArgValues for Sized<'_> {
            fn pointer(&self, s: &Source) -> std::result::Result<u64, BindError> {
                self.0.pointer(s)
            }
            fn size(&self, name: &str) -> std::result::Result<u64, BindError> {
                if name == "work_items" {
                    Ok(self.1)
                } else {
                    self.0.size(name)
                }
            }
            fn stride(&self, t: &str, a: Axis) -> std::result::Result<u64, BindError> {
                self.0.stride(t, a)
            }
            fn scalar(&self, p: &str, d: Option<f64>) -> std::result::Result<f64, BindError> {
                self.0.scalar(p, d)
            }
            fn argument(&self, name: &str) -> std::result::Result<ArgValue, BindError> {
                self.0.argument(name)
            }
        }
        self.launch(i, gpu, entry, &Sized(args, work_items))
    }

    /// A kernel step: by phase, the launches of the kernels the plan assigned it.
    fn kernel_step(&mut self, i: usize, gpu: &Gpu, k: &KernelStep) -> Result<()> {
        match k.phase {
            Phase::StateOnly | Phase::OutputWithPrefix => self.chunked_step(i, gpu, k),
            Phase::Full | Phase::Partial | Phase::Epilogue => {
                let [entry] = k.launch.as_slice() else {
                    return Err(plan_error(format!(
                        "{}: a {:?} step launches one kernel",
                        k.kernel, k.phase
                    )));
                };
                let contract = self.contract(entry)?;
                let values = StepValues {
                    exec: self,
                    i,
                    gpu,
                    binding: StepBinding::new(self.plan, k, contract).map_err(plan_error)?,
                    chunk_states: None,
                };
                self.launch(i, gpu, entry, &values)
            }
        }
    }

    /// An `lse_merge` step: one merge-kernel launch per statistic, sums before extrema.
    fn lse_merge(
        &self,
        i: usize,
        gpu: &Gpu,
        into: &Region,
        from: &Region,
        stats: &[einattn_backends::plan::MergeStat],
    ) -> Result<()> {
        for m in stats::merge_launches(into, from, stats).map_err(plan_error)? {
            let max = |r: &Region| -> Result<u64> {
                match m.max_offset {
                    Some(o) => self.address(i, gpu, r, o),
                    None => Ok(0),
                }
            };
            let args = merge_arguments(
                [
                    self.address(i, gpu, into, m.offset)?,
                    self.address(i, gpu, from, m.offset)?,
                    max(into)?,
                    max(from)?,
                ],
                &m,
            );
            self.helper(i, gpu, LSE_MERGE, m.count, &args)?;
        }
        Ok(())
    }

    /// The chunked state kernels of a linear family (`launch` = chunk states, chunk
    /// outputs) over one window of the sequence.
    fn chunked_step(&mut self, i: usize, gpu: &Gpu, k: &KernelStep) -> Result<()> {
        let [states_entry, outputs_entry] = k.launch.as_slice() else {
            return Err(plan_error(format!(
                "{}: a chunked step launches a state kernel and an output kernel",
                k.kernel
            )));
        };
        let contract = self.contract(states_entry)?;
        let size = |n: &str| contract.compiled_size(n);
        let (batch, heads, d, e) = (
            size("batch")?,
            size("heads")?,
            size("head_dim")?,
            size("value_dim")?,
        );
        let slot = batch * heads * d * e;
        let sub = k
            .chunks
            .ok_or_else(|| plan_error(format!("{}: a chunked step without `chunks`", k.kernel)))?;
        let len = k.queries.len;
        let window_key = (k.queries.start, len);
        if let std::collections::hash_map::Entry::Vacant(v) =
            self.execs[i].windows.entry(window_key)
        {
            let slots = usize::try_from((sub + 1) * slot)
                .map_err(|_| plan_error("chunk states too large"))?;
            v.insert(Window {
                sub: sub as usize,
                slots: gpu.filled(slots, f32::NAN)?,
                chunk_decay: gpu.filled(heads as usize, 1f32)?,
                has_states: false,
            });
        }
        // The window's scratch leaves its map while this step writes it.
        let mut w = self.execs[i]
            .windows
            .remove(&window_key)
            .ok_or_else(|| plan_error("window scratch missing"))?;
        let result = self.chunked_launches(i, gpu, k, &mut w, [states_entry, outputs_entry], slot);
        self.execs[i].windows.insert(window_key, w);
        result
    }

    fn chunked_launches(
        &self,
        i: usize,
        gpu: &Gpu,
        k: &KernelStep,
        w: &mut Window,
        [states_entry, outputs_entry]: [&String; 2],
        slot: u64,
    ) -> Result<()> {
        let contract = self.contract(states_entry)?;
        let (sub, len) = (w.sub as u64, k.queries.len);
        let slots_addr = w.slots.device_address(gpu);
        let values = |contract: &'a LaunchContract| StepValues {
            exec: self,
            i,
            gpu,
            binding: StepBinding {
                plan: self.plan,
                step: k,
                contract,
                sizes: vec![
                    ("n_q", len),
                    ("n_k", len),
                    ("chunk_base", 1),
                    ("chunk_total", 1 + sub),
                ],
            },
            chunk_states: Some(slots_addr),
        };
        let heads = contract.compiled_size("heads")?;
        // The decay rate: the per-head parameter of the contract, exp(-rate * tokens).
        let rate_addr = match contract.tensors_with(TensorRole::Param).next() {
            Some(t) => {
                let a = k
                    .args
                    .iter()
                    .find(|a| a.tensor == t.name && a.role == ArgRole::Param)
                    .ok_or_else(|| plan_error(format!("no argument `{}`", t.name)))?;
                Some(self.address(i, gpu, &a.region, 0)?)
            }
            None => None,
        };
        let state_name = k
            .args
            .iter()
            .find(|a| matches!(a.role, ArgRole::StateOut | ArgRole::StateIn))
            .map(|a| a.tensor.clone())
            .ok_or_else(|| plan_error(format!("{} has no state argument", k.kernel)))?;
        let state_arg = |role| {
            k.args
                .iter()
                .find(|a| a.tensor == state_name && a.role == role)
        };
        let decay = |rate: u64, out: u64, n: u64, tokens: u64| -> Result<()> {
            let args = decay_arguments(rate, out, u32_arg("heads", n)?, tokens);
            self.helper(i, gpu, CHUNK_DECAY, n, &args)
        };
        match k.phase {
            Phase::StateOnly => {
                self.launch(i, gpu, states_entry, &values(contract))?;
                // Each chunk's decay, then the window's state as the decayed sum of chunks.
                let chunk_tokens = contract.grid_formula[2].divide_by;
                let decay_addr = w.chunk_decay.device_address(gpu);
                if let Some(rate) = rate_addr {
                    decay(rate, decay_addr, heads, chunk_tokens)?;
                }
                let out = state_arg(ArgRole::StateOut)
                    .ok_or_else(|| plan_error("state_only writes no state"))?;
                let d_e =
                    contract.compiled_size("head_dim")? * contract.compiled_size("value_dim")?;
                let combine = Combine {
                    slots: slots_addr + 4 * slot,
                    slot_stride: slot,
                    first: 0,
                    count: u32_arg("chunks", sub)?,
                    decay: decay_addr,
                    decay_stride: 0,
                    decay_div: d_e,
                    decay_mod: heads,
                    init: 0,
                    init_value: 0.0,
                    out: self.address(i, gpu, &out.region, 0)?,
                    n: slot,
                }
                .arguments();
                self.helper(i, gpu, PREFIX_COMBINE, slot, &combine)?;
                if let Some(a) = k.args.iter().find(|a| a.role == ArgRole::DecayOut) {
                    let out = self.address(i, gpu, &a.region, 0)?;
                    let rate = rate_addr
                        .ok_or_else(|| plan_error("a decay output without a decay rate"))?;
                    decay(rate, out, a.region.count, len)?;
                }
                w.has_states = true;
                Ok(())
            }
            Phase::OutputWithPrefix => {
                if !w.has_states && w.sub > 1 {
                    return Err(plan_error(
                        "output_with_prefix on a window whose chunk states were not computed",
                    ));
                }
                let prefix = state_arg(ArgRole::StateIn)
                    .ok_or_else(|| plan_error("output_with_prefix reads no state"))?;
                let Some(Buf::Float(src)) = self.execs[i].buffers.get(&prefix.region.buffer) else {
                    return Err(plan_error(format!(
                        "no f32 buffer `{}`",
                        prefix.region.buffer
                    )));
                };
                // The prefix goes to slot 0, where the output kernel's combine starts.
                let start = prefix.region.offset as usize;
                gpu.copy_within(src, start..start + slot as usize, &mut w.slots, 0)?;
                let outputs = self.contract(outputs_entry)?;
                self.launch(i, gpu, outputs_entry, &values(outputs))
            }
            other => Err(plan_error(format!("no chunked lowering for {other:?}"))),
        }
    }

    /// Error parts of this process's output pieces against `want` (the global output `O`
    /// in its own layout), summed over the ranks driven here.
    pub fn compare(&self, output: &str, want: &[f64]) -> Result<[f64; 2]> {
        let g = self
            .plan
            .tensors
            .iter()
            .find(|t| t.name == output)
            .ok_or_else(|| plan_error(format!("no output `{output}`")))?;
        if want.len() as u64 != g.shape.iter().product::<u64>() {
            return Err(plan_error(format!(
                "a reference of {} values for `{output}` of shape {:?}",
                want.len(),
                g.shape
            )));
        }
        let mut parts = [0.0, 0.0];
        for (i, e) in self.execs.iter().enumerate() {
            let gpu = self.ranks.gpu_of(i);
            let rp = self
                .plan
                .ranks
                .iter()
                .find(|x| x.rank as usize == e.rank)
                .ok_or_else(|| plan_error("rank missing"))?;
            for piece in rp.outputs.iter().filter(|p| p.tensor == output) {
                let Some(Buf::Half(buf)) = e.buffers.get(&piece.buffer) else {
                    return Err(plan_error("outputs are 16-bit"));
                };
                let elem = elem_of(&g.dtype)?.ok_or_else(|| plan_error("outputs are 16-bit"))?;
                gpu.synchronize()?;
                let got = gpu.download(buf)?;
                for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                    let (at, from) = (at as usize, (piece.offset + from) as usize);
                    let [a, b] = error_parts(
                        (0..len as usize).map(|x| (from_bits(elem, got[from + x]), want[at + x])),
                    );
                    parts[0] += a;
                    parts[1] += b;
                }
            }
        }
        Ok(parts)
    }
}

/// `n` values uniform in [-1, 1) as 16-bit bits, drawn on every core from `seed`.
fn drawn_bits(dtype: Dtype, n: usize, seed: u64) -> Vec<u16> {
    use rand::{Rng, SeedableRng};
    const BLOCK: usize = 1 << 16;
    let mut out = vec![0u16; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = n.div_ceil(BLOCK).div_ceil(threads).max(1) * BLOCK;
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(t as u64 + 1);
                for x in chunk {
                    *x = to_bits(dtype, rng.random_range(-1.0..1.0));
                }
            });
        }
    });
    out
}

/// `(div, mod)` such that element `i` of a row-major state of `shape` reads decay
/// `(i / div) % mod`: the decay dims must be adjacent.
fn decay_indexing(shape: &[u64], dims: &[usize]) -> Result<(u64, u64)> {
    let (Some(&lo), Some(&hi)) = (dims.iter().min(), dims.iter().max()) else {
        return Ok((1, 1));
    };
    if hi - lo + 1 != dims.len() || hi >= shape.len() {
        return Err(plan_error(format!(
            "decay over dims {dims:?} of a state {shape:?}: only adjacent dims are lowered"
        )));
    }
    let div = shape[hi + 1..].iter().product();
    let modulo = shape[lo..=hi].iter().product();
    Ok((div, modulo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use einattn_backends::family::elementwise::helpers;
    use einattn_backends::Target;

    /// The executor's arguments of every helper kernel bind to that kernel's contract: each
    /// parameter named, of its type, in `.entry` order.
    #[test]
    fn helper_arguments_bind_to_the_helper_contracts() {
        let plan = plan_rearrange(&[2, 3, 4], &[2, 0, 1]).expect("a run-copy plan");
        for (_, contract) in helpers(Target::Sm80, true, true) {
            let args = match contract.kernel.as_str() {
                PREFIX_COMBINE => Combine {
                    slots: 1 << 20,
                    slot_stride: 64,
                    first: 0,
                    count: 3,
                    decay: 2 << 20,
                    decay_stride: 0,
                    decay_div: 16,
                    decay_mod: 4,
                    init: 0,
                    init_value: 0.0,
                    out: 3 << 20,
                    n: 64,
                }
                .arguments(),
                CHUNK_DECAY => decay_arguments(1 << 20, 2 << 20, 4, 128),
                REARRANGE_16 | REARRANGE_32 => rearrange_arguments(1 << 20, 2 << 20, &plan),
                LSE_MERGE => merge_arguments(
                    [1 << 20, 2 << 20, 3 << 20, 4 << 20],
                    &stats::MergeLaunch {
                        stat: "RNV".into(),
                        kind: einattn_backends::plan::MergeKind::RescaledSum,
                        offset: 0,
                        count: 1 << 16,
                        max_offset: Some(0),
                        width: 128,
                    },
                ),
                other => panic!("a helper the executor does not launch: {other}"),
            };
            let bound =
                abi::bind(&contract, &args).unwrap_or_else(|e| panic!("{}: {e}", contract.kernel));
            assert_eq!(bound.len(), contract.params.len());
            assert!(bound.iter().any(|v| matches!(v, ArgValue::Ptr(_))));
        }
    }

    #[test]
    fn decay_indexing_reads_the_decay_dims_of_a_state() {
        // KV [b, h, d, e] = [2, 3, 4, 5] with a per-head decay: (i / 20) % 3.
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[1]).ok(), Some((20, 3)));
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[0, 1]).ok(), Some((20, 6)));
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[]).ok(), Some((1, 1)));
        assert!(decay_indexing(&[2, 3, 4, 5], &[0, 2]).is_err());
    }
}
